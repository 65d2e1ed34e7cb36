"""What this CPU computes natively that a faster precision can use: bfloat16 and int8 dot products.

Read from the kernel's CPU flags (`/proc/cpuinfo`) where there is one; OpenVINO's own view of the CPU
(`OPTIMIZATION_CAPABILITIES`) is used when OpenVINO is installed, since it is what its CPU plugin acts on.
"""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

# x86 flags, as Linux names them, that give each capability.
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@dataclass(frozen=True)
class CpuFeatures:
    """`bf16`: native bfloat16 arithmetic (AVX512_BF16 or AMX). `int8_dot`: int8 dot-product instructions (VNNI, AMX)."""

    bf16: bool
    int8_dot: bool
    flags: tuple[str, ...] = ()

    def describe(self) -> str:
        found = [f for f in (*BF16_FLAGS, *INT8_DOT_FLAGS, "avx512f", "avx2") if f in self.flags]
        return " ".join(found) or "no AVX2/AVX-512 flags read"


def _linux_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def _openvino_capabilities() -> set[str]:
    if importlib.util.find_spec("openvino") is None:
        return set()
    from leansd.runtime.backends.openvino import core

    try:
        return set(core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    except Exception:  # a broken or partial OpenVINO install must not stop the choice of precision
        return set()


@functools.lru_cache(maxsize=1)
def detect() -> CpuFeatures:
    """This machine's features (read once per process)."""
    flags = _linux_flags()
    ov_caps = _openvino_capabilities()
    bf16 = any(f in flags for f in BF16_FLAGS) or "BF16" in ov_caps
    int8_dot = any(f in flags for f in INT8_DOT_FLAGS)
    return CpuFeatures(bf16=bf16, int8_dot=int8_dot, flags=tuple(sorted(flags)))
