"""What this CPU computes natively that a faster precision can use: bfloat16.

Read from the kernel's CPU flags (`/proc/cpuinfo`) where there is one, and from OpenVINO's own view of the CPU
(`OPTIMIZATION_CAPABILITIES`) when OpenVINO is installed, since that is what its CPU plugin acts on.
"""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

# x86 flags, as Linux names them, that give native bfloat16 arithmetic.
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class CpuFeatures:
    """`bf16`: native bfloat16 arithmetic (AVX512_BF16 or AMX)."""

    bf16: bool


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
    return CpuFeatures(bf16=any(f in _linux_flags() for f in BF16_FLAGS) or "BF16" in _openvino_capabilities())
