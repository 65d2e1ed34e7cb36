"""Int8 variants of an exported model folder: calibrate on the fp32 export, quantize per backend, measure, gate.

What each backend gets:

    OpenVINO  unet           hybrid int8 (Optimum Intel's "hybrid" split, done with NNCF directly; recipe "hybrid"): MatMul and
                             embedding weights int8 with float activations (nncf.compress_weights); every other
                             quantizable op, convolutions above all, int8 weights and activations (nncf.quantize,
                             calibrated, transformer model type, SmoothQuant off). The convolution fed by the raw
                             latents (conv_in) stays float: on the test models it was the largest single error
                             (its input's scale follows the noise level), for a negligible share of the compute;
                             keeping it float raised the UNet's PSNR by 2-8 dB.
                             Recipe "weights": int8 MatMul and embedding weights only, convolutions float, float
                             arithmetic; no calibration (`openvino_matmul_weights_int8`, as the deep-cache parts).
                             "auto" (the default) picks it for UNets of 1 B parameters or more (SDXL's 2.6 B, 87 %
                             of it in matrix products): calibrating one records and runs a 10 GB model over dozens
                             of calls at full size, hours on a small CPU. Optimum Intel's default export draws the
                             same 1 B line but gives the convolutions int8 weights too, which OpenVINO's CPU plugin
                             expands into a float copy at compile time (perf/README.md, SDXL section, measured).
              text_encoder,  int8 weights only (nncf.compress_weights, INT8_ASYM, per output channel).
              text_encoder_2 (SDXL),
              vae_encoder,
              vae_decoder
              unet_deep,     int8 MatMul/embedding weights only, convolutions float: the hybrid recipe's
              unet_shallow   uncalibrated half (`openvino_matmul_weights_int8`, `int8.deep_cache_int8` say why).
    ONNX      every model    onnxruntime dynamic quantization (UNet recipe "dynamic", the default): MatMul, Gemm and
                             embedding (Gather) weights int8 per output channel in a 7-bit range (reduce_range:
                             u8 x s8 products cannot saturate on CPUs without VNNI); activations are quantized at
                             run time. Convolutions stay float: dynamic Conv (ConvInteger) ran 2.6x slower than
                             the float kernel on AVX2.
              unet           recipe "static" (`--int8-unet-onnx static`, UNets under 1 B parameters): onnxruntime
                             static quantization in QDQ form, calibrated (min/max): Conv, MatMul and Gemm weights
                             int8 per output channel (7-bit range, as above) and u8 activations, convolutions
                             included; the attention's products of two activations and the first and last
                             convolution (latents in, noise out) stay float. The deep-cache parts stay dynamic.
                             Calibration runs first, one image at a time, and the quantizer loads the model only
                             after (`quantize_static`), so their memory peaks do not add up.

Why dynamic is the ONNX default, and when static pays: static was first measured on AVX2 without VNNI. UNet output
PSNR vs fp32: static 26.5 dB (tiny test model) / 25.2 dB (35 M-parameter UNet), dynamic 57 / 52 dB; whole held-out
generations (image PSNR): static 31-32 dB, dynamic 50-55 dB. One call of the 35 M UNet at 32x32 latents: fp32
190 / 326 ms, dynamic 202 / 295 ms, static 195 / 282 ms (2 / 1 threads): no real speed difference there. On a CPU
with VNNI (2-core Zen 4, AVX512_VNNI; `perf/RESULTS-ort-int8-zen4.md`) the static recipe's integer convolutions
pay: an SD 1.5-architecture UNet call at 512x512 (batch 2) took 5.05 s against fp32's 9.82 s (1.95x) and dynamic's
7.74 s, at 31.2 dB from fp32 (dynamic 49.7 dB; OpenVINO's bf16 on the same CPU 5.18 s, 38.9 dB). Leaving the first
and last convolution float raised it from 29.6 dB. So static is a choice for ONNX Runtime users on VNNI or AMX
CPUs; dynamic stays the default: closer to fp32, no calibration, and as fast elsewhere.

Calibration and measurement data come from the fp32 export itself: the leansd pipeline generates
`CALIBRATION_PROMPTS` (and, separately, `HELD_OUT_PROMPTS`) with `STEPS` steps of the model's own scheduler,
classifier-free guidance and the export's size (an inpainting model inpaints a synthetic picture: `task_inputs`),
and every component's inputs are recorded. The OpenVINO UNet is
calibrated on the calibration runs (every UNet call: early, middle and late noise levels). Each int8 file is then
compared with the fp32 file of the same backend on the held-out runs' inputs (OpenVINO int8 files as the runtime runs
them on this machine: their float operations in bf16 on a CPU with native bf16, else f32), and the held-out generations are
repeated with the int8 variant (final latents and images compared; recorded, not gated).

The gate is a floor on each component's output PSNR against fp32 (20 log10(peak / RMS error), worst held-out
call; `GATES`). It is there to catch quantization that went wrong, not to promise that int8 images equal fp32:

    vae_decoder, vae_encoder  42 dB: RMS error at most ~0.8 % of the output's peak, about one 8-bit level of a
                              decoded image. Weight-only int8 measured 45-56 dB (OpenVINO), 63-101 dB (ONNX).
                              Below the gate the int8 variant keeps the fp32 file for that part.
    text_encoder(_2)          30 dB: int8 measured 35-38 dB (ONNX), 42-49 dB (OpenVINO); saturated u8 x s8
                              arithmetic (8-bit weights on AVX2) or activation-quantized softmax/LayerNorm: 21-23 dB.
    unet                      24 dB: the hybrid recipe measured 27-31 dB on three test models (Optimum Intel's own
                              hybrid export of one of them: 25 dB), dynamic ONNX 45-57 dB; saturated arithmetic
                              22.6 dB.
    A UNet or text encoder below its gate fails the export unless forced.
"""
from __future__ import annotations

import contextlib
import gc
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from leansd.export import components as comp
from leansd.export.errors import ExportError, ParityError

PRECISIONS = ("fp32", "int8")
FILES = {"onnx": ("model.onnx", "model_int8.onnx"), "openvino": ("openvino_model.xml", "openvino_model_int8.xml")}
RUNTIME_BACKEND = {"onnx": "onnxruntime", "openvino": "openvino"}

# Varied subjects, styles and lengths; none of them is reused for the held-out measurement.
CALIBRATION_PROMPTS = (
    "a photograph of an astronaut riding a horse on mars",
    "a watercolor painting of a lighthouse at dusk, soft pastel colours",
    "close-up portrait of an old fisherman with a white beard, dramatic side light, film grain",
    "a bowl of fruit on a wooden table, still life, oil on canvas",
    "a futuristic city skyline at night, neon signs reflected in the wet street, cinematic",
    "a cat asleep on a sunny windowsill",
    "a misty mountain lake in the early morning, 35mm photograph",
    "an isometric illustration of a tiny cozy house, pixel art",
)
HELD_OUT_PROMPTS = (
    "a red sports car parked in the rain at night",
    "a medieval castle on a green hill under a stormy sky, oil painting",
)
STEPS = 8  # denoising steps per prompt (PNDM makes that 9 UNet calls): early, middle and late noise levels
GUIDANCE = 7.5
CALIBRATION_SEED, HELD_OUT_SEED = 1234, 5678
HELD_OUT_UNET_CALLS = 6  # evenly spread over the held-out trajectories
# The static ONNX recipe calibrates on this many UNet calls, evenly spread over the recorded ones: each is one more
# unoptimised UNet run per image. 10 is the count perf/ort_int8_unet.py measured the recipe's quality with.
STATIC_CALIBRATION_CALLS = 10
UNET_RECIPES = ("auto", "hybrid", "weights")  # how the OpenVINO UNet's int8 file is made (see the module docstring)
LARGE_UNET_PARAMETERS = 1_000_000_000  # "auto" quantizes UNets this large weights-only
UNET_RECIPE_HELP = ("how the OpenVINO UNet's int8 file is made: hybrid (int8 weights, and int8 activations in the convolutions, "
                    "calibrated on generations: slow for big models), weights (int8 matrix-product weights only, "
                    "convolutions and arithmetic float, no calibration: minutes), auto (default): hybrid below 1 B "
                    "parameters, weights from there (SDXL)")
ONNX_UNET_RECIPES = ("dynamic", "static")  # how the ONNX UNet's int8 file is made (see the module docstring)
ONNX_UNET_RECIPE_HELP = ("how the ONNX UNet's int8 file is made: dynamic (default: int8 matrix-product weights, activations "
                         "quantized at run time, convolutions float; closest to fp32) or static (int8 activations too, in the "
                         "convolutions as well, calibrated on generations: about 2x fp32's UNet step on CPUs with VNNI or AMX, "
                         "about 30 dB from fp32 instead of 50; UNets under 1 B parameters; the whole SD 1.5 export at 512x512 with it "
                         "peaked at 9.3 GB)")


@dataclass(frozen=True)
class Gate:
    """The lowest accepted PSNR (dB) of an int8 component's output against its fp32 file, and what a miss does."""

    min_psnr_db: float
    on_miss: str  # "fail" the export, or keep "fp32" for this component in the int8 variant


GATES = {
    "unet": Gate(24.0, "fail"),
    "text_encoder": Gate(30.0, "fail"),
    "text_encoder_2": Gate(30.0, "fail"),
    "vae_encoder": Gate(42.0, "fp32"),
    "vae_decoder": Gate(42.0, "fp32"),
}


def parse_precisions(precisions: str | Sequence[str]) -> tuple[str, ...]:
    """("fp32",) or ("fp32", "int8") from "fp32", "int8", "fp32,int8" or a sequence; fp32 is always exported."""
    names = [p.strip() for p in (precisions.split(",") if isinstance(precisions, str) else precisions) if p.strip()]
    unknown = [p for p in names if p not in PRECISIONS]
    if unknown or not names:
        raise ExportError(f"unknown precision {unknown[0] if unknown else '(none)'!r}; choose fp32, int8 or fp32,int8")
    return ("fp32", "int8") if "int8" in names else ("fp32",)


def check_unet_recipe(name: str) -> str:
    """`name` if it is one of `UNET_RECIPES`; else an error naming the choices."""
    if name not in UNET_RECIPES:
        raise ExportError(f"int8 UNet recipe {name!r} is unknown: choose {', '.join(UNET_RECIPES)}")
    return name


def check_onnx_unet_recipe(name: str, root: Path | None = None) -> str:
    """`name` if it is one of `ONNX_UNET_RECIPES` (and, with `root`, usable for that fp32 export's UNet); else an error."""
    if name not in ONNX_UNET_RECIPES:
        raise ExportError(f"ONNX int8 UNet recipe {name!r} is unknown: choose {', '.join(ONNX_UNET_RECIPES)}")
    data = None if root is None else root / "unet" / (FILES["onnx"][0] + "_data")  # sd-export's one weights file
    if name == "static" and data is not None and data.is_file() and data.stat().st_size >= 4 * LARGE_UNET_PARAMETERS:
        raise ExportError("the static ONNX int8 UNet is for UNets under 1 B parameters (its quantizer holds every weight, and "
                          "calibrating a large UNet takes hours); use --int8-unet-onnx dynamic")
    return name


def openvino_unet_recipe(root: Path, requested: str = "auto") -> str:
    """"hybrid" or "weights" for the OpenVINO UNet of the fp32 export at `root`; "auto" looks at its parameter count
    (its weights file holds fp32 values: 4 bytes each)."""
    if check_unet_recipe(requested) != "auto":
        return requested
    weights = root / "unet" / Path(FILES["openvino"][0]).with_suffix(".bin")
    return "weights" if weights.is_file() and weights.stat().st_size >= 4 * LARGE_UNET_PARAMETERS else "hybrid"


def check_available(backends: Sequence[str]) -> None:
    """Fail early, before any slow step, when a quantization library is missing."""
    import importlib.util

    needs = {"openvino": ("nncf", "nncf"), "onnx": ("onnxruntime.quantization", "onnxruntime")}
    for backend in backends:
        module, package = needs[backend]
        if importlib.util.find_spec(module.split(".")[0]) is None:
            raise ExportError(f"int8 for {backend} needs {package}: pip install {package} (or pip install 'leansd[export]')")


# -- recording what the pipeline feeds each model ---------------------------------------------------------------


@dataclass
class Recording:
    """Every call's inputs (and outputs) per component, and the generated images, of some pipeline runs."""

    inputs: dict[str, list[dict[str, np.ndarray]]] = field(default_factory=lambda: {c: [] for c in GATES})
    outputs: dict[str, list[dict[str, np.ndarray]]] = field(default_factory=lambda: {c: [] for c in GATES})
    images: list[np.ndarray] = field(default_factory=list)


class _RecordingSession:
    def __init__(self, session: Any, inputs: list, outputs: list) -> None:
        self._session, self._inputs, self._outputs = session, inputs, outputs

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        result = self._session.run(feeds)
        self._inputs.append({k: np.array(v, copy=True) for k, v in feeds.items()})
        self._outputs.append({k: np.array(v, copy=True) for k, v in result.items()})
        return result


@dataclass(frozen=True)
class RunPlan:
    """How the recorded generations run: image size, images per call (a static export's batch) and steps."""

    height: int
    width: int
    batch: int = 1
    steps: int = STEPS


def record(root: Path, backend: str, precision: str, prompts: Sequence[str], seed: int, plan: RunPlan) -> Recording:
    """Generate `prompts` with the leansd pipeline on `root` and record every model call.

    Prompts go `plan.batch` at a time (a static export's batch); group i uses seed `seed + i`.
    """
    from leansd.runtime.backends import SessionOptions
    from leansd.runtime.bundle import ModelBundle
    from leansd.runtime.loader import assemble
    from leansd.runtime.memory import MemoryPolicy

    rec = Recording()

    def recorded(component: str, session: Any) -> Any:
        return _RecordingSession(session, rec.inputs[component], rec.outputs[component]) if component in rec.inputs else session

    pipe = assemble(ModelBundle.open(root), RUNTIME_BACKEND[backend], precision, SessionOptions(), MemoryPolicy(), hook=recorded)
    try:
        task = task_inputs(pipe, plan)
        for i in range(0, len(prompts), plan.batch):
            group = [prompts[(i + j) % len(prompts)] for j in range(plan.batch)]
            out = pipe(group, num_inference_steps=plan.steps, guidance_scale=GUIDANCE, height=plan.height, width=plan.width,
                       seed=seed + i, output_type="np", **task)
            rec.images.append(np.asarray(out.images))
    finally:
        pipe.close()
    # The VAE encoder sees images: the decoder's outputs (in [-1, 1]) are realistic ones. Its recorded outputs (an
    # image-to-image model encodes its input image) belong to other inputs, so they go.
    rec.inputs["vae_encoder"] = [{"sample": np.clip(o["sample"], -1.0, 1.0).astype(np.float32)} for o in rec.outputs["vae_decoder"]]
    rec.outputs["vae_encoder"] = []
    return rec


def task_inputs(pipe: Any, plan: RunPlan) -> dict[str, np.ndarray]:
    """What the recorded generations add to the prompt: nothing for text-to-image UNets; an inpainting UNet (which
    takes a mask and a masked image beside the latents) inpaints the middle quarter of a smooth synthetic picture;
    an image-to-image-only model (SDXL's refiner) refines that picture at its default strength."""
    h, w = plan.height, plan.width
    y, x = np.mgrid[0:h, 0:w].astype(np.float32) / max(h, w)
    image = np.stack([x, y, 1.0 - x * y], axis=-1).astype(np.float32)
    if pipe.unet.in_channels == pipe.models.vae_decoder.latent_channels:
        return {"image": image} if pipe.bundle.pipeline_class.endswith("Img2ImgPipeline") else {}
    if pipe.unet.in_channels == pipe.models.vae_decoder.latent_channels + 1:  # depth-to-image: a ramp, near at the bottom
        return {"image": image, "depth_map": y}
    mask = np.zeros((h, w), np.float32)
    mask[h // 4 : h - h // 4, w // 4 : w - w // 4] = 1.0
    return {"image": image, "mask_image": mask}


def spread(items: list, count: int) -> list:
    """`count` items evenly spread over `items` (first and last included), or all of them if fewer."""
    if len(items) <= count:
        return list(items)
    return [items[round(i * (len(items) - 1) / (count - 1))] for i in range(count)]


# -- quantizers --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_nncf() -> Iterator[None]:
    """NNCF's log lines and progress bars (drawn on stdout) off; the exporter's own progress bar says what runs."""
    import logging

    import nncf

    nncf.set_log_level(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def _weighted_matmuls(model: Any) -> list[str]:
    """Names of the MatMuls with a constant operand and the embedding Gathers (constant table) of an OpenVINO model."""
    passthrough = {"Convert", "Reshape", "Transpose", "FakeQuantize"}  # ops between a weight and its MatMul

    def constant_behind(port: Any) -> bool:
        node = port.get_node()
        while node.get_type_name() in passthrough and node.get_input_size():
            node = node.input_value(0).get_node()
        return node.get_type_name() == "Constant"

    names = []
    for op in model.get_ops():
        kind = op.get_type_name()
        if kind == "MatMul" and any(constant_behind(op.input_value(i)) for i in range(2)):
            names.append(op.get_friendly_name())
        elif kind == "Gather" and op.input_value(0).get_element_type().is_real() and constant_behind(op.input_value(0)):
            names.append(op.get_friendly_name())
    return names


def _input_convolutions(model: Any) -> list[str]:
    """Names of the convolutions fed straight by a model input (the UNet's conv_in)."""
    names = []
    for op in model.get_ops():
        if op.get_type_name() == "Convolution":
            node = op.input_value(0).get_node()
            while node.get_type_name() in {"Convert", "Reshape"} and node.get_input_size():
                node = node.input_value(0).get_node()
            if node.get_type_name() == "Parameter":
                names.append(op.get_friendly_name())
    return names


def openvino_weights_int8(src: Path, dst: Path) -> None:
    """int8 weights (asymmetric, per output channel) for every MatMul, embedding and convolution."""
    import nncf
    import openvino as ov

    with _quiet_nncf():
        model = nncf.compress_weights(ov.Core().read_model(str(src)), mode=nncf.CompressWeightsMode.INT8_ASYM)
    ov.save_model(model, str(dst), compress_to_fp16=False)


def _compress_matmul_weights(model: Any) -> Any:
    """The model with int8 weights (asymmetric, per output channel) in its MatMuls and embeddings; convolutions untouched."""
    import nncf

    return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM, ignored_scope=nncf.IgnoredScope(types=["Convolution"]))


def openvino_matmul_weights_int8(src: Path, dst: Path) -> None:
    """int8 weights for the MatMuls and embeddings only (the hybrid recipe's weight-only half, no calibration); the
    convolutions keep their float weights.

    OpenVINO's CPU plugin keeps int8 MatMul weights as they are and widens them inside its kernels, but expands int8
    convolution weights into a float copy when it compiles. On the SD 1.5 UNet's deep-cache part (batch 2, 512x512,
    Zen 4, no page release; perf/README.md), against the fp32 file: every weight int8 took compiling from 3.2 to 12.9 s
    (bf16) and left 3 GB of expanded weights resident; MatMul weights alone compiled in 2.2 s, peaked at 4.14 GB against
    5.13 GB (bf16) and 5.34 against 6.84 GB (f32), and ran a call as fast (bf16) or faster (f32: 7.2 against 8.3 s)."""
    import openvino as ov

    with _quiet_nncf():
        model = _compress_matmul_weights(ov.Core().read_model(str(src)))
    ov.save_model(model, str(dst), compress_to_fp16=False)


def openvino_hybrid_int8(src: Path, dst: Path, calibration: list[dict[str, np.ndarray]]) -> None:
    """MatMul/embedding weights to int8 (weights only); then convolutions etc. quantized, weights and activations."""
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    with _quiet_nncf():
        model = ov.Core().read_model(str(src))
        weight_only = _weighted_matmuls(model)
        float_convs = _input_convolutions(model)
        model = _compress_matmul_weights(model)
        model = nncf.quantize(
            model,
            nncf.Dataset(calibration),
            preset=nncf.QuantizationPreset.MIXED,  # symmetric weights, asymmetric activations
            model_type=nncf.ModelType.TRANSFORMER,
            subset_size=len(calibration),
            ignored_scope=nncf.IgnoredScope(names=weight_only + float_convs, validate=False),
            # SmoothQuant would rescale the MatMuls' inputs, but those keep float activations here.
            advanced_parameters=AdvancedQuantizationParameters(smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1)),
        )
    ov.save_model(model, str(dst), compress_to_fp16=False)


def onnx_dynamic_int8(src: Path, dst: Path) -> None:
    """onnxruntime dynamic quantization of MatMul/Gemm weights and embedding tables: int8 per output channel, 7-bit range.

    The 7-bit range (reduce_range) keeps the u8 x s8 products of CPUs without VNNI from saturating.
    Convolutions stay float: their dynamic form (ConvInteger) is several times slower than the float kernel.
    Models over 2 GB (external data) are quantized part by part (`quantize_parts`: the whole-file quantizer holds
    every weight, which SDXL's UNet does not fit in 24 GB); the result gets one `<name>_data` file when it is large.
    """
    from leansd.export import quantize_parts

    quantize_parts.dynamic_int8(src, dst)


def onnx_static_int8(src: Path, dst: Path, calibration: list[dict[str, np.ndarray]]) -> None:
    """onnxruntime static quantization in QDQ form, calibrated (min/max) on `calibration`: every Conv, MatMul and Gemm
    with a constant weight gets int8 weights per output channel in a 7-bit range and u8 activations; the attention's
    products of two activations stay float.

    The 7-bit range again keeps CPUs without VNNI from saturating, so the file runs right on any CPU; there it is no
    faster than fp32 (measured on AVX2), on VNNI and AMX CPUs about twice as fast (see the module docstring).
    """
    from leansd.export import quantize_static

    quantize_static.static_int8(src, dst, spread(calibration, STATIC_CALIBRATION_CALLS))


def method(component: str, backend: str, unet_recipe: str = "hybrid", onnx_recipe: str = "dynamic") -> str:
    """One line saying how a component's int8 file is made (recorded in the manifest)."""
    if backend == "onnx" and component == "unet" and onnx_recipe == "static":
        return ("onnxruntime static QDQ: Conv/MatMul/Gemm weights int8 per channel (7-bit), activations u8 with ranges "
                f"calibrated (min/max) on {STATIC_CALIBRATION_CALLS} of the recorded UNet calls, evenly spread; attention products float")
    if backend == "onnx":
        return "onnxruntime dynamic: MatMul/Gemm/Gather weights int8 per channel (7-bit), activations quantized at run time"
    if component == "unet" and unet_recipe == "hybrid":
        return "NNCF hybrid: MatMul/embedding weights int8; other ops int8 weights and activations (calibrated); conv_in float"
    if component in ("unet", *comp.DEEP_CACHE_COMPONENTS):  # the UNet's "weights" recipe and the deep-cache parts
        return "NNCF weight compression of MatMul/embedding weights: int8 asymmetric, per output channel; convolutions float"
    return "NNCF weight compression: int8 asymmetric, per output channel"


def _static_source(src: Path) -> contextlib.AbstractContextManager[Path]:
    """What the static ONNX recipe quantizes: the UNet's graph with fused attention. The export writes one with the
    UNet's streaming parts; without them a temporary one is written beside `src` (sharing its weights file) and
    removed afterwards. The fused graph is what perf/ort_int8_unet.py measured, and its calibration never holds the
    attention's score matrices (SD 1.5 at 512x512: 4096 x 4096 per head, about 1 GB a layer per call), which took
    a full-size export of the plain graph out of memory."""
    from leansd.export import attention

    fused = src.with_name(f"{src.stem}.fused.onnx")
    return contextlib.nullcontext(fused) if fused.is_file() else attention.rewritten_copy(src, attention.fuse_attention, "calibration")


def quantize_component(component: str, backend: str, src: Path, dst: Path, calibration: list[dict[str, np.ndarray]],
                       unet_recipe: str = "hybrid", onnx_recipe: str = "dynamic") -> None:
    """Write `component`'s int8 file `dst` from its fp32 file `src` by the backend's recipe (the module docstring;
    `method` names it); only the calibrated recipes read `calibration`."""
    if backend == "onnx" and component == "unet" and onnx_recipe == "static":
        onnx_static_int8(src, dst, calibration)
    elif backend == "onnx":
        onnx_dynamic_int8(src, dst)
    elif component == "unet" and unet_recipe == "hybrid":
        openvino_hybrid_int8(src, dst, calibration)
    elif component in ("unet", *comp.DEEP_CACHE_COMPONENTS):  # the "weights" recipe and the deep-cache parts, as `method`
        openvino_matmul_weights_int8(src, dst)
    else:
        openvino_weights_int8(src, dst)


# -- measuring ---------------------------------------------------------------------------------------------------


def run_all(backend: str, path: Path, feeds: list[dict[str, np.ndarray]], inference_precision: str = "f32") -> list[dict[str, np.ndarray]]:
    """Run one model file on every feed (one compiled model / session for all); OpenVINO in `inference_precision`."""
    if backend == "onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        wanted = [i.name for i in session.get_inputs()]
        return [dict(zip(names, session.run(names, {k: f[k] for k in wanted}))) for f in feeds]
    import openvino as ov

    from leansd.export.verify import openvino_errors

    with openvino_errors(path):
        compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": inference_precision})
        request = compiled.create_infer_request()
        results = []
        for f in feeds:
            out = request.infer(f)
            results.append({port.get_any_name(): np.array(out[port], copy=True) for port in compiled.outputs})
    return results


def compare(reference: list[dict[str, np.ndarray]], candidate: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """Worst-call max-abs, max-rel and PSNR (dB, against each call's peak) of `candidate` against `reference`."""
    from leansd.export.verify import measure

    worst = {"max_abs": 0.0, "max_rel": 0.0, "psnr_db": math.inf}
    for ref, got in zip(reference, candidate):
        p = measure(ref, got, math.inf)
        worst = {"max_abs": max(worst["max_abs"], p.max_abs), "max_rel": max(worst["max_rel"], p.max_rel), "psnr_db": min(worst["psnr_db"], p.psnr_db)}
    return worst


# -- the int8 stage of an export ---------------------------------------------------------------------------------


@dataclass
class Int8Result:
    """What the int8 stage adds to `leansd.json`."""

    components: dict[str, dict[str, str]]  # component -> backend -> relative path of the int8 variant's file
    parity: dict[str, dict[str, dict[str, Any]]]  # component (and "pipeline") -> backend -> figures
    settings: dict[str, Any]


def build(
    root: Path,
    backends: Sequence[str],
    plan: RunPlan,
    *,
    components: Sequence[str] = comp.COMPONENTS,
    force: bool = False,
    unet_recipe: str = "hybrid",
    onnx_unet_recipe: str = "dynamic",
    step: Callable[[str], None] = lambda what: None,
    write_provisional_manifest: Callable[[dict[str, Any]], None],
) -> Int8Result:
    """Write the int8 files of `components` (for SDXL also text_encoder_2; the refiner has no text_encoder) for every
    backend into `root` (an fp32 export) and measure them.

    `write_provisional_manifest(components)` must write a `leansd.json` that maps each component/backend/precision
    to its file, so the runtime can load the int8 variant for the whole-pipeline check.
    `unet_recipe`: "hybrid" or "weights" for the OpenVINO UNet (`openvino_unet_recipe` resolves "auto");
    `onnx_unet_recipe`: "dynamic" or "static" for the ONNX UNet.
    Raises `ParityError` when a component misses its gate (unless `force`).
    """
    recorder = "openvino" if "openvino" in backends else "onnx"
    unet_calibration: list[dict[str, np.ndarray]] = []
    if calibrates(backends, unet_recipe, onnx_unet_recipe):  # only the UNet's hybrid (OpenVINO) and static (ONNX) recipes
        step("recording calibration runs")
        unet_calibration = record(root, recorder, "fp32", CALIBRATION_PROMPTS, CALIBRATION_SEED, plan).inputs["unet"]
    step("recording held-out runs")
    held_out = record(root, recorder, "fp32", HELD_OUT_PROMPTS, HELD_OUT_SEED, plan)
    held_feeds = {c: spread(held_out.inputs[c], HELD_OUT_UNET_CALLS) if c == "unet" else held_out.inputs[c] for c in components}
    # The recorder's fp32 outputs are the reference on its own backend: compiling the fp32 UNet once more just to rerun
    # the same calls took SDXL's stage from 13.9 to 21.9 GiB and twice the time.
    recorded_refs = {c: spread(held_out.outputs[c], HELD_OUT_UNET_CALLS) if c == "unet" else held_out.outputs[c]
                     for c in components if held_out.outputs[c]}
    gc.collect()

    files: dict[str, dict[str, str]] = {c: {} for c in components}
    parity: dict[str, dict[str, dict[str, Any]]] = {c: {} for c in components}
    for backend in backends:
        misses = []
        for component in components:
            step(f"{component}: {backend} int8")
            reference = recorded_refs.get(component) if backend == recorder else None
            files[component][backend], parity[component][backend], miss = _quantize_and_measure(
                root, component, backend, held_feeds[component], reference, unet_calibration, unet_recipe, onnx_unet_recipe, force)
            misses += [miss] if miss else []
        if misses:
            raise ParityError(
                f"int8 misses its quality gate against fp32: {'; '.join(misses)} (output PSNR); nothing was written. "
                "Export fp32 only, or pass --force-int8 to keep int8 files below the gate"
            )

    write_provisional_manifest(files)
    pipeline: dict[str, dict[str, Any]] = {}
    for backend in backends:
        step(f"whole held-out generation: {backend} int8")
        pipeline[backend] = {"int8": compare_generations(root, backend, held_out, plan)}
    parity["pipeline"] = pipeline
    settings = {
        "calibration_prompts": len(CALIBRATION_PROMPTS) if calibrates(backends, unet_recipe, onnx_unet_recipe) else 0,
        "held_out_prompts": len(HELD_OUT_PROMPTS),
        "steps": plan.steps,
        "guidance_scale": GUIDANCE,
        "size": [plan.height, plan.width],
        **({"openvino_unet_recipe": unet_recipe} if "openvino" in backends else {}),
        **({"onnx_unet_recipe": onnx_unet_recipe} if "onnx" in backends else {}),
        "unet_calibration_calls": len(unet_calibration),
        "held_out_unet_calls": len(held_feeds["unet"]),
        "gates_min_psnr_db": {c: GATES[c].min_psnr_db for c in components},
    }
    return Int8Result(files, parity, settings)


def _quantize_and_measure(
    root: Path,
    component: str,
    backend: str,
    feeds: list[dict[str, np.ndarray]],
    reference: list[dict[str, np.ndarray]] | None,
    calibration: list[dict[str, np.ndarray]],
    unet_recipe: str,
    onnx_recipe: str,
    force: bool,
) -> tuple[str, dict[str, Any], str | None]:
    """Quantize one component for one backend and hold it to its gate against fp32 on `feeds` (`reference`: fp32's
    outputs where already known, else computed here, before the int8 model exists, so only one is in memory at a time).

    Returns the file the runtime should use (relative to `root`), the parity record, and a miss message or None."""
    fp32_name, int8_name = FILES[backend]
    src, dst = root / component / fp32_name, root / component / int8_name
    if reference is None:
        reference = run_all(backend, src, feeds)
        gc.collect()
    with _static_source(src) if onnx_recipe == "static" and component == "unet" else contextlib.nullcontext(src) as source:
        quantize_component(component, backend, source, dst, calibration, unet_recipe, onnx_recipe)
    gc.collect()
    # The int8 file as the runtime runs it: on OpenVINO its float operations in bf16 where the CPU has it natively.
    floats = int8_float_precision() if backend == "openvino" else "f32"
    figures = compare(reference, run_all(backend, dst, feeds, floats))
    gate = GATES[component]
    passed, uses, miss = figures["psnr_db"] >= gate.min_psnr_db, "int8", None
    if not passed and not force:
        if gate.on_miss == "fp32":
            uses = "fp32"
            _remove_model(dst)
        else:
            miss = f"{component} ({backend}) {figures['psnr_db']:.1f} dB < {gate.min_psnr_db:g} dB"
    entry = {"int8": {**figures, "min_psnr_db": gate.min_psnr_db, "passed": passed, "uses": uses,
                      "method": method(component, backend, unet_recipe, onnx_recipe), "float_operations_in": floats}}
    return f"{component}/{int8_name if uses == 'int8' else fp32_name}", entry, miss


def calibrates(backends: Sequence[str], unet_recipe: str, onnx_recipe: str = "dynamic") -> bool:
    """Whether `build` records calibration runs: for the OpenVINO UNet's hybrid recipe and the ONNX UNet's static one."""
    return ("openvino" in backends and unet_recipe == "hybrid") or ("onnx" in backends and onnx_recipe == "static")


def compare_generations(root: Path, backend: str, reference: Recording, plan: RunPlan) -> dict[str, Any]:
    """Repeat the held-out generations with the int8 variant; compare final latents and images with fp32."""
    rec = record(root, backend, "int8", HELD_OUT_PROMPTS, HELD_OUT_SEED, plan)
    latents = compare(reference.inputs["vae_decoder"], rec.inputs["vae_decoder"])
    images = compare([{"image": i} for i in reference.images], [{"image": i} for i in rec.images])
    return {"latents": latents, "images": images}


def int8_float_precision() -> str:
    """What the runtime computes an OpenVINO int8 file's float operations in on this machine."""
    from leansd.runtime.backends import INT8_FLOAT_PRECISION
    from leansd.runtime.backends.openvino import cpu_precision_hint

    return cpu_precision_hint(INT8_FLOAT_PRECISION)


def _remove_model(path: Path) -> None:
    for p in (path, path.with_suffix(".bin"), path.with_name(path.name + "_data")):
        p.unlink(missing_ok=True)
