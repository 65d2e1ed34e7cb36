"""What this CPU computes natively that a faster precision can use: bfloat16, and int8 dot products.

Read from the kernel's CPU flags (`/proc/cpuinfo`) where there is one, and from OpenVINO's own view of the CPU
(`OPTIMIZATION_CAPABILITIES`) when OpenVINO is installed, since that is what its CPU plugin acts on. Both describe
the silicon: a process that caps oneDNN's instruction set below bf16 (`ONEDNN_MAX_CPU_ISA=AVX2`, a common way to
check AVX2 behaviour on a newer CPU) has no bf16 kernels, though OpenVINO still reports BF16 and would fail to
compile with its bf16 default, so such a cap counts as no bf16.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

# x86 flags, as Linux names them, that give native bfloat16 arithmetic.
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# x86 flags, as Linux names them, that give one-instruction int8 dot products (VNNI, AMX): what makes a statically
# quantized UNet's int8 convolutions pay (ONNX Runtime's MLAS kernels dispatch on them; no oneDNN cap applies).
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
# oneDNN's names for instruction sets without bf16 dot products, as `ONEDNN_MAX_CPU_ISA` takes them.
ISA_CAPS_WITHOUT_BF16 = frozenset({"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI"})


@dataclass(frozen=True)
class CpuFeatures:
    """`bf16`: native bfloat16 arithmetic (AVX512_BF16 or AMX); `int8_dot`: int8 dot-product instructions (VNNI or AMX)."""

    bf16: bool
    int8_dot: bool = False


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


def isa_cap() -> str | None:
    """The instruction-set cap this process set for oneDNN (`ONEDNN_MAX_CPU_ISA`, upper case), if any."""
    return os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper() or None


def capped_below_bf16() -> bool:
    """Whether oneDNN is capped to an instruction set without bf16 (see the module docstring)."""
    return isa_cap() in ISA_CAPS_WITHOUT_BF16


def openvino_bf16() -> bool:
    """Whether OpenVINO's CPU plugin can compute bfloat16 natively in this process."""
    return not capped_below_bf16() and "BF16" in _openvino_capabilities()


@functools.lru_cache(maxsize=1)
def detect() -> CpuFeatures:
    """This machine's features (read once per process)."""
    flags = _linux_flags()
    int8_dot = any(f in flags for f in INT8_DOT_FLAGS)
    if capped_below_bf16():
        return CpuFeatures(bf16=False, int8_dot=int8_dot)
    return CpuFeatures(bf16=any(f in flags for f in BF16_FLAGS) or "BF16" in _openvino_capabilities(), int8_dot=int8_dot)
