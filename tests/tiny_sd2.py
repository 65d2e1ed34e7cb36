"""A tiny Stable Diffusion 2.x model (seeded random weights) and its single-file checkpoint in Stability's layout.

SD 2 differs from SD 1 where the conversion and the runtime can go wrong: an OpenCLIP text encoder (GELU, stored as
`cond_stage_model.model.*` with fused q/k/v), linear projections around the UNet's transformers, and a tokenizer that
pads with `!`. Nothing is downloaded; the tokenizer is CLIP's vocabulary shipped with leansd.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from tests.tiny_models import CLIP_VOCAB_DIR, SD1_SCHEDULER

OPEN_CLIP = "cond_stage_model.model."
# diffusers' CLIP text layer names -> OpenCLIP's (inside `transformer.resblocks.N.`).
OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}


def build_tiny_sd2(path: Path, *, prediction_type: str = "v_prediction", inpainting: bool = False, depth: bool = False,
                   estimator: bool = False, seed: int = 3) -> Path:
    """Save a tiny SD 2.x diffusers pipeline at `path` (VAE factor 2, 64-pixel native size) and return it.

    `inpainting`: a 9-channel UNet (StableDiffusionInpaintPipeline); `depth`: a 5-channel one (latents + depth map), saved
    as a StableDiffusionDepth2ImgPipeline, with a tiny DPT depth estimator (ViT, 32x32 input) and its feature extractor
    when `estimator` (the released model has a DPT-Hybrid one at 384x384), else without."""
    import torch
    from diffusers import (AutoencoderKL, PNDMScheduler, StableDiffusionDepth2ImgPipeline, StableDiffusionInpaintPipeline, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=9 if inpainting else 5 if depth else 4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(2, 4), norm_num_groups=8, use_linear_projection=True, upcast_attention=True,
    )
    vae = AutoencoderKL(block_out_channels=[16, 32], in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=8, layers_per_block=1, sample_size=64)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                                                max_position_embeddings=77, vocab_size=49408, hidden_act="gelu", projection_dim=16))
    tokenizer = CLIPTokenizer(str(CLIP_VOCAB_DIR / "vocab.json"), str(CLIP_VOCAB_DIR / "merges.txt"), model_max_length=77, pad_token="!")
    scheduler = PNDMScheduler(**{**SD1_SCHEDULER, "prediction_type": prediction_type})
    parts = dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
    if depth:
        dpt, processor = tiny_depth_estimator() if estimator else (None, None)
        pipe = StableDiffusionDepth2ImgPipeline(**parts, depth_estimator=dpt, feature_extractor=processor)
    else:
        pipe = (StableDiffusionInpaintPipeline if inpainting else StableDiffusionPipeline)(
            **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)
    config_path = tmp / "scheduler" / "scheduler_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "clip_sample": False}, indent=2))
    tmp.rename(path)
    return path


def tiny_depth_estimator():
    """A tiny DPT (ViT backbone; predicts 64x64 depth from 32x32 inputs) and a DPT feature extractor resizing to 32x32."""
    import torch
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    torch.manual_seed(7)
    config = DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=37, image_size=32, patch_size=8,
                       neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16, backbone_out_indices=[0, 1, 2, 3])
    processor = DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False, ensure_multiple_of=1,
                                  image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return DPTForDepthEstimation(config).eval(), processor


def tiny_hybrid_dpt():
    """A tiny DPT-Hybrid, the architecture of SD 2 depth's estimator (Intel/dpt-hybrid-midas: a BiT backbone whose first
    two stages feed the neck directly, then ViT layers), shrunk: 64x64 input."""
    import torch
    from transformers import BitConfig, DPTConfig, DPTForDepthEstimation

    torch.manual_seed(8)
    bit = BitConfig(global_padding="same", layer_type="bottleneck", depths=[1, 1, 1], hidden_sizes=[16, 32, 64], embedding_size=8,
                    out_features=["stage1", "stage2", "stage3"], num_groups=4)
    config = DPTConfig(is_hybrid=True, backbone_config=bit, backbone_featmap_shape=[1, 64, 4, 4], hidden_size=32, num_hidden_layers=4,
                       num_attention_heads=4, intermediate_size=37, image_size=64, patch_size=16, neck_hidden_sizes=[16, 32, 32, 32],
                       fusion_hidden_size=16, backbone_out_indices=[0, 1, 2, 3], reassemble_factors=[1, 1, 1, 0.5], neck_ignore_stages=[0, 1],
                       readout_type="project")
    return DPTForDepthEstimation(config).eval()


def text_encoder_to_open_clip(state: dict[str, Any], *, seed: int = 0) -> dict[str, Any]:
    """A transformers `CLIPTextModel` state dict in OpenCLIP's names, as SD 2 checkpoints store it (q/k/v fused into
    `in_proj_*`), with the tensors the conversion drops (a `text_projection` and `logit_scale`) present as in real files."""
    import torch

    out: dict[str, Any] = {}
    fused: dict[str, dict[str, Any]] = {}
    for key, value in state.items():
        rest = key.removeprefix("text_model.")
        if rest.startswith("encoder.layers."):
            index, inner = rest[len("encoder.layers."):].split(".", 1)
            prefix = f"{OPEN_CLIP}transformer.resblocks.{index}."
            if inner.startswith("self_attn.") and inner.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                _, proj, kind = inner.split(".")
                fused.setdefault(f"{prefix}attn.in_proj_{kind}", {})[proj] = value
                continue
            module, kind = inner.rsplit(".", 1)
            out[f"{prefix}{OPEN_CLIP_LAYER[module]}.{kind}"] = value
        elif rest == "embeddings.token_embedding.weight":
            out[OPEN_CLIP + "token_embedding.weight"] = value
        elif rest == "embeddings.position_embedding.weight":
            out[OPEN_CLIP + "positional_embedding"] = value
        elif rest.startswith("final_layer_norm."):
            out[OPEN_CLIP + "ln_final." + rest.rsplit(".", 1)[1]] = value
        elif rest != "embeddings.position_ids":
            raise AssertionError(f"no OpenCLIP name for text encoder key {key}")
    for key, parts in fused.items():
        out[key] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]], dim=0)
    width = out[OPEN_CLIP + "token_embedding.weight"].shape[1]
    generator = torch.Generator().manual_seed(seed)
    out[OPEN_CLIP + "text_projection"] = torch.randn(width, width, generator=generator)
    out[OPEN_CLIP + "logit_scale"] = torch.tensor(4.6052)
    return out


def write_sd2_checkpoint(diffusers_dir: Path, path: Path, *, global_step: int | None = None, metadata: dict[str, str] | None = None) -> None:
    """Save the SD 2 pipeline at `diffusers_dir` as one Stability-layout file: `.safetensors` (with `metadata` in its
    header) or a pickled `.ckpt` ({"state_dict": ..., "global_step": ...} as the released files)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from tests.export.compvis import unet_to_ldm, vae_to_ldm

    unet = UNet2DConditionModel.from_pretrained(diffusers_dir, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(diffusers_dir, subfolder="vae")
    text = CLIPTextModel.from_pretrained(diffusers_dir, subfolder="text_encoder")
    state = {**unet_to_ldm(unet.state_dict(), dict(unet.config)), **vae_to_ldm(vae.state_dict(), dict(vae.config)),
             **text_encoder_to_open_clip(text.state_dict())}
    state = {k: v.detach().contiguous().clone() for k, v in state.items()}
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state, str(path), metadata=metadata)
    else:
        torch.save({"state_dict": state, **({"global_step": global_step} if global_step is not None else {})}, str(path))
