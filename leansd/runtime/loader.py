"""`load()`: a model folder -> a ready `Pipeline`.

Reads the bundle, picks the backend, asks the backend layer how to open each component (it chooses the
files), wraps each in its one-verb model class, and picks the pipeline for the folder's kind of model.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from leansd.runtime import backends, cpu_features, precision_choice, safety
from leansd.runtime import manifest as names
from leansd.runtime.adapters import Adapters, WeightMap
from leansd.runtime.backends import LazySession, Session, SessionOptions
from leansd.runtime.bundle import ModelBundle
from leansd.runtime.conditioning import PromptEncoder
from leansd.runtime.depth import DepthEstimator
from leansd.runtime.denoiser import Denoiser
from leansd.runtime.errors import BackendError, ModelFolderError
from leansd.runtime.memory import MemoryPolicy
from leansd.runtime.models import TextEncoder, UNet, VaeDecoder, VaeEncoder
from leansd.runtime.pipeline import Models, Pipeline
from leansd.runtime.settings import GenerationSettings
from leansd.runtime.tokenizer import ClipTokenizer

# Diffusers pipelines whose folders need a task leansd does not run yet (they would load as text-to-image).
_NOT_YET = ("LatentUpscale", "InstructPix2Pix", "ControlNet")
# Called with (component, session) when a session opens; returns the session to use (e.g. one that records calls).
SessionHook = Callable[[str, Session], Session]


def bundled_model_path() -> Path:
    """Where the default model installed with leansd lives."""
    return Path(__file__).resolve().parents[1] / "bundled" / "shapes"


def choose_backend(bundle: ModelBundle, backend: str | None) -> str:
    """The backend asked for, or the first installed one that the folder has files for."""
    if backend is not None:
        return backends.normalize_backend(backend)
    installed = backends.installed_backends()
    present = bundle.backends_present()
    for candidate in installed:
        if candidate in present:
            return candidate
    if not installed:
        raise BackendError("no backend is installed: pip install 'leansd[onnxruntime]' or 'leansd[openvino]'")
    raise ModelFolderError(
        f"{bundle.root} has models for {', '.join(present) or 'no backend'} but only {', '.join(installed)} is installed; "
        "install the matching backend or re-export the model"
    )


def prompt_encoder(bundle: ModelBundle, backend: str, lazy: Callable[[str], LazySession | None], adapters: Adapters,
                   embeddings: Sequence[str | Path] | Mapping[str, str | Path] | None = None) -> PromptEncoder:
    """The folder's tokenizer and text encoder; SDXL's two (its refiner's second only), read at their penultimate layer
    with the second's pooled embedding, as diffusers' SDXL pipelines do. `embeddings`: textual inversions whose words
    the tokenizers learn."""
    sdxl = bundle.has_component(names.TEXT_ENCODER_2, backend)
    pairs = [("tokenizer", names.TEXT_ENCODER)] if not sdxl or bundle.has_component(names.TEXT_ENCODER, backend) else []
    if sdxl:
        pairs.append(("tokenizer_2", names.TEXT_ENCODER_2))
    tokenizers = [ClipTokenizer.from_folder(bundle.root / t) for t, _ in pairs]
    if embeddings:
        widths = [int(bundle.component_config(e).get("hidden_size", 0)) for _, e in pairs]
        adapters.add_embeddings(embeddings, [(e, tok, w) for (_, e), tok, w in zip(pairs, tokenizers, widths)])
    encoders = [TextEncoder(lazy(e)) for _, e in pairs]
    return PromptEncoder(tokenizers, encoders, layer=-2, pooled=True) if sdxl else PromptEncoder(tokenizers, encoders)


def load(
    path: str | Path | None = None,
    backend: str | None = None,
    device: str = "cpu",
    precision: str = "fp32",
    *,
    num_threads: int | None = None,
    low_memory: bool = False,
    cache_dir: str | Path | None = None,
    lora_dir: str | Path | None = None,
    embeddings: Sequence[str | Path] | Mapping[str, str | Path] | None = None,
    **defaults: Any,
) -> Pipeline:
    """Load a model folder (None: the bundled default model) and return a ready `Pipeline`.

    backend: "onnxruntime", "openvino", or None for the first installed one the folder has files for.
    device: "cpu", "auto" (a GPU execution provider / OpenVINO GPU when available, else CPU), or a
        backend device name ("cuda", "dml", "gpu"...).
    precision: "fp32" (exact, the default), "int8" when the folder holds it, "bf16" (OpenVINO on CPUs with native
        bfloat16), or "auto": the fastest of these this CPU runs well and the export measured within its quality
        gate (see `leansd.runtime.precision_choice`); `pipe.precision` and `pipe.precision_reason` say what it picked.
    low_memory: load each model only while it is needed; see `leansd.runtime.memory` for all it changes.
    cache_dir: a folder where the first run keeps its compiled (OpenVINO) or optimized (ONNX Runtime on CPU)
        models, so later runs start in about a second per model instead of re-optimizing; it holds about one
        copy of each model file used.
    lora_dir: a folder of LoRA `.safetensors` files, where `<lora:NAME:0.8>` tags in prompts and names in `loras=`
        are looked up (`NAME.safetensors`).
    embeddings: textual-inversion files (`.safetensors`: diffusers' learned_embeds or AUTOMATIC1111's), as a list
        (each named by its token, or its file name) or {token: file}; prompts then use them by name.
    defaults: generation settings every call starts from (any field of `GenerationSettings`), e.g.
        deep_cache=3 (reuse the UNet's deep features for 2 of every 3 steps; needs `sd-export --deep-cache`),
        guidance_cutoff=0.3, tiny_vae=True (needs `sd-export --tiny-vae`), vae_tiling=True, scheduler="euler_a",
        num_inference_steps=20, loras={"style.safetensors": 0.8} (LoRAs at their multipliers, applied to the
        weights the backend runs; needs a folder exported with a weight map). A call overrides them.
    """
    if path is None:
        path = bundled_model_path()
        if not path.is_dir():
            raise ModelFolderError("the bundled default model is not installed in this copy of leansd; pass a model folder")
    bundle = ModelBundle.open(path)
    precision = precision.strip().lower()
    if precision not in precision_choice.PRECISIONS:
        raise BackendError(f"unknown precision {precision!r}: choose fp32, int8, bf16 or auto")
    cpu = cpu_features.detect() if device.lower() == "cpu" else None
    if precision == "auto" and backend is None and cpu is not None:
        backend = precision_choice.preferred_backend(bundle, cpu)
    chosen = choose_backend(bundle, backend)
    reason = ""
    if precision == "auto":
        picked = precision_choice.choose(bundle, chosen, cpu)
        precision, reason = picked.precision, picked.reason
    options = SessionOptions(device=device, num_threads=num_threads, cache_dir=Path(cache_dir) if cache_dir else None)
    settings = GenerationSettings().merged(**defaults)
    pipe = assemble(bundle, chosen, precision, options, MemoryPolicy(low_memory), settings, lora_dir=lora_dir, embeddings=embeddings)
    pipe.precision_reason = reason
    return pipe


def assemble(
    bundle: ModelBundle, backend: str, precision: str, options: SessionOptions, memory: MemoryPolicy,
    defaults: GenerationSettings = GenerationSettings(), hook: SessionHook | None = None, *,
    lora_dir: str | Path | None = None, embeddings: Sequence[str | Path] | Mapping[str, str | Path] | None = None,
) -> Pipeline:
    """The pipeline for `bundle` on `backend`. `hook` sees every session as it opens (tools that record calls)."""
    kind = bundle.pipeline_class
    if any(tag in kind for tag in _NOT_YET):
        raise ModelFolderError(f"{bundle.root} holds a {kind}, which leansd does not run yet; it runs text-to-image, "
                               "image-to-image, inpainting, depth-to-image and x4 upscaler models")
    channels, latent = bundle.unet_config.get("in_channels", 4), bundle.vae_config.get("latent_channels", 4)
    upscaler = channels == latent + 3 and bundle.unet_config.get("num_class_embeds") is not None
    # 2 x latent + 1: inpainting (latents, mask, masked image latents); latent + 1: depth-to-image (latents, depth map);
    # latent + 3: the x4 upscaler (latents, the RGB image)
    if channels not in (latent, 2 * latent + 1, latent + 1) and not upscaler:
        raise ModelFolderError(f"{bundle.root}: its UNet takes {channels} input channels, neither the VAE's {latent} latent channels "
                               f"nor {2 * latent + 1} (inpainting), {latent + 1} (depth) or {latent + 3} with a noise-level embedding "
                               "(the x4 upscaler): an image-editing model, which leansd does not run yet; it runs text-to-image, "
                               "image-to-image, inpainting, depth-to-image and x4 upscaler models")
    options = replace(options, low_memory=memory.low_memory)  # arenas off; ONNX Runtime streams models cut in parts
    adapters = _adapters(bundle, backend, precision, lora_dir)

    def lazy(component: str, required: bool = True, component_options: SessionOptions = options,
             variant: str = precision) -> LazySession | None:
        if component in _ADAPTABLE:
            component_options = replace(component_options, weights=adapters.weights(component))
        opener = backends.component_opener(bundle, component, backend, variant, component_options, required)
        if opener is None:
            return None
        session = memory.lazy(opener if hook is None else (lambda: hook(component, opener())))
        adapters.register(component, session)
        return session

    # The VAE's activations, the pipeline's largest (1 GB at 512x512 for SD 1.5), are returned after each call.
    transient = replace(options, release_after_run=True)
    denoiser = _denoiser(bundle, backend, precision, memory, lazy)

    # Models with fp32 files only (tiny decoder, safety checker, depth estimator) serve int8 runs too, computing as the
    # int8 files' float operations do (bf16 where the CPU has it natively): in f32 the tiny decoder took twice as long.
    helper_options = replace(options, inference_precision=backends.INT8_FLOAT_PRECISION) if precision == "int8" else options

    def fp32_only(component: str) -> LazySession | None:
        return lazy(component, required=False) or lazy(component, required=False, component_options=helper_options, variant="fp32")

    tiny = fp32_only(names.TINY_VAE_DECODER)
    encoder = lazy(names.VAE_ENCODER, component_options=transient) if bundle.has_component(names.VAE_ENCODER, backend) else None
    checker, estimator = _image_models(bundle, fp32_only)
    models = Models(
        prompt_encoder=prompt_encoder(bundle, backend, lazy, adapters, embeddings),
        denoiser=denoiser,
        vae_decoder=VaeDecoder(lazy(names.VAE_DECODER, component_options=transient), bundle.vae_config),
        vae_encoder=VaeEncoder(encoder, bundle.vae_config) if encoder else None,
        tiny_vae_decoder=VaeDecoder(tiny, bundle.component_config(names.TINY_VAE_DECODER)) if tiny else None,
        safety_checker=checker,
        depth_estimator=estimator,
    )
    return Pipeline(bundle, backend, precision, models, memory, defaults, adapters)


def _denoiser(bundle: ModelBundle, backend: str, precision: str, memory: MemoryPolicy,
              lazy: Callable[..., LazySession | None]) -> Denoiser:
    """The UNet graphs the folder has (whole, deep-cache parts), and their token-merged twins when exported."""
    split = memory.split_guidance(bool((bundle.static_shapes or {}).get("unet_batch")))

    def unets(whole: LazySession | None, *parts: str) -> tuple[UNet | None, ...]:
        sessions = (whole, *(lazy(p, required=False) for p in parts))
        return tuple(UNet(s, bundle.unet_config) if s else None for s in sessions)

    merged = lazy(names.TOKEN_MERGED[names.UNET], required=False)
    return Denoiser(*unets(lazy(names.UNET), names.UNET_DEEP, names.UNET_SHALLOW), split,  # type: ignore[arg-type]
                    *backends.unet_weights(bundle, backend, precision, memory.low_memory),
                    merged=Denoiser(*unets(merged, names.TOKEN_MERGED[names.UNET_DEEP], names.TOKEN_MERGED[names.UNET_SHALLOW]),
                                    split) if merged else None)  # type: ignore[arg-type]


def _image_models(bundle: ModelBundle, fp32_only: Callable[[str], LazySession | None]) -> tuple:
    """The folder's safety checker and depth estimator (each None when it has none)."""
    checker = estimator = None
    session = fp32_only(names.SAFETY_CHECKER) if safety.listed(bundle.manifest) else None
    if session is not None:
        checker = safety.SafetyChecker(session, bundle.root / names.SAFETY_CHECKER, safety.feature_extractor(bundle.root))
    listed = names.DEPTH_ESTIMATOR in ((bundle.manifest or {}).get("components") or {})
    session = fp32_only(names.DEPTH_ESTIMATOR) if listed else None
    if session is not None:
        estimator = DepthEstimator(session, bundle.root / names.FEATURE_EXTRACTOR / "preprocessor_config.json")
    return checker, estimator


# The models whose weights run-time adapters change.
_ADAPTABLE = (names.TEXT_ENCODER, names.TEXT_ENCODER_2, names.UNET, names.UNET_DEEP, names.UNET_SHALLOW, *names.TOKEN_MERGED.values())


def _adapters(bundle: ModelBundle, backend: str, precision: str, lora_dir: str | Path | None) -> Adapters:
    """The pipeline's adapter state: the weight map of the files this backend and precision run."""
    files = backends.files_precision(backend, precision)
    weight_map = WeightMap.read(bundle.root)
    graphs = {}
    if weight_map is not None and files == "fp32":
        for component in _ADAPTABLE:
            path = bundle.optional_component_file(component, backend, files)
            graphs[component] = weight_map.graph(path) if path is not None else None
    refusal = None if files == "fp32" else (
        f"LoRA and embeddings change fp32 weights, and this pipeline runs the {precision} files; load it with precision='fp32'"
        f"{' or bf16' if backend == 'openvino' else ''}, or fuse the LoRA into the model at export (sd-export --lora) and quantize that")
    return Adapters(bundle.root, graphs, weight_map is not None, refusal, lora_dir)
