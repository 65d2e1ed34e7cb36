"""`precision="auto"`: the fastest precision this CPU runs well whose quality the export measured and passed.

In order of preference:

  bf16  on OpenVINO, when the CPU computes bfloat16 natively (AVX512_BF16 or AMX) and `sd-export` measured every
        component in bf16 against PyTorch within its gate (`parity.<component>.openvino.bf16.passed` in
        leansd.json; sd-export measures it when it runs on such a CPU). 3.8x faster than fp32 per image on the
        SD 1.5 architecture (perf/RESULTS-precision.md). ONNX Runtime has no bf16 kernels for x86 CPUs.
  int8  when the folder holds int8 files for the backend and every one passed its gate at export. An ONNX UNet
        quantized with `sd-export --int8-unet-onnx static` (int8 convolutions too) was made for CPUs with int8
        dot products (VNNI, AMX): 1.99x fp32 per image there against dynamic int8's 1.24x
        (perf/RESULTS-ort-int8-zen4.md). The reason says which UNet recipe the folder has and whether this CPU has them.
  fp32  otherwise: the exact, diffusers-identical default.

The choice and its reason are on the pipeline (`pipe.precision`, `pipe.precision_reason`) and so in every output's
PNG metadata.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from leansd.runtime import manifest as names
from leansd.runtime.bundle import ModelBundle
from leansd.runtime.cpu_features import CpuFeatures

PRECISIONS = ("fp32", "int8", "bf16", "auto")
# The components whose measured quality decides whether a reduced precision is used.
_GATED = (names.TEXT_ENCODER, names.TEXT_ENCODER_2, names.UNET, names.VAE_DECODER, names.VAE_ENCODER)
_FILE_BACKEND = {"onnxruntime": "onnx", "openvino": "openvino"}


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str
    reason: str


def _gate_misses(bundle: ModelBundle, backend_key: str, precision: str) -> list[str] | None:
    """Components whose recorded `precision` entry failed its gate; None when the folder records none for it."""
    parity = (bundle.manifest or {}).get("parity") or {}
    entries = {c: (parity.get(c) or {}).get(backend_key, {}).get(precision) for c in _GATED if c in parity}
    if not entries or any(e is None for e in entries.values()):
        return None
    return [c for c, e in entries.items() if not e.get("passed", False)]


def bf16_verdict(bundle: ModelBundle, cpu: CpuFeatures) -> tuple[bool, str]:
    """Whether bf16 on OpenVINO may be picked for this folder on this CPU, and why (not)."""
    if not cpu.bf16:
        return False, "this CPU has no native bfloat16 arithmetic"
    if importlib.util.find_spec("openvino") is None:
        return False, "bf16 needs the openvino backend, which is not installed"
    misses = _gate_misses(bundle, "openvino", "bf16")
    if misses is None:
        return False, "the export did not measure bf16 (re-export on a CPU with AVX512_BF16 or AMX to measure it)"
    if misses:
        return False, f"bf16 missed its quality gate at export ({', '.join(misses)})"
    return True, "native bf16 on this CPU, within its quality gate at export"


def onnx_unet_recipe(bundle: ModelBundle) -> str:
    """How the folder's ONNX int8 UNet was quantized: "static" or "dynamic" (folders that predate the choice)."""
    return str(((bundle.manifest or {}).get("int8") or {}).get("onnx_unet_recipe") or "dynamic")


def _recipe_note(bundle: ModelBundle, backend: str, cpu: CpuFeatures) -> str:
    if backend != "onnxruntime" or onnx_unet_recipe(bundle) != "static":
        return ""
    if cpu.int8_dot:
        return "; static int8 UNet, with this CPU's int8 dot products (VNNI/AMX)"
    return "; static int8 UNet, made for CPUs with int8 dot products (VNNI/AMX), which this one lacks"


def _int8_verdict(bundle: ModelBundle, backend: str, cpu: CpuFeatures) -> tuple[bool, str]:
    if bundle.optional_component_file(names.UNET, backend, "int8") is None:
        return False, "no int8 files for this backend"
    misses = _gate_misses(bundle, _FILE_BACKEND[backend], "int8")
    if misses is None:
        return False, "the int8 files carry no quality figures"
    if misses:
        return False, f"int8 missed its quality gate at export ({', '.join(misses)})"
    return True, "int8 files within their quality gate at export" + _recipe_note(bundle, backend, cpu)


def choose(bundle: ModelBundle, backend: str, cpu: CpuFeatures | None) -> PrecisionChoice:
    """The precision `precision="auto"` runs `bundle` with on `backend`; `cpu` None: the models run on another device."""
    if cpu is None:
        return PrecisionChoice("fp32", "auto: fp32 (reduced precisions are picked on CPUs only)")
    why_not = []
    if backend == "openvino":
        ok, reason = bf16_verdict(bundle, cpu)
        if ok:
            return PrecisionChoice("bf16", f"auto: {reason}")
        why_not.append(f"not bf16: {reason}")
    ok, reason = _int8_verdict(bundle, backend, cpu)
    if ok:
        return PrecisionChoice("int8", f"auto: {reason}" + (f" ({'; '.join(why_not)})" if why_not else ""))
    why_not.append(f"not int8: {reason}")
    return PrecisionChoice("fp32", f"auto: fp32 ({'; '.join(why_not)})")


def preferred_backend(bundle: ModelBundle, cpu: CpuFeatures) -> str | None:
    """For `backend=None` with `precision="auto"`: OpenVINO when it would run bf16 here, else None (the usual order)."""
    ok, _ = bf16_verdict(bundle, cpu)
    return "openvino" if ok and "openvino" in bundle.backends_present() else None
