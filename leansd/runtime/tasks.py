"""Tasks differ only in how a generation starts: the size it takes, how much of the schedule it runs, the
initial latents, any conditioning the UNet needs beyond the prompt, and what (if anything) happens to the latents
after each step. The loop, the schedulers, guidance and decoding are shared (`leansd.runtime.pipeline`).

    TextToImage   noise (or the caller's latents)
    ImageToImage  the init image's latents, noised to the first timestep of the strength's plan
    Inpaint       an image and a mask (white = repaint): inpainting UNets (9 input channels) get the mask and the
                  masked image's latents beside the latents; ordinary UNets get the image put back outside the
                  mask after every step (diffusers' StableDiffusionInpaintPipeline, both ways)
    Upscale       the x4 upscaler: noise at the low-resolution image's size, which the VAE decodes at 4x; the
                  image, noised to `noise_level`, beside the latents and the noise level as the UNet's class label
    DepthToImage  image-to-image whose UNet also gets a depth map (5 input channels: diffusers'
                  StableDiffusionDepth2ImgPipeline, with the caller's `depth_map`)
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from leansd.runtime.conditioning import Conditioning
from leansd.runtime.depth import DepthEstimator, as_uint8_images, depth_condition, load_depth_map
from leansd.runtime.errors import InvalidInputError, LeanSDWarning, ModelFolderError
from leansd.runtime.image import image_to_model_input, load_image, load_mask, mask_to_model_input, nearest_resize, unit_array_to_model_input
from leansd.runtime.models import VaeEncoder
from leansd.runtime.rng import NoiseSource
from leansd.runtime.schedulers import Plan, Scheduler
from leansd.runtime.schedulers.common import BETA_SCHEDULES, alphas_cumprod, config_from_dict, require


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


# Called after each scheduler step with (step index, latents); returns the latents the next step starts from.
AfterStep = Callable[[int, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Prepared:
    """How a generation starts: the initial latents, the conditioning (with whatever the task adds), and an optional
    function the loop applies to the latents after every step."""

    latents: np.ndarray
    cond: Conditioning
    after_step: AfterStep | None = None


class TextToImage:
    """Start from noise (or the caller's `latents`), scaled to the scheduler's first noise level."""

    strength = 1.0

    def size(self) -> tuple[int, int] | None:
        """(height, width) the task implies when the call gives none; None: the model's default."""
        return None

    def prepare(self, start: Start, cond: Conditioning) -> Prepared:
        """The initial latents and conditioning."""
        return Prepared((self.start_noise(start) * np.float32(start.plan.init_noise_sigma)).astype(np.float32), cond)

    @staticmethod
    def start_noise(start: Start) -> np.ndarray:
        """The start noise: the caller's latents, or drawn (as diffusers' `randn_tensor`)."""
        if start.latents is None:
            return start.noise.randn(start.latent_shape).astype(np.float32)
        latents = np.asarray(start.latents, dtype=np.float32)
        if latents.shape != start.latent_shape:
            raise InvalidInputError(f"latents have shape {latents.shape}, expected {start.latent_shape} for this batch and size")
        return latents


class ImageToImage(TextToImage):
    """Start from an image: encode it, sample the latent distribution, noise it to the plan's first timestep."""

    def __init__(self, image: Any, strength: float, factor: int = 8, add_noise: bool = True):
        self.strength, self.factor, self.add_noise = strength, factor, add_noise
        self.latents = None  # latents given as the image (N x C x h x w): a base model's output for a refiner
        if isinstance(image, np.ndarray) and image.ndim == 4 and image.shape[-1] != 3:
            self.latents, image = image.astype(np.float32), np.zeros((1, 1, 1, 3), np.float32)
        self.image = load_image(image) if not isinstance(image, np.ndarray) else image
        if isinstance(self.image, np.ndarray):
            self.image = self.image.astype(np.float32) / (255.0 if self.image.dtype == np.uint8 else 1.0)
            if self.image.ndim not in (3, 4) or self.image.shape[-1] != 3:
                raise InvalidInputError(f"init image array has shape {self.image.shape}; pass HxWx3 or NxHxWx3 in [0, 1]")

    def size(self) -> tuple[int, int]:
        if self.latents is not None:
            return self.latents.shape[-2] * self.factor, self.latents.shape[-1] * self.factor
        if isinstance(self.image, np.ndarray):
            return tuple(self.image.shape[-3:-1])  # type: ignore[return-value]
        return self.image.size[1], self.image.size[0]

    def pixels(self, start: Start) -> np.ndarray:
        """The init image as the VAE encoder takes it: N x 3 x height x width in [-1, 1]."""
        if isinstance(self.image, np.ndarray):
            pixels = unit_array_to_model_input(self.image)
            if pixels.shape[-2:] != (start.height, start.width):
                raise InvalidInputError(
                    f"init image array is {pixels.shape[-1]}x{pixels.shape[-2]} but the output size is {start.width}x{start.height}; "
                    "resize it or pass a PIL image"
                )
            return pixels
        return image_to_model_input(self.image, start.width, start.height)

    def prepare(self, start: Start, cond: Conditioning) -> Prepared:
        init = self.latents if self.latents is not None else encode(start, self.pixels(start))
        if init.shape[1:] != start.latent_shape[1:]:
            raise InvalidInputError(f"image latents have shape {init.shape}; expected (N, {', '.join(map(str, start.latent_shape[1:]))}) "
                                    "for this model and size")
        init = spread(init, start.latent_shape[0], "init images")
        if not self.add_noise:  # denoising_start: the latents are already as noisy as the plan's first step wants
            return Prepared(init, cond)
        return Prepared(start.scheduler.add_noise(start.plan, init, start.noise.randn(init.shape)).astype(np.float32), cond)


class Inpaint(ImageToImage):
    """Repaint the white part of `mask_image` in `image`, as diffusers' StableDiffusionInpaintPipeline.

    With the same seed, the generator's draws come in diffusers' order: the init image's latent sample (ordinary
    UNets, or strength < 1), the start noise, then the masked image's latent sample (unless `masked_image_latents`
    are given; for an ordinary UNet, which does not use them, only the draw is made), then the scheduler's.
    `inpainting_unet`: the UNet takes [latents, mask, masked image latents] (2 x latent channels + 1); otherwise it
    is an ordinary UNet and the image's latents, noised to the next step's level, replace the latents outside the
    mask after every step.
    """

    def __init__(self, image: Any, mask_image: Any, strength: float, masked_image_latents: np.ndarray | None, inpainting_unet: bool):
        super().__init__(image, strength)
        self.mask = load_mask(mask_image)
        self.masked_image_latents = None if masked_image_latents is None else np.asarray(masked_image_latents, dtype=np.float32)
        self.inpainting_unet = inpainting_unet

    def prepare(self, start: Start, cond: Conditioning) -> Prepared:
        batch, _, h, w = start.latent_shape
        pixels = self.pixels(start)
        self._warn_if_stretched(start)
        mask = mask_to_model_input(self.mask, start.width, start.height)
        image_latents = None
        if not self.inpainting_unet or (start.latents is None and self.strength < 1.0):
            image_latents = spread(encode(start, pixels), batch, "init images")
        noise = self.start_noise(start)
        if start.latents is None and self.strength < 1.0:
            latents = start.scheduler.add_noise(start.plan, image_latents, noise)
        else:  # as diffusers: full noise, and caller's latents are the start noise whatever the strength
            latents = noise * np.float32(start.plan.init_noise_sigma)
        masked = self._masked_latents(start, pixels, mask)
        mask = spread(nearest_resize(mask, h, w), batch, "masks")
        if self.inpainting_unet:
            concat = np.concatenate([mask, spread(masked, batch, "masked image latents")], axis=1).astype(np.float32)
            return Prepared(latents.astype(np.float32), replace(cond, concat=concat))
        return Prepared(latents.astype(np.float32), cond, blend(start, image_latents, noise, mask))

    def _warn_if_stretched(self, start: Start) -> None:
        """The mask is resized to the output size, as diffusers does; a mask of another shape than the output is
        then stretched, which is rarely what was meant."""
        h, w = self.mask.shape[-2:] if isinstance(self.mask, np.ndarray) else (self.mask.height, self.mask.width)
        if abs(w / h - start.width / start.height) > 0.01 * start.width / start.height:
            warnings.warn(f"the mask is {w}x{h} and the output {start.width}x{start.height}: the mask is stretched to the output "
                          "size; pass a mask of the image's shape", LeanSDWarning, stacklevel=2)

    def _masked_latents(self, start: Start, pixels: np.ndarray, mask: np.ndarray) -> np.ndarray | None:
        """The masked image's latents (the caller's, or the init image with the mask's pixels at 0, encoded)."""
        given, (_, channels, h, w) = self.masked_image_latents, start.latent_shape
        if given is not None:
            if given.ndim != 4 or given.shape[1:] != (channels, h, w):
                raise InvalidInputError(f"masked_image_latents have shape {given.shape}; expected (N, {channels}, {h}, {w}) for this size")
            return given
        if pixels.shape[0] != mask.shape[0] and 1 not in (pixels.shape[0], mask.shape[0]):
            raise InvalidInputError(f"{pixels.shape[0]} init images and {mask.shape[0]} masks do not pair up; pass one mask or one per image")
        masked = pixels * (mask < 0.5)
        if not self.inpainting_unet:  # unused; the draw keeps the later noise equal to diffusers'
            start.noise.randn((masked.shape[0], channels, h, w))
            return None
        return encode(start, masked.astype(np.float32))


@dataclass(frozen=True)
class LowResNoiseConfig:
    """The part of the upscaler's low-resolution scheduler (a DDPM config) that sets its noise levels."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: Any = None


class Upscale(TextToImage):
    """The x4 upscaler (diffusers' StableDiffusionUpscalePipeline): the output is the VAE factor times the image's size.

    The image, rounded down to a multiple of the factor (or resized to the output size / factor when a size is
    given, bicubic as diffusers), is noised to `noise_level` with the low-resolution scheduler and laid beside the
    latents at every step; the noise level is the UNet's class label. With the same seed the generator's draws come
    in diffusers' order: the image's noise, then the start noise, then the scheduler's.
    """

    def __init__(self, image: Any, noise_level: int, low_res_config: dict | None, max_noise_level: int, factor: int):
        if noise_level > max_noise_level:
            raise InvalidInputError(f"noise_level {noise_level} is above this upscaler's maximum {max_noise_level}; use 0 to {max_noise_level}")
        self.image = load_image(image) if not isinstance(image, np.ndarray) else image
        if isinstance(self.image, np.ndarray):
            self.image = self.image.astype(np.float32) / (255.0 if self.image.dtype == np.uint8 else 1.0)
            if self.image.ndim not in (3, 4) or self.image.shape[-1] != 3:
                raise InvalidInputError(f"image array has shape {self.image.shape}; pass HxWx3 or NxHxWx3 in [0, 1]")
        self.noise_level, self.factor = noise_level, factor
        config = config_from_dict(LowResNoiseConfig, low_res_config or {})
        require("beta_schedule", config.beta_schedule, BETA_SCHEDULES)
        self.alphas_cumprod = alphas_cumprod(config)

    def size(self) -> tuple[int, int]:
        """The output size: the image's, rounded down to a multiple of the factor, times the factor."""
        h, w = self.image.shape[-3:-1] if isinstance(self.image, np.ndarray) else (self.image.height, self.image.width)
        if h < self.factor or w < self.factor:
            raise InvalidInputError(f"image {w}x{h} is smaller than {self.factor}x{self.factor}; pass a larger image to upscale")
        return self.factor * (h - h % self.factor), self.factor * (w - w % self.factor)

    def prepare(self, start: Start, cond: Conditioning) -> Prepared:
        batch, _, h, w = start.latent_shape
        if isinstance(self.image, np.ndarray):
            pixels = unit_array_to_model_input(self.image)
            if pixels.shape[-2:] != (h, w):
                raise InvalidInputError(f"image array is {pixels.shape[-1]}x{pixels.shape[-2]} but a {start.width}x{start.height} output "
                                        f"upscales {w}x{h}; resize it or pass a PIL image")
        else:
            pixels = image_to_model_input(self.image, w, h, resample="bicubic")
        a = self.alphas_cumprod[self.noise_level]
        noise = start.noise.randn(pixels.shape)
        noised = (np.float32(a**0.5) * pixels + np.float32((1 - a) ** 0.5) * noise).astype(np.float32)
        latents = (self.start_noise(start) * np.float32(start.plan.init_noise_sigma)).astype(np.float32)
        labels = np.full((batch,), self.noise_level, dtype=np.int64)
        return Prepared(latents, replace(cond.with_inputs(class_labels=labels), concat=spread(noised, batch, "images")))


class DepthToImage(ImageToImage):
    """Image-to-image on a depth-conditioned UNet: the latents start as image-to-image's (same draws, same order), and
    the depth map (the caller's, else the estimator's prediction from the init image), resized to the latents and scaled
    to [-1, 1] (`leansd.runtime.depth`), is the UNet's extra channel. `depth` is the map used, before resizing."""

    def __init__(self, image: Any, strength: float, depth_map: Any, estimator: DepthEstimator | None = None):
        super().__init__(image, strength)
        self.depth = None if depth_map is None else load_depth_map(depth_map)
        self.estimator = estimator

    def prepare(self, start: Start, cond: Conditioning) -> Prepared:
        if self.depth is None:
            assert self.estimator is not None, "checked when the task was chosen"
            self.depth = self.estimator.estimate(as_uint8_images(self.image))
        begun = super().prepare(start, cond)
        batch, _, h, w = start.latent_shape
        depth = spread(depth_condition(self.depth, h, w), batch, "depth maps")
        return replace(begun, cond=replace(begun.cond, concat=depth))


def encode(start: Start, pixels: np.ndarray) -> np.ndarray:
    """Images in [-1, 1] -> scaled latents, sampled from the encoder's distribution (diffusers'
    `latent_dist.sample(generator)`: one draw of the whole batch's shape)."""
    encoder = start.vae_encoder
    if encoder is None:
        raise ModelFolderError(start.no_encoder_fix)
    mean, logvar = encoder.encode(pixels)
    sample = mean + np.exp(0.5 * logvar) * start.noise.randn(mean.shape)
    return (encoder.scaling_factor * (sample - encoder.shift_factor)).astype(np.float32)


def spread(items: np.ndarray, batch: int, what: str) -> np.ndarray:
    """`items` repeated to fill the batch (one for all outputs, or one per prompt...)."""
    if batch % items.shape[0]:
        raise InvalidInputError(f"{items.shape[0]} {what} cannot be spread over a batch of {batch}; pass one, or one per output")
    return np.concatenate([items] * (batch // items.shape[0]))


def blend(start: Start, image_latents: np.ndarray, noise: np.ndarray, mask: np.ndarray) -> AfterStep:
    """Inpainting with an ordinary UNet: after step i, outside the mask the latents are the image's, noised to the
    next step's level (clean after the last step), as diffusers' pipeline does for 4-channel UNets."""
    last = len(start.plan.timesteps) - 1

    def after_step(i: int, latents: np.ndarray) -> np.ndarray:
        proper = start.scheduler.add_noise(start.plan, image_latents, noise, i + 1) if i < last else image_latents
        return ((1 - mask) * proper + mask * latents).astype(np.float32)

    return after_step
