"""One settings object for a generation: diffusers' keyword names plus leansd's own options.

`leansd.load(path, **settings)` stores defaults; a call is those defaults with the call's overrides
(`GenerationSettings.merged`). Checks that need no model run here, once per call; checks against the
model folder (sizes, optional parts) run in the pipeline.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from leansd.runtime.errors import InvalidInputError
from leansd.runtime.rng import NoiseSource

# Called after every step with (step index, number of steps, latents, denoised estimate); return False to cancel.
StepCallback = Callable[[int, int, np.ndarray, np.ndarray], "bool | None"]
OUTPUT_TYPES = ("pil", "np", "latent")


@dataclass(frozen=True)
class GenerationSettings:
    """Everything a generation can be told. None means: the model's default (steps, guidance, size, scheduler).

    prompt, negative_prompt: a string or a list of strings (one negative per prompt, or one for all), of any length,
        with AUTOMATIC1111's (word:1.2) / [word] weights and BREAK (`leansd.runtime.prompt_chunks`).
    num_inference_steps, guidance_scale (guidance applies exactly when > 1), num_images_per_prompt, height,
        width, latents (initial noise, unscaled), output_type ("pil", "np" float NHWC in [0, 1], "latent"),
        image + strength (image-to-image), eta (DDIM's noise): as in diffusers.
    mask_image: with `image`, inpainting (diffusers' StableDiffusionInpaintPipeline): white = repaint, black = keep;
        an image with transparency marks what to repaint by alpha < 255 instead (see `leansd.runtime.image.load_mask`).
        A path, a PIL image or an HxW array in [0, 1]; resized to the output size (images with Lanczos, arrays with
        nearest neighbours, as diffusers does), then binarized at 0.5. The output takes the image's size unless
        height and width are given (diffusers' inpaint pipeline takes the model's default size instead).
        Works with inpainting UNets (9 input channels) and ordinary ones (the image is put back outside the mask
        after every step, as diffusers does). masked_image_latents: the masked image already encoded (scaled
        latents, N x latent channels x height/f x width/f), used instead of encoding `image` with the mask's pixels
        cleared.
    strength: how much of the schedule runs (None: 0.8 for image-to-image, 1.0 for inpainting, as diffusers).
    seed: the seed of a `torch.Generator("cpu")` reproduced in numpy (None: random; read it back from the
        output); generator: any `NoiseSource` instead.
    scheduler: an alias (`euler_a`, `dpm++2m_karras`, ...) or a diffusers class name.
    callback: called after every step with (step, total, latents, denoised estimate); returning False cancels
        the generation (`leansd.Cancelled` is raised).
    deep_cache: reuse the UNet's deep features for N-1 of every N steps (1 = off).
    guidance_cutoff: stop guidance after this fraction of the steps (1 = guide every step).
    token_merging: run the UNet graphs with token merging in their top-resolution self-attentions (ToMe; needs a
        folder exported with `sd-export --token-merging`): faster steps, an approximate image.
    tiny_vae: decode with the tiny VAE decoder. vae_tiling: decode large images in tiles (None: in low-memory mode, and
        whenever decoding the image whole would clearly not fit in the memory available).
    memory_check: refuse a generation that clearly needs more memory than is available (`leansd.runtime.budget`).
    watermark: an ASCII text to mark every image with, invisibly, as the Stable Diffusion reference scripts do
        ("StableDiffusionV1" in SD 1's, "SDV2" in SD 2's; `leansd.runtime.watermark`, which also reads it back).
        Applied to the 8-bit images, for output_type "pil" and "np" (there, the marked 8-bit values / 255).
    noise_level: for the x4 upscaler, how much noise is added to the low-resolution `image` before it conditions the
        UNet (diffusers' StableDiffusionUpscalePipeline; None: 20); more lets the model invent more detail.
    clip_skip: use the text encoder's hidden states this many layers before the last (through its final layer
        norm), as diffusers' `clip_skip`; 0 = off. AUTOMATIC1111 counts one more: its "Clip skip 2" is clip_skip=1.
    SDXL (diffusers' StableDiffusionXLPipeline and its img2img / refiner pipeline, same names and defaults):
    prompt_2, negative_prompt_2: what the second text encoder reads (default: prompt, negative_prompt).
    original_size, crops_coords_top_left, target_size and their negative_* counterparts: the micro-conditioning,
        (height, width) / (top, left) pairs (default: the output size, (0, 0), the output size; the negative ones
        default to the positive ones). aesthetic_score, negative_aesthetic_score: the refiner's (6.0 and 2.5).
    denoising_end: stop after this fraction of the schedule and return what is left to denoise (use with
        output_type="latent" and hand the latents to the refiner); denoising_start: start at this fraction, from
        `image` given as those latents (the refiner's half of the hand-off). Both as in diffusers.
    safety_checker: run the model's safety checker (diffusers' StableDiffusionSafetyChecker, exported when the source
        had one) on the images: flagged ones become black and `nsfw_content_detected` says which. None: on when the
        model folder has one, as in diffusers; True: required; False: off. Not run for output_type "latent".
    depth_map: with `image`, for depth-to-image models (diffusers' StableDiffusionDepth2ImgPipeline): an HxW or NxHxW
        array, a .npy file or a greyscale image (16-bit PNGs keep their precision), larger values nearer; resized to
        the latents and scaled to [-1, 1] per map, as diffusers does (`leansd.runtime.depth`).
    loras: {LoRA file or name: multiplier} to run with (names are looked up in `load(..., lora_dir=)`); prompt tags
        `<lora:NAME:0.8>` add to them. {} runs without LoRAs; see `leansd.runtime.adapters`.
    """

    prompt: str | Sequence[str] | None = None
    negative_prompt: str | Sequence[str] | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    num_images_per_prompt: int = 1
    height: int | None = None
    width: int | None = None
    latents: np.ndarray | None = None
    output_type: str = "pil"
    image: "str | Path | Any | None" = None
    mask_image: "str | Path | Any | None" = None
    masked_image_latents: np.ndarray | None = None
    strength: float | None = None
    eta: float = 0.0
    seed: int | None = None
    generator: NoiseSource | None = None
    scheduler: str | None = None
    callback: StepCallback | None = None
    deep_cache: int = 1
    guidance_cutoff: float = 1.0
    tiny_vae: bool = False
    token_merging: bool = False
    vae_tiling: bool | None = None
    memory_check: bool = True
    watermark: str | None = None
    noise_level: int | None = None
    clip_skip: int = 0
    prompt_2: str | Sequence[str] | None = None
    negative_prompt_2: str | Sequence[str] | None = None
    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    negative_original_size: tuple[int, int] | None = None
    negative_crops_coords_top_left: tuple[int, int] | None = None
    negative_target_size: tuple[int, int] | None = None
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5
    denoising_start: float | None = None
    denoising_end: float | None = None
    safety_checker: bool | None = None
    depth_map: "str | Path | Any | None" = None
    loras: Mapping[str | Path, float] | None = None

    def merged(self, **overrides: Any) -> "GenerationSettings":
        """These settings with `overrides` (None values keep the default), checked."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise InvalidInputError(f"unknown option(s) {', '.join(unknown)}; the options are: {', '.join(sorted(known))}")
        return replace(self, **{k: v for k, v in overrides.items() if v is not None}).checked()

    def checked(self) -> "GenerationSettings":
        """Raise `InvalidInputError` naming the first setting that cannot be used."""
        _whole("num_inference_steps", self.num_inference_steps, optional=True)
        _whole("num_images_per_prompt", self.num_images_per_prompt)
        _whole("deep_cache", self.deep_cache, hint=" (1 = off)")
        _whole("clip_skip", self.clip_skip, 0, hint=" (0 = off; AUTOMATIC1111's 'Clip skip 2' is 1)")
        _whole("height", self.height, optional=True)
        _whole("width", self.width, optional=True)
        _whole("seed", self.seed, 0, 2**64 - 1, optional=True, hint=" (None for a random one)")
        _whole("noise_level", self.noise_level, 0, optional=True)
        for name in ("denoising_start", "denoising_end"):
            _number(name, getattr(self, name), 0.0, 1.0, optional=True, what="a fraction of the schedule")
        if None not in (self.denoising_start, self.denoising_end) and self.denoising_start >= self.denoising_end:
            raise InvalidInputError(f"denoising_start {self.denoising_start} is not before denoising_end {self.denoising_end}; "
                                    "start must come first")
        for name in ("aesthetic_score", "negative_aesthetic_score"):
            _number(name, getattr(self, name), -1e6)
        for name in ("original_size", "crops_coords_top_left", "target_size", "negative_original_size",
                     "negative_crops_coords_top_left", "negative_target_size"):
            _pair(name, getattr(self, name))
        _number("guidance_scale", self.guidance_scale, 0.0, optional=True, hint=" (1 or less: no guidance)")
        _number("eta", self.eta, 0.0)
        _number("guidance_cutoff", self.guidance_cutoff, 0.0, 1.0, hint=" (1 = guide every step)", what="a fraction of the steps")
        if self.strength is not None and not (_real(self.strength) and 0.0 < self.strength <= 1.0):
            raise InvalidInputError(f"strength must be in (0, 1], got {self.strength!r}")
        if self.mask_image is not None and self.image is None:
            raise InvalidInputError("mask_image needs image, the picture to inpaint; pass both (sd-run --init-image IMAGE --mask MASK)")
        if self.masked_image_latents is not None and self.mask_image is None:
            raise InvalidInputError("masked_image_latents are for inpainting; pass image and mask_image with them")
        if self.output_type not in OUTPUT_TYPES:
            raise InvalidInputError(f"output_type {self.output_type!r} is not one of {', '.join(OUTPUT_TYPES)}")
        if self.scheduler is not None and not isinstance(self.scheduler, str):
            raise InvalidInputError(f"scheduler must be a name such as 'euler_a' or a diffusers class name, got {self.scheduler!r:.60}")
        for name in ("callback", "generator"):
            value = getattr(self, name)
            if value is not None and not (callable(value) if name == "callback" else callable(getattr(value, "randn", None))):
                raise InvalidInputError(f"{name} must be {'callable' if name == 'callback' else 'an object with randn(shape)'}, got {type(value).__name__}")
        if self.safety_checker is not None and not isinstance(self.safety_checker, bool):
            raise InvalidInputError(f"safety_checker must be True, False or None (the model's default), got {self.safety_checker!r:.60}")
        if self.watermark is not None and not (isinstance(self.watermark, str) and self.watermark.isascii() and self.watermark):
            raise InvalidInputError(f"watermark must be a non-empty ASCII text such as 'StableDiffusionV1', got {self.watermark!r:.60}")
        _check_loras(self.loras)
        _finite("latents", self.latents)
        _finite("masked_image_latents", self.masked_image_latents)
        if self.depth_map is not None and self.image is None:
            raise InvalidInputError("depth_map needs image, the picture to redraw; pass both (sd-run --init-image IMAGE --depth-map DEPTH)")
        for name in ("image", "mask_image", "depth_map"):
            if isinstance(getattr(self, name), np.ndarray):
                _finite(name, getattr(self, name))
        return self


def _pair(name: str, value: Any) -> None:
    if value is None:
        return
    if not (isinstance(value, (tuple, list)) and len(value) == 2 and all(_real(v) and v >= 0 for v in value)):
        raise InvalidInputError(f"{name} must be a pair of numbers >= 0 such as (1024, 1024), got {value!r:.60}")


def _check_loras(loras: Any) -> None:
    if loras is None:
        return
    if not isinstance(loras, Mapping):
        raise InvalidInputError(f"loras must be a mapping {{file or name: multiplier}}, e.g. {{'style.safetensors': 0.8}}, got {loras!r:.60}")
    for key, value in loras.items():
        if not isinstance(key, (str, Path)) or not str(key):
            raise InvalidInputError(f"loras keys must be LoRA files or names, got {key!r:.60}")
        if not (_real(value) and math.isfinite(value)):
            raise InvalidInputError(f"the multiplier of LoRA {str(key)!r} must be a finite number such as 0.8, got {value!r:.60}")


def _real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _whole(name: str, value: Any, low: int = 1, high: int | None = None, optional: bool = False, hint: str = "") -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low or (high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f">= {low}"
        raise InvalidInputError(f"{name} must be a whole number {bound}{hint}, got {value!r:.60}")


def _number(name: str, value: Any, low: float, high: float | None = None, optional: bool = False, hint: str = "",
            what: str = "a finite number") -> None:
    if value is None and optional:
        return
    if not (_real(value) and math.isfinite(value) and value >= low and (high is None or value <= high)):
        bound = f"from {low:g} to {high:g}" if high is not None else f">= {low:g}"
        raise InvalidInputError(f"{name} must be {what} {bound}{hint}, got {value!r:.60}")


def _finite(name: str, value: Any) -> None:
    """Arrays from callers: real numbers, all finite (NaN would silently give a garbage image)."""
    if value is None:
        return
    array = np.asarray(value)
    if array.dtype.kind not in "fiub" or not np.isfinite(array).all():
        raise InvalidInputError(f"{name} must be an array of finite real numbers; it has {array.dtype} values or NaN/inf in it")


def as_prompt_list(prompt: Any, what: str) -> list[str]:
    """A prompt argument as a non-empty list of strings."""
    if isinstance(prompt, str):
        return [prompt]
    items = list(prompt) if isinstance(prompt, (list, tuple)) else []
    if not items or not all(isinstance(p, str) for p in items):
        raise InvalidInputError(f"{what} must be a string or a non-empty list of strings, got {prompt!r:.60}")
    return items
