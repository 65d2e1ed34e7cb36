"""Which task a call asks of a model folder: text-to-image, image-to-image, inpainting, depth-to-image or the x4
upscaler, told by the settings and by the UNet's input channels; each kind of model refuses the settings it cannot use."""
from __future__ import annotations

from leansd.runtime.bundle import ModelBundle
from leansd.runtime.depth import DepthEstimator
from leansd.runtime.errors import InvalidInputError
from leansd.runtime.settings import GenerationSettings
from leansd.runtime.tasks import DepthToImage, ImageToImage, Inpaint, TextToImage, Upscale


def choose_task(s: GenerationSettings, bundle: ModelBundle, in_channels: int, latent: int, factor: int,
                estimator: DepthEstimator | None) -> TextToImage:
    """The task the settings ask of this model (its UNet's input channels tell its kind); strengths default as in
    diffusers (0.8 image-to-image, 1.0 inpainting; the model folder may say otherwise, as SDXL's do)."""
    inpainting_unet = in_channels == 2 * latent + 1
    if in_channels == latent + 3 and bundle.unet_config.get("num_class_embeds") is not None:
        return _upscale(s, bundle, factor)
    if s.noise_level is not None:
        raise InvalidInputError("noise_level is a setting of the x4 upscaler, and this model is not one; leave it unset")
    if in_channels == latent + 1:
        if s.image is None or (s.depth_map is None and estimator is None) or s.mask_image is not None:
            raise InvalidInputError(
                f"{bundle.root} is a depth-to-image model (its UNet takes latents and a depth map); pass image"
                f"{'' if estimator else ' and depth_map, larger values nearer'} (sd-run --init-image IMAGE"
                f"{'' if estimator else ' --depth-map DEPTH.png|.npy; the folder has no depth estimator: export one from a folder with depth_estimator/'})"
            )
        return DepthToImage(s.image, 0.8 if s.strength is None else s.strength, s.depth_map, estimator)
    if s.depth_map is not None:
        raise InvalidInputError(f"depth_map is for depth-to-image models; {bundle.root} is not one (leave depth_map out)")
    if s.mask_image is not None:
        strength = s.strength if s.strength is not None else float(bundle.defaults().get("inpaint_strength", 1.0))
        return Inpaint(s.image, s.mask_image, strength, s.masked_image_latents, inpainting_unet)
    if inpainting_unet:
        raise InvalidInputError(
            f"{bundle.root} is an inpainting model (its UNet takes {in_channels} channels: latents, mask and "
            "masked image); pass image and mask_image (sd-run --init-image IMAGE --mask MASK)"
        )
    if s.denoising_start is not None and s.image is None:
        raise InvalidInputError("denoising_start continues a generation: pass image, the latents the base model returned "
                                "with denoising_end and output_type='latent' (or an image)")
    if s.image is None:
        if bundle.pipeline_class.endswith("Img2ImgPipeline"):  # SDXL's refiner
            raise InvalidInputError(f"{bundle.root} is an image-to-image model (a refiner); pass image: a picture, or the "
                                    "latents a base model returned with denoising_end and output_type='latent'")
        return TextToImage()
    strength = s.strength if s.strength is not None else float(bundle.defaults().get("strength", 0.8))
    return ImageToImage(s.image, strength, factor, add_noise=s.denoising_start is None)


def _upscale(s: GenerationSettings, bundle: ModelBundle, factor: int) -> Upscale:
    if s.image is None:
        raise InvalidInputError(f"{bundle.root} is the x4 upscaler; pass image, the picture to upscale (sd-run --init-image IMAGE)")
    for name in ("mask_image", "strength", "masked_image_latents"):
        if getattr(s, name) is not None:
            raise InvalidInputError(f"{name} does not apply to the x4 upscaler; leave it unset (noise_level sets how much it invents)")
    # diffusers' defaults: noise level 20 of at most 350 (the pipeline's registered max_noise_level)
    maximum = int((bundle.model_index or {}).get("max_noise_level", 350))
    limit = bundle.unet_config.get("num_class_embeds")
    return Upscale(s.image, 20 if s.noise_level is None else s.noise_level, bundle.low_res_scheduler_config,
                   min(maximum, int(limit) - 1), factor)
