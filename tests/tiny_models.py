"""Tiny Stable Diffusion 1.x models with real architectures and seeded random weights, built in the tests.

Nothing is downloaded: the tokenizer is CLIP's real BPE vocabulary shipped in `leansd/export/configs/clip/`.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLIP_VOCAB_DIR = REPO / "leansd" / "export" / "configs" / "clip"

# diffusers' PNDM configuration as shipped with SD 1.x checkpoints.
SD1_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}


def build_tiny_sd(
    path: Path,
    *,
    vae_blocks: int = 2,
    prediction_type: str = "epsilon",
    seed: int = 0,
    cross_attention_dim: int = 32,
    inpainting: bool = False,
    top_attention: bool = False,
    time_cond_proj_dim: int | None = None,
) -> Path:
    """Save a tiny SD 1.x diffusers pipeline at `path` and return it.

    `vae_blocks` sets the VAE scale factor to 2 ** (vae_blocks - 1): 2 blocks give 2, 3 give 4.
    `inpainting`: a 9-channel UNet (latents, mask, masked image latents) saved as a StableDiffusionInpaintPipeline,
    as SD 1.5's and SD 2's inpainting models are. `top_attention`: attention at the latent's own resolution (the
    first down and last up block), as in SD 1.x/2.x, instead of at the lower one. `time_cond_proj_dim`: a UNet that takes
    its guidance scale as an embedding of that width, saved with an LCMScheduler as a LatentConsistencyModelPipeline,
    as LCM-distilled models (LCM_Dreamshaper_v7) are.
    """
    import torch
    from diffusers import (AutoencoderKL, LatentConsistencyModelPipeline, LCMScheduler, PNDMScheduler, StableDiffusionInpaintPipeline,
                           StableDiffusionPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=9 if inpainting else 4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D") if top_attention else ("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D") if top_attention else ("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
        time_cond_proj_dim=time_cond_proj_dim,
    )
    vae = AutoencoderKL(
        block_out_channels=[16, 32, 32, 32][:vae_blocks],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * vae_blocks,
        up_block_types=["UpDecoderBlock2D"] * vae_blocks,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
        sample_size=32,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=cross_attention_dim,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=77,
            vocab_size=49408,
        )
    )
    # A trained CLIP's final layer norm has a scale and a bias; left at their initial 1 and 0, every hidden state would
    # have mean 0 over its width, and AUTOMATIC1111's prompt weighting (which restores a chunk's mean) would divide by
    # ~0. A generator of its own keeps every other weight as it was.
    norm, draw = text_encoder.text_model.final_layer_norm, torch.Generator().manual_seed(seed)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(norm.weight.shape, generator=draw))
        norm.bias.copy_(0.2 + 0.1 * torch.randn(norm.bias.shape, generator=draw))
    tokenizer = CLIPTokenizer(
        str(CLIP_VOCAB_DIR / "vocab.json"), str(CLIP_VOCAB_DIR / "merges.txt"), model_max_length=77
    )
    scheduler = PNDMScheduler(**{**SD1_SCHEDULER, "prediction_type": prediction_type})
    pipeline_class = StableDiffusionInpaintPipeline if inpainting else StableDiffusionPipeline
    if time_cond_proj_dim is not None:  # LCM_Dreamshaper_v7's scheduler settings
        pipeline_class = LatentConsistencyModelPipeline
        settings = {**{k: v for k, v in SD1_SCHEDULER.items() if k != "skip_prk_steps"}, "set_alpha_to_one": True}
        scheduler = LCMScheduler(**settings, prediction_type=prediction_type, original_inference_steps=50)
    pipe = pipeline_class(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)
    # Real SD 1.x scheduler configs carry clip_sample=false (PNDM ignores it; DDIM, switched to from this config,
    # would otherwise take its own default True). Keep the key, as the released checkpoints do.
    config_path = tmp / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config["clip_sample"] = False
    config_path.write_text(json.dumps(config, indent=2))
    tmp.rename(path)
    return path
