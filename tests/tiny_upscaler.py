"""A tiny x4 upscaler (diffusers' StableDiffusionUpscalePipeline) with a real architecture and seeded random weights.

The released model's shape in miniature: a 7-channel UNet (latents + the noised low-resolution image) conditioned on
the noise level through a class embedding, a VAE with a scale factor of 4 and the upscaler's latent scaling factor
(0.08333), v-prediction with DDIM, and a DDPM scheduler that noises the low-resolution image.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from tests.tiny_models import CLIP_VOCAB_DIR

# The released upscaler's schedulers (its scheduler_config.json files), which the tiny model keeps.
UPSCALER_SCHEDULER = {
    "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
    "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": "v_prediction",
}
LOW_RES_SCHEDULER = {
    "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
    "clip_sample": True, "variance_type": "fixed_small",
}


def build_tiny_upscaler(path: Path, *, seed: int = 0, cross_attention_dim: int = 32) -> Path:
    """Save a tiny StableDiffusionUpscalePipeline at `path` and return it."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=7,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
        num_class_embeds=100,
        use_linear_projection=True,
    )
    vae = AutoencoderKL(
        block_out_channels=[16, 32, 32],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
        sample_size=64,
        scaling_factor=0.08333,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=cross_attention_dim, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=77, vocab_size=49408, hidden_act="gelu",
    ))
    tokenizer = CLIPTokenizer(str(CLIP_VOCAB_DIR / "vocab.json"), str(CLIP_VOCAB_DIR / "merges.txt"), model_max_length=77)
    pipe = StableDiffusionUpscalePipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        low_res_scheduler=DDPMScheduler(**LOW_RES_SCHEDULER), scheduler=DDIMScheduler(**UPSCALER_SCHEDULER),
        max_noise_level=60,
    )
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)
    tmp.rename(path)
    return path
