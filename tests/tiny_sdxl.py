"""Tiny SDXL models (base, refiner, inpainting) with real architectures and seeded random weights, built in the tests.

The shapes of the released models in miniature: two CLIP text encoders (the second with a projection, whose
`text_embeds` are the pooled embedding), a UNet with SDXL's `text_time` added conditioning (pooled text
embedding + micro-conditioning time ids), Euler with leading spacing as SDXL ships it, and a VAE with SDXL's
scaling factor. The refiner keeps only the second encoder and conditions on an aesthetic score (5 time ids).
"""
from __future__ import annotations

import shutil
from pathlib import Path

from tests.tiny_models import CLIP_VOCAB_DIR

# SDXL 1.0's scheduler_config.json, less the keys of other schedulers it carries (clip_sample, set_alpha_to_one...).
SDXL_SCHEDULER = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
    "interpolation_type": "linear", "prediction_type": "epsilon", "steps_offset": 1, "timestep_spacing": "leading",
    "trained_betas": None, "use_karras_sigmas": False,
}
# SDXL-Turbo's: Euler ancestral with trailing timesteps (1-4 steps, no guidance).
TURBO_SCHEDULER = {**{k: v for k, v in SDXL_SCHEDULER.items() if k not in ("interpolation_type", "use_karras_sigmas")},
                   "timestep_spacing": "trailing"}
# The two encoders differ in width, as in SDXL (768 and 1280): diffusers tells their weights apart by it.
TEXT_WIDTH, TEXT_WIDTH_2, PROJECTION = 32, 48, 32
TIME_EMBED = 8


def _text_config(width: int, **extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(hidden_size=width, intermediate_size=37, num_attention_heads=4, num_hidden_layers=3,
                          max_position_embeddings=77, vocab_size=49408, hidden_act="gelu", **extra)


def _tokenizer(pad: str | None = None):
    from transformers import CLIPTokenizer

    kwargs = {"pad_token": pad} if pad else {}
    return CLIPTokenizer(str(CLIP_VOCAB_DIR / "vocab.json"), str(CLIP_VOCAB_DIR / "merges.txt"), model_max_length=77, **kwargs)


def build_tiny_sdxl(path: Path, *, seed: int = 0, refiner: bool = False, inpainting: bool = False, turbo: bool = False,
                    force_zeros_for_empty_prompt: bool = True) -> Path:
    """Save a tiny SDXL pipeline (base, or `refiner`, or a 9-channel `inpainting` base) at `path` and return it.

    `turbo`: SDXL-Turbo's scheduler (Euler ancestral, trailing timesteps), the one thing its folder changes besides
    the weights and the 512x512 size."""
    import torch
    from diffusers import (AutoencoderKL, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline,
                           StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    time_ids = 5 if refiner else 6
    context = TEXT_WIDTH_2 if refiner else TEXT_WIDTH + TEXT_WIDTH_2
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=9 if inpainting else 4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2), norm_num_groups=8,
        addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED,
        projection_class_embeddings_input_dim=time_ids * TIME_EMBED + PROJECTION, cross_attention_dim=context,
    )
    vae = AutoencoderKL(
        block_out_channels=[16, 32], in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=8, layers_per_block=1, sample_size=32,
        scaling_factor=0.13025,
    )
    text_encoder = None if refiner else CLIPTextModel(_text_config(TEXT_WIDTH))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(TEXT_WIDTH_2, projection_dim=PROJECTION))
    parts = dict(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=None if refiner else _tokenizer(),
                 tokenizer_2=_tokenizer(pad="!"), unet=unet,
                 scheduler=(EulerAncestralDiscreteScheduler(**TURBO_SCHEDULER) if turbo
                            else EulerDiscreteScheduler(**SDXL_SCHEDULER)))
    if refiner:
        pipe = StableDiffusionXLImg2ImgPipeline(**parts, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    elif inpainting:
        pipe = StableDiffusionXLInpaintPipeline(**parts, force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)
    else:
        pipe = StableDiffusionXLPipeline(**parts, force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)
    tmp.rename(path)
    return path


def write_sdxl_checkpoint(diffusers_dir: Path, path: Path) -> None:
    """Save the tiny SDXL pipeline at `diffusers_dir` as one file in Stability's SDXL layout (`sd_xl_base_1.0`'s key
    names): the LDM UNet and VAE, `conditioner.embedders.0` the CLIP text encoder (transformers' names) and
    `conditioner.embedders.1` (the refiner: `.0`) the OpenCLIP one with its projection stored transposed."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from tests.export.compvis import unet_to_ldm, vae_to_ldm
    from tests.tiny_sd2 import OPEN_CLIP, text_encoder_to_open_clip

    unet = UNet2DConditionModel.from_pretrained(diffusers_dir, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(diffusers_dir, subfolder="vae")
    state = {**unet_to_ldm(unet.state_dict(), dict(unet.config)), **vae_to_ldm(vae.state_dict(), dict(vae.config))}
    refiner = not (diffusers_dir / "text_encoder").is_dir()
    if not refiner:
        first = CLIPTextModel.from_pretrained(diffusers_dir, subfolder="text_encoder")
        state.update({"conditioner.embedders.0.transformer." + k: v for k, v in first.state_dict().items()})
    second = CLIPTextModelWithProjection.from_pretrained(diffusers_dir, subfolder="text_encoder_2")
    weights = second.state_dict()
    projection = weights.pop("text_projection.weight")
    prefix = f"conditioner.embedders.{0 if refiner else 1}.model."
    for key, value in text_encoder_to_open_clip(weights).items():
        state[prefix + key[len(OPEN_CLIP):]] = value
    state[prefix + "text_projection"] = projection.T
    save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(path))
