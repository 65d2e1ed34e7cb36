"""Run an exported component next to its PyTorch original and measure how far apart they are.

Metrics, over all outputs of a component (the worst output counts):
  max_abs  largest absolute difference;
  max_rel  max_abs divided by the largest magnitude of the reference output (scale-free, so one tolerance fits
           text embeddings of magnitude ~30 and images in [-1, 1]);
  psnr_db  20 * log10(max |reference| / RMS error), capped at 200 dB (an exact match).
An export passes when max_rel <= tolerance. The default, 1e-3, is ~100x what fp32 ONNX Runtime and
OpenVINO CPU measure on SD 1.5 and the tiny test models (~1e-6 to 1e-5), yet it catches a wrong graph,
a wrong input name or fp16/bf16 arithmetic sneaking in.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from leansd.export import components as comp
from leansd.export.errors import ExportError, ParityError

DEFAULT_TOLERANCE = 1e-3
PSNR_CAP_DB = 200.0
VERIFY_SEED = 1  # the seed of the inputs every exported file is checked on


@dataclass(frozen=True)
class Parity:
    """Measured error of one component on one backend, and the tolerance it was held to."""

    max_abs: float
    max_rel: float
    psnr_db: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.max_rel <= self.tolerance

    def to_json(self) -> dict[str, float]:
        return {"max_abs": self.max_abs, "max_rel": self.max_rel, "psnr_db": self.psnr_db, "tolerance": self.tolerance}


def measure(reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray], tolerance: float) -> Parity:
    """Compare two output dicts with the same names and shapes (see the module docstring for the metrics)."""
    max_abs, max_rel, psnr = 0.0, 0.0, PSNR_CAP_DB
    for name, ref in reference.items():
        if name not in candidate:
            raise ParityError(f"the exported model has no output '{name}' (it has {sorted(candidate)}); the export is broken")
        got = np.asarray(candidate[name], dtype=np.float64)
        ref = np.asarray(ref, dtype=np.float64)
        if got.shape != ref.shape:
            raise ParityError(f"output '{name}' has shape {got.shape}, expected {ref.shape}; the export is broken")
        err = np.abs(got - ref)
        worst = float(err.max()) if np.isfinite(err).all() else math.inf  # NaN must fail, not compare False
        peak = float(np.abs(ref).max()) or 1.0
        rms = float(np.sqrt(np.mean(err**2)))
        max_abs = max(max_abs, worst)
        max_rel = max(max_rel, worst / peak)
        psnr = min(psnr, 20 * math.log10(peak / rms) if rms > 0 else PSNR_CAP_DB)
    if not math.isfinite(max_abs):
        max_abs = max_rel = math.inf
        psnr = 0.0
    return Parity(float(f"{max_abs:.3g}"), float(f"{max_rel:.3g}"), round(psnr, 2), tolerance)


def verification_inputs(component: str, info: comp.ModelInfo, static: Mapping[str, int] | None) -> dict[str, np.ndarray]:
    """The inputs every exported file of a component is checked on: the static size, else one image at the model's size
    (at most 64x64 latents, `components.SAMPLE_MAX_LATENT`)."""
    side = info.sample_latent_side * info.vae_scale_factor
    at = {k: static[k] for k in ("batch", "height", "width")} if static else {"batch": 1, "height": side, "width": side}
    return comp.make_inputs(component, info, seed=VERIFY_SEED, **at)


def run_torch(component: str, module: Any, feeds: Mapping[str, np.ndarray], info: comp.ModelInfo | None = None) -> dict[str, np.ndarray]:
    """Run a `components.wrap` wrapper on numpy inputs; outputs keyed by their exported names."""
    import torch

    with torch.no_grad():
        out = module(*(torch.from_numpy(feeds[n]) for n in comp.input_names(component, info)))
    out = out if isinstance(out, tuple) else (out,)
    return {name: t.detach().numpy() for name, t in zip(comp.output_names(component, info), out)}


def run_onnxruntime(path: Path, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run an ONNX file on ONNX Runtime's CPU provider."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # Idle threads must not spin: PyTorch runs next, on the same cores.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    # A graph drops inputs nothing depends on (the shallow UNet part of a model without attention there).
    declared = {i.name for i in session.get_inputs()}
    return dict(zip(names, session.run(names, {k: v for k, v in feeds.items() if k in declared})))


@contextlib.contextmanager
def openvino_errors(path: Path) -> Iterator[None]:
    """Turn OpenVINO's RuntimeError while compiling or running `path` into an ExportError that keeps OpenVINO's reason
    and names the fix: a oneDNN instruction-set cap (ONEDNN_MAX_CPU_ISA) withholds kernels OpenVINO picks for this CPU,
    its int8-compressed weights' among them."""
    from leansd.runtime import cpu_features
    from leansd.runtime.backends.openvino import failure_reason

    try:
        yield
    except RuntimeError as exc:
        cap = cpu_features.isa_cap()
        if cap:
            raise ExportError(f"OpenVINO could not run {path} with ONEDNN_MAX_CPU_ISA={cap} set ({failure_reason(exc)}); "
                              "the cap withholds kernels OpenVINO chose for this CPU: unset ONEDNN_MAX_CPU_ISA and export again") from exc
        raise ExportError(f"OpenVINO could not run {path} ({failure_reason(exc)}); export for ONNX Runtime only "
                          "(--backend onnx), or try another OpenVINO version") from exc


def run_openvino(path: Path, feeds: Mapping[str, np.ndarray], inference_precision: str = "f32") -> dict[str, np.ndarray]:
    """Run an OpenVINO IR (or ONNX file) on the CPU plugin in f32 (CPUs with bf16/AMX units would otherwise default
    to bf16), or in the `inference_precision` asked for."""
    import openvino as ov

    with openvino_errors(path):
        compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": inference_precision})
        declared = {name for port in compiled.inputs for name in port.get_names()}
        result = compiled({k: v for k, v in feeds.items() if k in declared})
    # Every name of each output: compiling may attach an internal tensor name that get_any_name() prefers.
    return {name: np.asarray(result[out]) for out in compiled.outputs for name in out.get_names()}


RUNNERS = {"onnx": run_onnxruntime, "openvino": run_openvino}


def bf16_capable() -> bool:
    """Whether OpenVINO can run bf16 here: installed, on a CPU with native bfloat16 arithmetic (AVX512_BF16, AMX)."""
    from leansd.runtime import cpu_features

    return cpu_features.openvino_bf16()


def measure_bf16(path: Path, feeds: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], min_psnr_db: float) -> dict[str, Any]:
    """`precision="bf16"` (OpenVINO computing the fp32 file in bfloat16) against PyTorch fp32, held to `min_psnr_db`:
    the figure `precision="auto"` reads before it picks bf16. Recorded, never fatal: fp32 stays available."""
    parity = measure(reference, run_openvino(path, feeds, "bf16"), 1.0)
    return {"max_abs": parity.max_abs, "psnr_db": parity.psnr_db, "min_psnr_db": min_psnr_db, "passed": parity.psnr_db >= min_psnr_db,
            "uses": "fp32 files, OpenVINO INFERENCE_PRECISION_HINT bf16"}


def check(component: str, backend: str, path: Path, feeds: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], tolerance: float) -> Parity:
    """Run the exported file on `feeds`, compare with `reference`; raise `ParityError` past the tolerance."""
    parity = measure(reference, RUNNERS[backend](path, feeds), tolerance)
    if not parity.passed:
        raise ParityError(
            f"{component} ({backend}) differs from PyTorch by {parity.max_rel:.3g} (relative; max-abs {parity.max_abs:.3g}, "
            f"PSNR {parity.psnr_db} dB), over the tolerance {tolerance:g}; nothing was written. "
            "Check the exporter versions, or pass a larger --tolerance if this is expected"
        )
    return parity
