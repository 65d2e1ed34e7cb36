"""Tasks differ only in how a generation starts: the size it takes, how much of the schedule it runs, the
initial latents and any conditioning the UNet needs beyond the prompt. The loop, the schedulers, guidance and
decoding are shared (`leansd.runtime.pipeline`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from leansd.runtime.conditioning import Conditioning
from leansd.runtime.errors import InvalidInputError, ModelFolderError
from leansd.runtime.image import image_to_model_input, load_image, unit_array_to_model_input
from leansd.runtime.models import VaeEncoder
from leansd.runtime.rng import NoiseSource
from leansd.runtime.schedulers import Plan, Scheduler


@dataclass(frozen=True)
class Start:
    """What a task needs to know of the generation it starts."""

    plan: Plan
    scheduler: Scheduler
    noise: NoiseSource
    latent_shape: tuple[int, int, int, int]  # (batch, channels, height / factor, width / factor)
    height: int
    width: int
    latents: np.ndarray | None = None  # the caller's initial noise, if any
    vae_encoder: VaeEncoder | None = None
    no_encoder_fix: str = "re-export the model to use an init image"


class TextToImage:
    """Start from noise (or the caller's `latents`), scaled to the scheduler's first noise level."""

    strength = 1.0

    def size(self) -> tuple[int, int] | None:
        """(height, width) the task implies when the call gives none; None: the model's default."""
        return None

    def prepare(self, start: Start, cond: Conditioning) -> tuple[np.ndarray, Conditioning]:
        """The initial latents, and the conditioning with whatever the task adds."""
        sigma = np.float32(start.plan.init_noise_sigma)
        if start.latents is None:
            return (start.noise.randn(start.latent_shape) * sigma).astype(np.float32), cond
        latents = np.asarray(start.latents, dtype=np.float32)
        if latents.shape != start.latent_shape:
            raise InvalidInputError(f"latents have shape {latents.shape}, expected {start.latent_shape} for this batch and size")
        return (latents * sigma).astype(np.float32), cond


class ImageToImage(TextToImage):
    """Start from an image: encode it, sample the latent distribution, noise it to the plan's first timestep."""

    def __init__(self, image: Any, strength: float):
        self.strength = strength
        self.image = load_image(image) if not isinstance(image, np.ndarray) else image
        if isinstance(self.image, np.ndarray):
            self.image = self.image.astype(np.float32) / (255.0 if self.image.dtype == np.uint8 else 1.0)
            if self.image.ndim not in (3, 4) or self.image.shape[-1] != 3:
                raise InvalidInputError(f"init image array has shape {self.image.shape}; pass HxWx3 or NxHxWx3 in [0, 1]")

    def size(self) -> tuple[int, int]:
        if isinstance(self.image, np.ndarray):
            return tuple(self.image.shape[-3:-1])  # type: ignore[return-value]
        return self.image.size[1], self.image.size[0]

    def prepare(self, start: Start, cond: Conditioning) -> tuple[np.ndarray, Conditioning]:
        encoder = start.vae_encoder
        if encoder is None:
            raise ModelFolderError(start.no_encoder_fix)
        if isinstance(self.image, np.ndarray):
            pixels = unit_array_to_model_input(self.image)
            if pixels.shape[-2:] != (start.height, start.width):
                raise InvalidInputError(
                    f"init image array is {pixels.shape[-1]}x{pixels.shape[-2]} but the output size is {start.width}x{start.height}; "
                    "resize it or pass a PIL image"
                )
        else:
            pixels = image_to_model_input(self.image, start.width, start.height)
        mean, logvar = encoder.encode(pixels)
        # diffusers samples the posterior (latent_dist.sample(generator)) before drawing the start noise.
        sample = mean + np.exp(0.5 * logvar) * start.noise.randn(mean.shape)
        init = (encoder.scaling_factor * (sample - encoder.shift_factor)).astype(np.float32)
        batch = start.latent_shape[0]
        if batch % init.shape[0]:
            raise InvalidInputError(f"{init.shape[0]} init images cannot be spread over a batch of {batch}; pass one image or one per output")
        init = np.concatenate([init] * (batch // init.shape[0]))
        return start.scheduler.add_noise(start.plan, init, start.noise.randn(init.shape)).astype(np.float32), cond

