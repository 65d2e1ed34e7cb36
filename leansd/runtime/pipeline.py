"""The one denoising loop, in numbered stages, and `load()` that builds it from a model folder.

    tokenize -> encode text -> plan timesteps -> initial latents -> [scale -> UNet -> guidance -> step] x N
    -> decode -> images

Keyword names follow diffusers' `StableDiffusionPipeline.__call__`, and with the same seed the initial
latents and every sampler's noise are the ones diffusers draws from `torch.Generator("cpu").manual_seed(seed)`.
"""
from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from leansd.runtime import backends
from leansd.runtime.backends import SessionOptions
from leansd.runtime.bundle import ModelBundle
from leansd.runtime.errors import BackendError, Cancelled, InvalidInputError, ModelFolderError
from leansd.runtime.image import decoded_to_unit, image_to_model_input, load_image, unit_array_to_model_input, unit_to_pil
from leansd.runtime.models import LazySession, TextEncoder, UNet, VaeDecoder, VaeEncoder
from leansd.runtime.rng import NoiseSource, TorchCompatibleGenerator
from leansd.runtime.schedulers import get_scheduler
from leansd.runtime.tokenizer import ClipTokenizer

TINY_VAE = "vae_decoder_tiny"  # the optional TAESD decoder written by `sd-export --tiny-vae`
UNET_PARTS = "unet_parts"  # the index of the UNet's weight-streaming parts written by `sd-export` (ONNX)
# Called after every step with (step index, number of steps, latents, denoised estimate); return False to cancel.
StepCallback = Callable[[int, int, np.ndarray, np.ndarray], "bool | None"]
OUTPUT_TYPES = ("pil", "np", "latent")


@dataclass
class PipelineOutput:
    """Generated images: a list of PIL images, a float32 NHWC array in [0, 1], or latents (per `output_type`)."""

    images: list[Image.Image] | np.ndarray
    seed: int | None
    scheduler: str
    num_inference_steps: int
    guidance_scale: float
    timings: dict[str, float] = field(default_factory=dict)


def _as_list(prompt: str | Sequence[str], what: str) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    items = list(prompt)
    if not items or not all(isinstance(p, str) for p in items):
        raise InvalidInputError(f"{what} must be a string or a non-empty list of strings")
    return items


class Pipeline:
    """Text-to-image and image-to-image over one model folder, with one backend."""

    def __init__(
        self, bundle: ModelBundle, backend: str, options: SessionOptions, precision: str = "fp32", deep_cache: int | None = None,
        vae_tiling: bool | None = None, tiny_vae: bool = False, guidance_cutoff: float = 1.0,
    ):
        self.bundle = bundle
        self.backend = backend
        self.precision = precision
        self.options = options
        self.low_memory = options.low_memory
        self.show_progress = False
        self.tokenizer = ClipTokenizer.from_folder(bundle.root / "tokenizer")

        def session(component: str, opts: SessionOptions = options) -> LazySession:
            path = bundle.component_file(component, backend, precision)
            return LazySession(lambda: backends.open_session(path, backend, opts))

        # The VAE runs once per image with the largest activations of the pipeline (about 1 GB at 512x512 for
        # SD 1.5): they are returned after each decode instead of being held by the process between images.
        transient = replace(options, release_after_run=True)

        def optional_session(component: str) -> LazySession | None:
            path = bundle.optional_component_file(component, backend, precision)
            return None if path is None else LazySession(lambda: backends.open_session(path, backend, options))

        self.text_encoder = TextEncoder(session("text_encoder"))
        self.unet = UNet(self._unet_session(session), bundle.unet_config, optional_session("unet_deep"), optional_session("unet_shallow"))
        self.deep_cache = self._check_deep_cache(deep_cache)
        self.guidance_cutoff = self._check_guidance_cutoff(guidance_cutoff)
        # Tiled decoding needs a decoder that takes any size; a static export fixes one.
        self.vae_tiling = (self.low_memory if vae_tiling is None else bool(vae_tiling)) and not bundle.static_shapes
        self.vae_decoder = VaeDecoder(session("vae_decoder", transient), bundle.vae_config)
        # The tiny decoder is exported in fp32 only; an int8 variant of the rest still uses it.
        tiny_path = bundle.optional_component_file(TINY_VAE, backend, precision) or bundle.optional_component_file(TINY_VAE, backend)
        self.tiny_vae_decoder = (
            None if tiny_path is None
            else VaeDecoder(LazySession(lambda: backends.open_session(tiny_path, backend, options)), bundle.component_config(TINY_VAE))
        )
        self.tiny_vae = self._check_tiny_vae(tiny_vae)
        self.vae_encoder = (
            VaeEncoder(session("vae_encoder", transient), bundle.vae_config) if bundle.has_component("vae_encoder", backend) else None
        )
        if not self.low_memory:
            # Open everything now so bad files fail at load time, not halfway through a generation.
            unet_parts = (self.unet.deep, self.unet.shallow) if self.deep_cache > 1 else (self.unet.session,)
            decoder = self.tiny_vae_decoder if self.tiny_vae else self.vae_decoder
            for lazy in (self.text_encoder.session, *unet_parts, decoder.session):
                lazy.get()

    def _unet_session(self, session: Callable[[str], LazySession]) -> LazySession:
        """The UNet's session. On ONNX Runtime, an export's ONNX Runtime files when it has them: in low-memory mode
        the streamed parts (one part's weights in memory at a time), else the whole graph with fused attention."""
        self.streams_unet = False
        if self.backend == "onnxruntime":
            index = self.bundle.optional_component_file(UNET_PARTS, self.backend, self.precision)
            if index is not None:
                options = self.options
                if self.low_memory:
                    self.streams_unet = True
                    return LazySession(lambda: backends.open_streamed_session(index, options))
                from leansd.runtime.backends.streamed import fused_whole_file

                whole = fused_whole_file(index)
                if whole is not None:
                    if not whole.is_file():
                        raise ModelFolderError(f"{whole} is missing; re-export the model with sd-export")
                    return LazySession(lambda: backends.open_session(whole, "onnxruntime", options))
        return session("unet")

    @property
    def vae_scale_factor(self) -> int:
        return self.vae_decoder.scale_factor

    def default_size(self) -> tuple[int, int]:
        """(height, width): the static export size, else the model's recommendation, else UNet size x VAE factor."""
        static = self.bundle.static_shapes or {}
        defaults = self.bundle.defaults()
        size = int(self.unet.sample_size if isinstance(self.unet.sample_size, int) else self.unet.sample_size[0]) * self.vae_scale_factor
        return int(static.get("height") or defaults.get("height") or size), int(static.get("width") or defaults.get("width") or size)

    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        num_images_per_prompt: int = 1,
        height: int | None = None,
        width: int | None = None,
        latents: np.ndarray | None = None,
        output_type: str = "pil",
        image: "str | Path | Image.Image | np.ndarray | None" = None,
        strength: float = 0.8,
        seed: int | None = None,
        generator: NoiseSource | None = None,
        scheduler: str | None = None,
        callback: StepCallback | None = None,
        deep_cache: int | None = None,
        tiny_vae: bool | None = None,
        guidance_cutoff: float | None = None,
    ) -> PipelineOutput:
        """Generate images. `image` + `strength` switch to image-to-image. See README for every argument."""
        timings: dict[str, float] = {}
        start = time.perf_counter()

        # 1. Validate.
        prompts = _as_list(prompt, "prompt")
        defaults = self.bundle.defaults()
        steps = int(num_inference_steps if num_inference_steps is not None else defaults.get("num_inference_steps", 50))
        guidance = float(guidance_scale if guidance_scale is not None else defaults.get("guidance_scale", 7.5))
        if steps < 1:
            raise InvalidInputError(f"num_inference_steps must be at least 1, got {steps}")
        if num_images_per_prompt < 1:
            raise InvalidInputError(f"num_images_per_prompt must be at least 1, got {num_images_per_prompt}")
        if output_type not in OUTPUT_TYPES:
            raise InvalidInputError(f"output_type {output_type!r} is not one of {', '.join(OUTPUT_TYPES)}")
        if image is not None and not 0.0 < strength <= 1.0:
            raise InvalidInputError(f"strength must be in (0, 1], got {strength}")
        interval = self.deep_cache if deep_cache is None else self._check_deep_cache(deep_cache)
        use_tiny = self.tiny_vae if tiny_vae is None else self._check_tiny_vae(tiny_vae)
        cutoff = self.guidance_cutoff if guidance_cutoff is None else self._check_guidance_cutoff(guidance_cutoff)
        use_guidance = guidance > 1.0
        negatives = None
        if use_guidance:
            negatives = [""] * len(prompts) if negative_prompt is None else _as_list(negative_prompt, "negative_prompt")
            if len(negatives) == 1 and len(prompts) > 1:
                negatives = negatives * len(prompts)
            if len(negatives) != len(prompts):
                raise InvalidInputError(f"negative_prompt has {len(negatives)} entries but prompt has {len(prompts)}; give one per prompt")
        init_image = load_image(image) if image is not None and not isinstance(image, np.ndarray) else image
        if isinstance(init_image, np.ndarray):
            init_image = init_image.astype(np.float32) / (255.0 if init_image.dtype == np.uint8 else 1.0)
            if init_image.ndim not in (3, 4) or init_image.shape[-1] != 3:
                raise InvalidInputError(f"init image array has shape {init_image.shape}; pass HxWx3 or NxHxWx3 in [0, 1]")
        height, width = self._resolve_size(height, width, init_image)
        sched = get_scheduler(scheduler, self.bundle.scheduler_config)
        noise = generator
        if noise is None:
            seed = secrets.randbelow(2**32) if seed is None else int(seed)
            noise = TorchCompatibleGenerator(seed)
        batch = len(prompts) * num_images_per_prompt
        factor = self.vae_scale_factor
        latent_shape = (batch, self.unet.in_channels, height // factor, width // factor)

        # 2. Encode the prompt (and the negative prompt, first, as diffusers batches them).
        t0 = time.perf_counter()
        embeddings = self._encode_text(prompts, num_images_per_prompt)
        if use_guidance:
            embeddings = np.concatenate([self._encode_text(negatives, num_images_per_prompt), embeddings])
        if self.low_memory:
            self.text_encoder.session.release()
        timings["text_encoder_s"] = time.perf_counter() - t0

        # 3. Plan the timesteps.
        plan = sched.plan(steps, strength if init_image is not None else 1.0)
        if len(plan.timesteps) == 0:
            raise InvalidInputError(f"strength {strength} with {steps} steps leaves no denoising step; raise strength or steps")

        # 4. Initial latents: pure noise, or the encoded init image noised to the first timestep.
        t0 = time.perf_counter()
        if init_image is not None:
            latents = self._image_latents(init_image, width, height, batch, noise, sched, plan)
        elif latents is not None:
            latents = np.asarray(latents, dtype=np.float32)
            if latents.shape != latent_shape:
                raise InvalidInputError(f"latents have shape {latents.shape}, expected {latent_shape} for this batch and size")
            latents = (latents * np.float32(plan.init_noise_sigma)).astype(np.float32)
        else:
            latents = (noise.randn(latent_shape) * np.float32(plan.init_noise_sigma)).astype(np.float32)
        timings["prepare_s"] = time.perf_counter() - t0

        # 5. Denoise.
        t0 = time.perf_counter()
        latents = self._denoise(latents, embeddings, sched, plan, guidance, use_guidance, noise, callback, interval, cutoff)
        if self.low_memory:
            self.unet.release()
        timings["denoise_s"] = time.perf_counter() - t0
        timings["step_s"] = timings["denoise_s"] / len(plan.timesteps)

        # 6. Decode, one image at a time to keep the VAE's activations small.
        t0 = time.perf_counter()
        if output_type == "latent":
            images: list[Image.Image] | np.ndarray = latents
        else:
            decoder = self.tiny_vae_decoder if use_tiny else self.vae_decoder
            tiled = self.vae_tiling and not use_tiny  # the tiny decoder's activations are small at any size
            decoded = np.concatenate([decoder.decode(latents[i : i + 1], tiled=tiled) for i in range(batch)])
            unit = decoded_to_unit(decoded)
            images = unit if output_type == "np" else unit_to_pil(unit)
        if self.low_memory:
            self.vae_decoder.session.release()
            if self.tiny_vae_decoder is not None:
                self.tiny_vae_decoder.session.release()
        timings["decode_s"] = time.perf_counter() - t0
        timings["total_s"] = time.perf_counter() - start
        return PipelineOutput(images, seed, sched.name, steps, guidance, timings)

    def _resolve_size(self, height: int | None, width: int | None, init_image) -> tuple[int, int]:
        if init_image is not None and height is None and width is None:
            if isinstance(init_image, np.ndarray):
                h, w = init_image.shape[-3:-1]
            else:
                w, h = init_image.size
            factor = self.vae_scale_factor
            height, width = h - h % factor, w - w % factor  # diffusers rounds an init image down the same way
            if height == 0 or width == 0:
                raise InvalidInputError(f"init image {w}x{h} is smaller than the VAE factor {factor}")
            return height, width
        default_h, default_w = self.default_size()
        height = int(height or default_h)
        width = int(width or default_w)
        factor = self.vae_scale_factor
        for name, value in (("height", height), ("width", width)):
            if value <= 0 or value % factor:
                lower, upper = max(factor, value - value % factor), value - value % factor + factor
                raise InvalidInputError(f"{name} {value} is not a positive multiple of {factor} (this model's VAE factor); use {lower} or {upper}")
        static = self.bundle.static_shapes
        if static and (static.get("height"), static.get("width")) != (height, width):
            raise InvalidInputError(
                f"this model was exported with static shapes {static.get('width')}x{static.get('height')}; "
                f"generate at that size or re-export without --height/--width"
            )
        return height, width

    def _encode_text(self, prompts: list[str], repeat: int) -> np.ndarray:
        hidden = self.text_encoder.encode(self.tokenizer(prompts))
        return np.repeat(hidden, repeat, axis=0)  # each prompt's images sit next to each other, as in diffusers

    def _image_latents(self, init_image, width, height, batch, noise: NoiseSource, sched, plan) -> np.ndarray:
        if self.vae_encoder is None:
            raise ModelFolderError(f"{self.bundle.root} has no vae_encoder for {self.backend}; re-export the model to use an init image")
        if isinstance(init_image, np.ndarray):
            pixels = unit_array_to_model_input(init_image)
            if pixels.shape[-2:] != (height, width):
                raise InvalidInputError(
                    f"init image array is {pixels.shape[-1]}x{pixels.shape[-2]} but the output size is {width}x{height}; resize it or pass a PIL image"
                )
        else:
            pixels = image_to_model_input(init_image, width, height)
        mean, logvar = self.vae_encoder.encode(pixels)
        if self.low_memory:
            self.vae_encoder.session.release()
        # diffusers samples the posterior (latent_dist.sample(generator)) before drawing the start noise.
        sample = mean + np.exp(0.5 * logvar) * noise.randn(mean.shape)
        init = (self.vae_encoder.scaling_factor * (sample - self.vae_encoder.shift_factor)).astype(np.float32)
        if batch % init.shape[0]:
            raise InvalidInputError(f"{init.shape[0]} init images cannot be spread over a batch of {batch}; pass one image or one per output")
        init = np.concatenate([init] * (batch // init.shape[0]))
        return sched.add_noise(plan, init, noise.randn(init.shape)).astype(np.float32)

    def _check_deep_cache(self, interval: int | None) -> int:
        """The feature-reuse interval (1 = off) after checking it and that the folder can do it."""
        if interval is None:
            return 1
        if isinstance(interval, bool) or not isinstance(interval, (int, np.integer)) or interval < 1:
            raise InvalidInputError(f"deep_cache must be a whole number of steps >= 1 (1 = off), got {interval!r}")
        if interval > 1 and not self.unet.can_reuse_features:
            raise ModelFolderError(
                f"{self.bundle.root} has no {self.precision} deep-cache UNet parts for {self.backend}; "
                "re-export it with sd-export --deep-cache, or leave deep_cache off"
            )
        return int(interval)

    def _check_guidance_cutoff(self, cutoff: float) -> float:
        """The fraction of steps after which guidance stops (1 = guide every step), after checking it."""
        if isinstance(cutoff, bool) or not isinstance(cutoff, (int, float, np.floating, np.integer)) or not 0.0 <= cutoff <= 1.0:
            raise InvalidInputError(f"guidance_cutoff must be a fraction of the steps between 0 and 1 (1 = off), got {cutoff!r}")
        if cutoff < 1.0 and (self.bundle.static_shapes or {}).get("unet_batch"):
            raise InvalidInputError(
                "this model was exported with static shapes, which fix the UNet's batch for guidance; "
                "re-export it without --height/--width to stop guidance early, or leave guidance_cutoff at 1"
            )
        return float(cutoff)

    def _check_tiny_vae(self, wanted: bool) -> bool:
        if wanted and self.tiny_vae_decoder is None:
            raise ModelFolderError(
                f"{self.bundle.root} has no tiny VAE decoder for {self.backend}; export one with "
                "sd-export SRC OUT --tiny-vae TAESD_FOLDER (a diffusers AutoencoderTiny), or leave tiny_vae off"
            )
        return bool(wanted)

    def preview(self, latents: np.ndarray) -> np.ndarray:
        """Decode latents quickly for display, e.g. the denoised estimate a step callback receives.

        Uses the tiny VAE decoder when the folder has one (a fraction of a second even for SD 1.5 at 512x512),
        else the model's own decoder. Returns float32 NHWC images in [0, 1].
        """
        decoder = self.tiny_vae_decoder or self.vae_decoder
        latents = np.asarray(latents, dtype=np.float32)
        if latents.ndim != 4 or latents.shape[1] != decoder.latent_channels:
            raise InvalidInputError(f"preview takes latents of shape (batch, {decoder.latent_channels}, h, w), got {latents.shape}")
        return decoded_to_unit(np.concatenate([decoder.decode(latents[i : i + 1]) for i in range(latents.shape[0])]))

    @property
    def splits_guidance(self) -> bool:
        """Low-memory mode runs the unconditional and conditional halves as two UNet calls of half the batch:
        the same result, with half the activation memory (attention scores above all). Static exports fix the
        UNet batch, so they keep one call."""
        return self.low_memory and not (self.bundle.static_shapes or {}).get("unet_batch")

    def _predict(
        self, model_input, t, embeddings, step: int, interval: int, cache: dict, guided: bool = True, reuse: bool = True
    ) -> np.ndarray:
        """The UNet's prediction for a step: one call, or one per guidance half in low-memory mode."""
        if guided and self.splits_guidance:
            halves = zip(np.split(model_input, 2), np.split(embeddings, 2))
            return np.concatenate([self._predict_batch(x, t, e, step, interval, cache, k, reuse) for k, (x, e) in enumerate(halves)])
        return self._predict_batch(model_input, t, embeddings, step, interval, cache, 0, reuse)

    def _predict_batch(self, model_input, t, embeddings, step: int, interval: int, cache: dict, key: int, reuse: bool = True) -> np.ndarray:
        """One UNet evaluation. With feature reuse, the deep features are refreshed every `interval` steps, and on
        every step where `reuse` is False (by the deep part, a whole UNet with the features as a second output, so
        the plain UNet is never loaded besides)."""
        if interval <= 1:
            return self.unet.predict_noise(model_input, t, embeddings)
        if not reuse or step % interval == 0 or key not in cache:
            prediction, cache[key] = self.unet.predict_noise_and_features(model_input, t, embeddings)
            return prediction
        return self.unet.predict_noise_from_features(model_input, t, embeddings, cache[key])

    def _denoise(
        self, latents, embeddings, sched, plan, guidance, use_guidance, noise: NoiseSource, callback, interval: int = 1, cutoff: float = 1.0
    ) -> np.ndarray:
        total = len(plan.timesteps)
        # As diffusers' SDCFGCutoffCallback(cutoff_step_ratio=cutoff): guidance stops after step int(total * cutoff).
        guided_steps = total if cutoff >= 1.0 else min(total, int(total * cutoff) + 1)
        # When some steps are unguided, deep features are reused on those only: guidance multiplies the error of
        # stale features by the guidance scale (on the bundled model, reuse every 3 steps on guided steps cost
        # points of accuracy; on unguided steps, none).
        reuse_when_guided = guided_steps == total
        state = None
        cache: dict[int, np.ndarray] = {}
        progress = None
        if self.show_progress:
            from tqdm import tqdm

            progress = tqdm(total=total, unit="step", leave=False, dynamic_ncols=True)
        try:
            for i, t in enumerate(plan.timesteps):
                if use_guidance and i == guided_steps:
                    # From here on the UNet sees the prompt alone: half the work per step.
                    embeddings = np.split(embeddings, 2)[1]
                    cache = self._conditional_features(cache)
                guided = use_guidance and i < guided_steps
                model_input = sched.scale_model_input(plan, i, latents).astype(np.float32, copy=False)
                if guided:
                    model_input = np.concatenate([model_input, model_input])
                prediction = self._predict(model_input, t, embeddings, i, interval, cache, guided, reuse_when_guided or not guided)
                if guided:
                    uncond, cond = np.split(prediction, 2)
                    prediction = uncond + np.float32(guidance) * (cond - uncond)
                step_noise = noise.randn(latents.shape) if sched.uses_noise else None
                result = sched.step(plan, i, prediction, latents, state, step_noise)
                latents, state = result.prev_sample.astype(np.float32, copy=False), result.state
                if progress is not None:
                    progress.update(1)
                if callback is not None and callback(i, total, latents, result.denoised) is False:
                    raise Cancelled(f"generation cancelled by the step callback after step {i + 1} of {total}")
        finally:
            if progress is not None:
                progress.close()
        return latents

    def _conditional_features(self, cache: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
        """The cached deep features of the prompt's half, for the unguided steps (keyed as an unsplit call)."""
        if self.splits_guidance:
            return {0: cache[1]} if 1 in cache else {}
        return {0: np.split(cache[0], 2)[1]} if 0 in cache else {}

    def close(self) -> None:
        """Release every model session."""
        self.unet.release()
        for component in (self.text_encoder, self.vae_decoder, self.vae_encoder, self.tiny_vae_decoder):
            if component is not None:
                component.session.release()


def bundled_model_path() -> Path:
    """Where the default model installed with leansd lives."""
    return Path(__file__).resolve().parents[1] / "bundled" / "shapes"


def choose_backend(bundle: ModelBundle, backend: str | None) -> str:
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


def load(
    path: str | Path | None = None,
    backend: str | None = None,
    device: str = "cpu",
    precision: str = "fp32",
    *,
    num_threads: int | None = None,
    low_memory: bool = False,
    cache_dir: str | Path | None = None,
    deep_cache: int | None = None,
    vae_tiling: bool | None = None,
    tiny_vae: bool = False,
    guidance_cutoff: float = 1.0,
) -> Pipeline:
    """Load a model folder (None: the bundled default model) and return a ready `Pipeline`.

    backend: "onnxruntime", "openvino", or None for the first installed one the folder has files for.
    device: "cpu", "auto" (a GPU execution provider / OpenVINO GPU when available, else CPU), or a
        backend device name ("cuda", "dml", "gpu"...).
    precision: "fp32" or another variant the folder holds (see its leansd.json).
    low_memory: load each model only while it is needed and release it afterwards.
    cache_dir: a folder where the first run keeps its compiled (OpenVINO) or optimized (ONNX Runtime on CPU)
        models, so later runs start in about a second per model instead of re-optimizing; it holds about one
        copy of each model file used.
    deep_cache: reuse the UNet's deep features for N-1 of every N steps (DeepCache; needs a folder exported
        with `sd-export --deep-cache`); None or 1 runs the whole UNet every step. Overridable per call.
    vae_tiling: decode images larger than the VAE's native size in overlapping tiles (as diffusers'
        `vae.enable_tiling()`), so decoding memory does not grow with the image; default: on in low-memory mode.
    tiny_vae: decode the final images with the tiny VAE decoder (TAESD; needs a folder exported with
        `sd-export --tiny-vae`): much faster, slightly less detailed. Overridable per call. `Pipeline.preview`
        uses it for step previews whenever the folder has one.
    guidance_cutoff: stop classifier-free guidance after this fraction of the steps (as diffusers'
        `SDCFGCutoffCallback(cutoff_step_ratio=...)`): later steps run the UNet on the prompt alone, half the
        work; 1 (default) guides every step. Overridable per call.
    """
    if path is None:
        path = bundled_model_path()
        if not path.is_dir():
            raise ModelFolderError("the bundled default model is not installed in this copy of leansd; pass a model folder")
    bundle = ModelBundle.open(path)
    chosen = choose_backend(bundle, backend)
    options = SessionOptions(
        device=device, num_threads=num_threads, low_memory=low_memory, cache_dir=Path(cache_dir) if cache_dir else None
    )
    return Pipeline(
        bundle, chosen, options, precision=precision, deep_cache=deep_cache, vae_tiling=vae_tiling, tiny_vae=tiny_vae,
        guidance_cutoff=guidance_cutoff,
    )
