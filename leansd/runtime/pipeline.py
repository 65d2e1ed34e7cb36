"""A loaded model folder that generates images: `Pipeline`, and `Generation`, one call's state and stages.

    resolve settings -> encode prompts -> plan timesteps -> task's initial latents -> denoise loop -> decode

A `Pipeline` does not change after `load()`: everything a call computes lives in its `Generation`, so one
pipeline can serve several threads. Keyword names follow diffusers' `StableDiffusionPipeline.__call__`, and
with the same seed the initial latents and every sampler's noise are the ones diffusers draws from
`torch.Generator("cpu").manual_seed(seed)`.
"""
from __future__ import annotations

import secrets
import time
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from PIL import Image

from leansd.runtime import budget, guidance_embedding, micro_conditioning, watermark
from leansd.runtime.adapters import Adapters, AppliedLora, Embedding, extract
from leansd.runtime.bundle import ModelBundle
from leansd.runtime.conditioning import PromptEncoder
from leansd.runtime.depth import DepthEstimator
from leansd.runtime.denoiser import Denoiser, Guidance
from leansd.runtime.errors import InsufficientMemoryError, InvalidInputError, LeanSDWarning, ModelFolderError
from leansd.runtime.image import decoded_to_unit, unit_to_pil
from leansd.runtime.loop import denoise
from leansd.runtime.memory import MemoryPolicy
from leansd.runtime.models import UNet, VaeDecoder, VaeEncoder
from leansd.runtime.rng import TorchCompatibleGenerator
from leansd.runtime.safety import SafetyChecker
from leansd.runtime.schedulers import get_scheduler
from leansd.runtime.settings import GenerationSettings, as_prompt_list
from leansd.runtime.task_choice import choose_task
from leansd.runtime.tasks import DepthToImage, Start, TextToImage, Upscale


@dataclass
class PipelineOutput:
    """Generated images: a list of PIL images, a float32 NHWC array in [0, 1], or latents (per `output_type`).

    `settings` are the call's settings after the pipeline's defaults were applied; `timings` seconds per stage.
    `nsfw_content_detected`: per image, whether the safety checker flagged it (and blacked it out); None when no checker
    ran (none in the model folder, `safety_checker=False`, or output_type "latent"), as in diffusers.
    `depth_map`: depth-to-image only, the depth maps used (N x H x W, the caller's or the estimator's), before resizing.
    """

    images: list[Image.Image] | np.ndarray
    seed: int | None
    scheduler: str
    num_inference_steps: int
    guidance_scale: float
    timings: dict[str, float] = field(default_factory=dict)
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    nsfw_content_detected: list[bool] | None = None
    depth_map: np.ndarray | None = None
    loras: list[AppliedLora] = field(default_factory=list)  # the LoRAs it ran with
    embeddings: list[Embedding] = field(default_factory=list)  # the textual-inversion embeddings its prompts named
    precision: str = ""  # the precision the models ran in ("fp32", "int8", "bf16"; what precision="auto" picked)


@dataclass(frozen=True)
class Models:
    """The model components of a pipeline, each a small wrapper with one verb."""

    prompt_encoder: PromptEncoder
    denoiser: Denoiser
    vae_decoder: VaeDecoder
    vae_encoder: VaeEncoder | None = None
    tiny_vae_decoder: VaeDecoder | None = None
    safety_checker: SafetyChecker | None = None
    depth_estimator: DepthEstimator | None = None

    def sessions(self) -> list:
        """Every model session of the pipeline."""
        d, m = self.denoiser, self.denoiser.merged
        merged = (m.unet, m.deep, m.shallow) if m is not None else ()
        wrappers = (*self.prompt_encoder.encoders, d.unet, d.deep, d.shallow, *merged, self.vae_decoder, self.vae_encoder,
                    self.tiny_vae_decoder, self.safety_checker, self.depth_estimator)
        return [w.session for w in wrappers if w is not None]


class Pipeline:
    """Text-to-image, image-to-image, inpainting and depth-to-image over one model folder and one backend. Build it with
    `leansd.load()`."""

    def __init__(
        self, bundle: ModelBundle, backend: str, precision: str, models: Models, memory: MemoryPolicy,
        defaults: GenerationSettings = GenerationSettings(), adapters: Adapters | None = None,
    ):
        self.bundle, self.backend, self.precision = bundle, backend, precision
        self.precision_reason = ""  # why precision="auto" picked `precision` (set by load)
        self.models, self.memory = models, memory
        # LoRAs and embeddings: the one part that changes after load (the weights a LoRA set puts in the models),
        # switched only between calls that ask for different sets (see `leansd.runtime.adapters.state`).
        self.adapters = adapters or Adapters(bundle.root, {}, False)
        self.defaults = self._checked(defaults.checked())
        if self.defaults.loras:  # apply load()'s LoRAs before the models open, so they open once, patched
            with self.adapters.using(self.adapters.resolve(self.defaults.loras, ())):
                pass
        denoiser, decoder = models.denoiser, self._decoder(self.defaults)
        unets = denoiser.variant(self.defaults.token_merging).models(self.defaults.deep_cache)
        memory.preload(*(m.session for m in unets), decoder.session,
                       *(e.session for e in models.prompt_encoder.encoders))

    @property
    def unet(self) -> UNet:
        return self.models.denoiser.unet

    @property
    def vae_scale_factor(self) -> int:
        return self.models.vae_decoder.scale_factor

    def default_size(self) -> tuple[int, int]:
        """(height, width): the static export size, else the model's recommendation, else UNet size x VAE factor."""
        static = self.bundle.static_shapes or {}
        defaults = self.bundle.defaults()
        sample = self.unet.sample_size
        size = int(sample if isinstance(sample, int) else sample[0]) * self.vae_scale_factor
        return int(static.get("height") or defaults.get("height") or size), int(static.get("width") or defaults.get("width") or size)

    def __call__(self, prompt: Any = None, **settings: Any) -> PipelineOutput:
        """Generate images. Takes the fields of `GenerationSettings` as keywords (diffusers' names, plus `seed`,
        `scheduler`, `deep_cache`, `guidance_cutoff`, `tiny_vae`, `vae_tiling`); unset ones keep the defaults
        given to `load()`. `image` + `strength` switch to image-to-image, `image` + `mask_image` to inpainting."""
        return Generation(self, self._checked(self.defaults.merged(prompt=prompt, **settings))).run()

    def preview(self, latents: np.ndarray) -> np.ndarray:
        """Decode latents quickly for display, e.g. the denoised estimate a step callback receives.

        Uses the tiny VAE decoder when the folder has one (a fraction of a second even for SD 1.5 at 512x512),
        else the model's own decoder. Returns float32 NHWC images in [0, 1].
        """
        decoder = self.models.tiny_vae_decoder or self.models.vae_decoder
        latents = np.asarray(latents, dtype=np.float32)
        if latents.ndim != 4 or latents.shape[1] != decoder.latent_channels:
            raise InvalidInputError(f"preview takes latents of shape (batch, {decoder.latent_channels}, h, w), got {latents.shape}")
        return decoded_to_unit(np.concatenate([decoder.decode(latents[i : i + 1]) for i in range(latents.shape[0])]))

    def close(self) -> None:
        """Release every model session (they reopen if the pipeline is called again)."""
        for session in self.models.sessions():
            session.close()

    def _decoder(self, settings: GenerationSettings) -> VaeDecoder:
        return self.models.tiny_vae_decoder if settings.tiny_vae and self.models.tiny_vae_decoder else self.models.vae_decoder

    def _checked(self, s: GenerationSettings) -> GenerationSettings:
        """Settings checked against what this model folder can do."""
        where = f"{self.bundle.root} has no"
        if s.deep_cache > 1 and None in (self.models.denoiser.deep, self.models.denoiser.shallow):
            fp32_only = self.precision == "int8" and self.bundle.has_component("unet_deep", self.backend)  # an older int8 export
            raise ModelFolderError(f"{where} {self.precision} deep-cache UNet parts for {self.backend}; " + (
                "its parts are fp32 only: run deep_cache with precision fp32 (or bf16), or export the folder again with sd-export"
                if fp32_only else "re-export it with sd-export --deep-cache, or leave deep_cache off"))
        merged = self.models.denoiser.merged
        if s.token_merging and (merged is None or (s.deep_cache > 1 and None in (merged.deep, merged.shallow))):
            raise ModelFolderError(
                f"{where} {self.precision} token-merged UNet{' deep-cache parts' if s.deep_cache > 1 else ''} for {self.backend}; "
                "export it with sd-export --token-merging (fp32 files, run as fp32 or bf16), or leave token_merging off"
            )
        if s.tiny_vae and self.models.tiny_vae_decoder is None:
            raise ModelFolderError(
                f"{where} tiny VAE decoder for {self.backend}; export one with "
                "sd-export SRC OUT --tiny-vae TAESD_FOLDER (a diffusers AutoencoderTiny), or leave tiny_vae off"
            )
        if s.guidance_cutoff < 1.0 and (self.bundle.static_shapes or {}).get("unet_batch"):
            raise InvalidInputError(
                "this model was exported with static shapes, which fix the UNet's batch for guidance; "
                "re-export it without --height/--width to stop guidance early, or leave guidance_cutoff at 1"
            )
        if s.safety_checker and self.models.safety_checker is None:
            raise ModelFolderError(
                f"{where} safety checker for {self.backend}; export the model from a diffusers folder that has safety_checker/ and "
                "feature_extractor/, or pass safety_checker=False"
            )
        return s


class Generation:
    """One call of a pipeline: its resolved settings, noise source and timings, and the stages that use them."""

    def __init__(self, pipe: Pipeline, settings: GenerationSettings):
        self.pipe, self.settings = pipe, settings
        s, defaults = settings, pipe.bundle.defaults()
        self.timings: dict[str, float] = {}
        self.nsfw_content_detected: list[bool] | None = None
        self.prompts, self.loras = self._lora_tags(as_prompt_list(s.prompt, "prompt"))
        self.steps = int(s.num_inference_steps or defaults.get("num_inference_steps", 50))
        self.guidance_scale = float(s.guidance_scale if s.guidance_scale is not None else defaults.get("guidance_scale", 7.5))
        self.task = self._task()
        if s.image is not None and not isinstance(self.task, Upscale):  # the strength used, for the output's settings
            self.settings = s = replace(s, strength=self.task.strength)
        self.height, self.width = self._size()
        if s.watermark is not None and watermark.capacity(self.height, self.width) < len(s.watermark) * 8:
            raise InvalidInputError(f"a {self.width}x{self.height} image has room for {watermark.capacity(self.height, self.width)} "
                                    f"watermark bits (one per 8x8 block), not {len(s.watermark) * 8}; use a shorter watermark")
        self.scheduler = get_scheduler(s.scheduler, pipe.bundle.scheduler_config, eta=s.eta)
        embedded = guidance_embedding.width(pipe.bundle.unet_config)  # an LCM-distilled UNet: LCM's own img2img schedule
        self.plan = self.scheduler.plan(self.steps, self.task.strength, s.denoising_start, s.denoising_end, bool(embedded))
        if len(self.plan.timesteps) == 0:
            if s.denoising_start is not None or s.denoising_end is not None:
                raise InvalidInputError(f"denoising_start {s.denoising_start} / denoising_end {s.denoising_end} with {self.steps} steps "
                                        "leave no denoising step; raise the steps or widen the window")
            raise InvalidInputError(f"strength {s.strength} with {self.steps} steps leaves no denoising step; raise strength or steps")
        # A guidance-embedded UNet (LCM-distilled) takes the scale as an input and is never run twice for guidance.
        self.embedded_guidance = embedded
        cfg_scale = 1.0 if self.embedded_guidance else self.guidance_scale
        self.guidance = Guidance.plan(cfg_scale, s.guidance_cutoff, len(self.plan.timesteps))
        self.negatives = self._negatives() if self.guidance.guided_steps else None
        # SDXL base: no negative prompt means zeros, not the encoded empty prompt (force_zeros_for_empty_prompt)
        self.zero_negative = bool(self.negatives is not None and s.negative_prompt is None and s.negative_prompt_2 is None
                                  and (pipe.bundle.model_index or {}).get("force_zeros_for_empty_prompt")
                                  and micro_conditioning.takes_time_ids(pipe.bundle.unet_config))
        self.seed = s.seed
        if s.generator is None:
            self.seed = secrets.randbelow(2**32) if s.seed is None else int(s.seed)
        self.noise = s.generator or TorchCompatibleGenerator(self.seed)
        factor = pipe.vae_scale_factor
        batch = len(self.prompts) * s.num_images_per_prompt
        self.latent_shape = (batch, pipe.models.vae_decoder.latent_channels, self.height // factor, self.width // factor)

    def run(self) -> PipelineOutput:
        pipe, s = self.pipe, self.settings
        start = time.perf_counter()
        available = budget.available_bytes() if s.memory_check else None
        if available is not None and (needed := self.memory_estimate()).peak > available:
            raise InsufficientMemoryError(budget.describe(needed, available))
        with ExitStack() as stack:
            with self._timed("adapters_s"):  # switching LoRA sets (0 when the set is the one applied)
                applied = stack.enter_context(pipe.adapters.using(self.loras))
            return self._generate(start, applied)

    def _generate(self, start: float, applied: list[AppliedLora]) -> PipelineOutput:
        pipe, models, s = self.pipe, self.pipe.models, self.settings
        encoder = models.prompt_encoder
        with self._timed("text_encoder_s"), pipe.memory.stage(*(e.session for e in encoder.encoders)):
            # A static export's UNet takes one chunk of prompt (77 tokens) only.
            cond = encoder.condition(self.prompts, None if self.zero_negative else self.negatives, s.num_images_per_prompt,
                                     s.clip_skip, max_chunks=1 if pipe.bundle.static_shapes else None,
                                     prompts_2=self._prompt_list("prompt_2"), negatives_2=self._prompt_list("negative_prompt_2"))
            if self.zero_negative:
                cond = micro_conditioning.zero_negative(cond)
        if micro_conditioning.takes_time_ids(pipe.bundle.unet_config):
            aesthetic = bool((pipe.bundle.model_index or {}).get("requires_aesthetics_score"))
            ids = micro_conditioning.time_ids(s, self.height, self.width, aesthetic, img2img=s.image is not None)
            cond = micro_conditioning.with_time_ids(cond, *ids)
        if self.embedded_guidance:
            cond = guidance_embedding.with_guidance(cond, self.guidance_scale, self.embedded_guidance)
        estimator = models.depth_estimator if isinstance(self.task, DepthToImage) else None  # released after use in low-memory mode
        with self._timed("prepare_s"), pipe.memory.stage(estimator.session if estimator else None):
            start_at = Start(self.plan, self.scheduler, self.noise, self.latent_shape, self.height, self.width, s.latents,
                             models.vae_encoder, f"{pipe.bundle.root} has no vae_encoder for {pipe.backend}; "
                             "re-export the model to use an init image")
            begin = self.task.prepare(start_at, cond)
        denoiser = models.denoiser.variant(s.token_merging)
        unets = denoiser.models(s.deep_cache)
        with self._timed("denoise_s"), pipe.memory.stage(*(u.session for u in unets)):
            run = denoiser.start(self.guidance, s.deep_cache)
            latents = denoise(run, self.scheduler, self.plan, begin.latents, begin.cond, self.noise, s.callback, begin.after_step)
        self.timings["step_s"] = self.timings["denoise_s"] / len(self.plan.timesteps)
        with self._timed("decode_s"):
            images = latents if s.output_type == "latent" else self._decode(latents)
        self.timings["total_s"] = time.perf_counter() - start
        depth = self.task.depth if isinstance(self.task, DepthToImage) else None
        named = " ".join(self.prompts + (self.negatives or [])).lower()
        used = [e for e in pipe.adapters.embeddings if e.token.lower() in named]
        return PipelineOutput(images, self.seed, self.scheduler.name, self.steps, self.guidance_scale, self.timings, s,
                              self.nsfw_content_detected, depth, applied, used, pipe.precision)

    def memory_estimate(self) -> budget.MemoryEstimate:
        """What this generation needs beyond what is loaded (see `leansd.runtime.budget`)."""
        pipe, d = self.pipe, self.pipe.models.denoiser
        batch, _, h, w = self.latent_shape
        unet_batch = 2 * batch if self.guidance.guided_steps and not d.split_guidance else batch
        unet = budget.unet_elements(pipe.bundle.unet_config, unet_batch, h, w, d.fused_attention) * 4 * budget.UNET_FACTOR
        decoder = pipe._decoder(self.settings)
        if self._tiled(decoder):
            tile = pipe.memory.vae_tile_size(decoder.tile_size) // decoder.scale_factor
            h, w = min(h, tile), min(w, tile)
        images = batch * self.height * self.width * 3 * 4 * 2  # float images and their 8-bit copies, all kept
        decode = budget.vae_elements(decoder.config, h, w) * 4 * budget.VAE_FACTOR + images
        return budget.MemoryEstimate(int(unet), int(decode), d.streamed_bytes)

    def _tiled(self, decoder: VaeDecoder) -> bool:
        # The tiny decoder's activations are small at any size; a static export's decoder takes one size only.
        if decoder is not self.pipe.models.vae_decoder or self.pipe.bundle.static_shapes:
            return False
        if self.settings.vae_tiling is None and not self.pipe.memory.low_memory:
            return self._whole_decode_too_large(decoder)
        return self.pipe.memory.vae_tiling(self.settings.vae_tiling)

    def _whole_decode_too_large(self, decoder: VaeDecoder) -> bool:
        """Whether decoding one image whole would clearly not fit in the memory available now (e.g. the x4 upscaler's
        2048x2048 output, whose VAE attends over every latent pixel): then tiles are the default."""
        available = budget.available_bytes()
        _, _, h, w = self.latent_shape
        return available is not None and budget.vae_elements(decoder.config, h, w) * 4 * budget.VAE_FACTOR > available

    def _decode(self, latents: np.ndarray) -> list[Image.Image] | np.ndarray:
        """Decode one image at a time, to keep the VAE's activations small (a static export's batch at a time: its
        decoder takes that batch only)."""
        decoder = self.pipe._decoder(self.settings)
        tiled, tile = self._tiled(decoder), self.pipe.memory.vae_tile_size(decoder.tile_size)
        n = int((self.pipe.bundle.static_shapes or {}).get("batch", 1))
        with self.pipe.memory.stage(decoder.session):
            decoded = np.concatenate([decoder.decode(latents[i : i + n], tiled, tile) for i in range(0, latents.shape[0], n)])
        unit = decoded_to_unit(decoded)
        checker = self.pipe.models.safety_checker
        if checker is not None and self.settings.safety_checker is not False:  # on by default, as in diffusers
            with self._timed("safety_checker_s"), self.pipe.memory.stage(checker.session):
                unit, self.nsfw_content_detected = checker.check(unit)
            if any(self.nsfw_content_detected):
                flagged = [i for i, f in enumerate(self.nsfw_content_detected) if f]
                warnings.warn(f"the safety checker flagged image(s) {', '.join(map(str, flagged))} of this call as possibly NSFW and "
                              "returned black images instead; try another prompt or seed", LeanSDWarning, stacklevel=3)
        if self.settings.watermark is not None:  # on the 8-bit images, as the reference scripts mark them
            marked = [watermark.embed(img, self.settings.watermark) for img in (unit * 255).round().astype(np.uint8)]
            unit = np.stack(marked).astype(np.float32) / 255
        return unit if self.settings.output_type == "np" else unit_to_pil(unit)

    def _task(self) -> TextToImage:
        models = self.pipe.models
        return choose_task(self.settings, self.pipe.bundle, self.pipe.unet.in_channels, models.vae_decoder.latent_channels,
                           self.pipe.vae_scale_factor, models.depth_estimator)

    def _prompt_list(self, name: str) -> list[str] | None:
        """prompt_2 / negative_prompt_2 as one entry per prompt, or None when not given."""
        value = getattr(self.settings, name)
        if value is None:
            return None
        items = as_prompt_list(value, name)
        if len(items) == 1 and len(self.prompts) > 1:
            items = items * len(self.prompts)
        if len(items) != len(self.prompts):
            raise InvalidInputError(f"{name} has {len(items)} entries but prompt has {len(self.prompts)}; give one per prompt")
        return items

    def _lora_tags(self, prompts: list[str]) -> tuple[list[str], list]:
        """The prompts without their `<lora:...>` tags, and the LoRAs the call runs with (the settings' and the tags')."""
        parsed = [extract(p) for p in prompts]
        asked = {tuple(tags) for _, tags in parsed}
        if len(asked) > 1:
            raise InvalidInputError("the prompts of one call ask for different LoRA tags; one call runs with one set of LoRAs: "
                                    "give every prompt the same tags, or make separate calls")
        return [p for p, _ in parsed], self.pipe.adapters.resolve(self.settings.loras, parsed[0][1])

    def _negatives(self) -> list[str]:
        s, count = self.settings, len(self.prompts)
        negatives = [""] * count if s.negative_prompt is None else as_prompt_list(s.negative_prompt, "negative_prompt")
        negatives = [extract(n)[0] for n in negatives]  # tags in a negative prompt are dropped, not applied
        if len(negatives) == 1 and count > 1:
            negatives = negatives * count
        if len(negatives) != count:
            raise InvalidInputError(f"negative_prompt has {len(negatives)} entries but prompt has {count}; give one per prompt")
        return negatives

    def _size(self) -> tuple[int, int]:
        """(height, width): the call's, else the init image's rounded down to the VAE factor, else the default."""
        s, factor = self.settings, self.pipe.vae_scale_factor
        implied = self.task.size()
        if implied is not None and s.height is None and s.width is None:
            h, w = implied
            height, width = h - h % factor, w - w % factor  # diffusers rounds an init image down the same way
            if height == 0 or width == 0:
                raise InvalidInputError(f"init image {w}x{h} is smaller than the VAE factor {factor}")
            default_h, default_w = self.pipe.default_size()
            if height * width > 4 * default_h * default_w and not isinstance(self.task, Upscale):
                warnings.warn(f"the output is {width}x{height} because the init image is; this model draws at {default_w}x"
                              f"{default_h}: pass width and height to resize the image", LeanSDWarning, stacklevel=3)
            return height, width
        default_h, default_w = self.pipe.default_size()
        height, width = int(s.height or default_h), int(s.width or default_w)
        for name, value in (("height", height), ("width", width)):
            if value % factor:
                near = " or ".join(str(v) for v in sorted({max(factor, value - value % factor), value - value % factor + factor}))
                raise InvalidInputError(f"{name} {value} is not a positive multiple of {factor} (this model's VAE factor); use {near}")
        static = self.pipe.bundle.static_shapes
        if static and (static.get("height"), static.get("width")) != (height, width):
            raise InvalidInputError(
                f"this model was exported with static shapes {static.get('width')}x{static.get('height')}; "
                "generate at that size or re-export without --height/--width"
            )
        return height, width

    @contextmanager
    def _timed(self, key: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.timings[key] = time.perf_counter() - start
