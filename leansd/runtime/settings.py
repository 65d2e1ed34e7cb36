"""One settings object for a generation: diffusers' keyword names plus leansd's own options.

`leansd.load(path, **settings)` stores defaults; a call is those defaults with the call's overrides
(`GenerationSettings.merged`). Checks that need no model run here, once per call; checks against the
model folder (sizes, optional parts) run in the pipeline.
"""
from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
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

    prompt, negative_prompt: a string or a list of strings (one negative per prompt, or one for all).
    num_inference_steps, guidance_scale (guidance applies exactly when > 1), num_images_per_prompt, height,
        width, latents (initial noise, unscaled), output_type ("pil", "np" float NHWC in [0, 1], "latent"),
        image + strength (image-to-image), eta (DDIM's noise): as in diffusers.
    seed: the seed of a `torch.Generator("cpu")` reproduced in numpy (None: random; read it back from the
        output); generator: any `NoiseSource` instead.
    scheduler: an alias (`euler_a`, `dpm++2m_karras`, ...) or a diffusers class name.
    callback: called after every step with (step, total, latents, denoised estimate); returning False cancels
        the generation (`leansd.Cancelled` is raised).
    deep_cache: reuse the UNet's deep features for N-1 of every N steps (1 = off).
    guidance_cutoff: stop guidance after this fraction of the steps (1 = guide every step).
    tiny_vae: decode with the tiny VAE decoder. vae_tiling: decode large images in tiles (None: in low-memory mode).
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
    strength: float = 0.8
    eta: float = 0.0
    seed: int | None = None
    generator: NoiseSource | None = None
    scheduler: str | None = None
    callback: StepCallback | None = None
    deep_cache: int = 1
    guidance_cutoff: float = 1.0
    tiny_vae: bool = False
    vae_tiling: bool | None = None

    def merged(self, **overrides: Any) -> "GenerationSettings":
        """These settings with `overrides` (None values keep the default), checked."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise InvalidInputError(f"unknown option(s) {', '.join(unknown)}; the options are: {', '.join(sorted(known))}")
        return replace(self, **{k: v for k, v in overrides.items() if v is not None}).checked()

    def checked(self) -> "GenerationSettings":
        """Raise `InvalidInputError` naming the first setting that cannot be used."""
        _whole("num_inference_steps", self.num_inference_steps, 1, optional=True)
        _whole("num_images_per_prompt", self.num_images_per_prompt, 1)
        _whole("deep_cache", self.deep_cache, 1, hint=" (1 = off)")
        for name in ("height", "width"):
            _whole(name, getattr(self, name), 1, optional=True)
        if self.output_type not in OUTPUT_TYPES:
            raise InvalidInputError(f"output_type {self.output_type!r} is not one of {', '.join(OUTPUT_TYPES)}")
        if self.image is not None and not (_real(self.strength) and 0.0 < self.strength <= 1.0):
            raise InvalidInputError(f"strength must be in (0, 1], got {self.strength!r}")
        if not (_real(self.guidance_cutoff) and 0.0 <= self.guidance_cutoff <= 1.0):
            raise InvalidInputError(f"guidance_cutoff must be a fraction of the steps between 0 and 1 (1 = off), got {self.guidance_cutoff!r}")
        if self.guidance_scale is not None and not _real(self.guidance_scale):
            raise InvalidInputError(f"guidance_scale must be a number, got {self.guidance_scale!r}")
        if not (_real(self.eta) and self.eta >= 0):
            raise InvalidInputError(f"eta must be a number >= 0, got {self.eta!r}")
        if self.callback is not None and not callable(self.callback):
            raise InvalidInputError(f"callback must be callable, got {type(self.callback).__name__}")
        return self


def _real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _whole(name: str, value: Any, minimum: int, optional: bool = False, hint: str = "") -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise InvalidInputError(f"{name} must be a whole number >= {minimum}{hint}, got {value!r}")


def as_prompt_list(prompt: Any, what: str) -> list[str]:
    """A prompt argument as a non-empty list of strings."""
    if isinstance(prompt, str):
        return [prompt]
    items = list(prompt) if isinstance(prompt, (list, tuple)) else []
    if not items or not all(isinstance(p, str) for p in items):
        raise InvalidInputError(f"{what} must be a string or a non-empty list of strings, got {prompt!r:.60}")
    return items
