"""Test-only: write a diffusers SD 1.x pipeline as a single-file checkpoint in the original CompVis layout.

The inverse of the key renaming diffusers' `from_single_file` performs, written from the two layouts'
module structure (LDM `openaimodel.py` / `model.py` vs diffusers' blocks), for the configurations the tests
build (any number of blocks and layers). The tests check the round trip gives back every tensor exactly.
"""
from __future__ import annotations

from typing import Any

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename(key: str, prefix_map: dict[str, str], inner: dict[str, str] | None = None) -> str | None:
    """Map `key` through the first matching diffusers prefix -> LDM prefix, renaming its inner module too."""
    for src, dst in prefix_map.items():
        if key.startswith(src + "."):
            rest = key[len(src) + 1 :]
            for a, b in (inner or {}).items():
                if rest.startswith(a + "."):
                    rest = b + rest[len(a) :]
                    break
            return f"{dst}.{rest}"
    return None


def unet_to_ldm(state: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    layers = config["layers_per_block"]
    n = len(config["block_out_channels"])
    plain = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
        "class_embedding": "label_emb",  # the x4 upscaler's noise-level embedding
        "add_embedding.linear_1": "label_emb.0.0",  # SDXL's pooled-text + time-ids embedding
        "add_embedding.linear_2": "label_emb.0.2",
    }
    resnets, attns = {}, {}
    for i in range(n):
        for j in range(layers):
            k = 1 + i * (layers + 1) + j
            resnets[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{k}.0"
            attns[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{k}.1"
        plain[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{(i + 1) * (layers + 1)}.0.op"
        up_has_attn = "CrossAttn" in config["up_block_types"][i]
        for j in range(layers + 1):
            k = i * (layers + 1) + j
            resnets[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{k}.0"
            attns[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{k}.1"
        last = i * (layers + 1) + layers
        plain[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{last}.{2 if up_has_attn else 1}.conv"
    resnets.update({"mid_block.resnets.0": "middle_block.0", "mid_block.resnets.1": "middle_block.2"})
    attns["mid_block.attentions.0"] = "middle_block.1"
    out = {}
    for key, value in state.items():
        new = _rename(key, resnets, RESNET) or _rename(key, attns) or _rename(key, plain)
        assert new is not None, f"no CompVis name for UNet key {key}"
        out["model.diffusion_model." + new] = value
    return out


def vae_to_ldm(state: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    n = len(config["block_out_channels"])
    prefixes = {"encoder.mid_block.resnets.0": "encoder.mid.block_1", "encoder.mid_block.resnets.1": "encoder.mid.block_2",
                "decoder.mid_block.resnets.0": "decoder.mid.block_1", "decoder.mid_block.resnets.1": "decoder.mid.block_2",
                "encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"}
    for i in range(n):
        prefixes[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = f"encoder.down.{i}.downsample.conv"
        prefixes[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = f"decoder.up.{n - 1 - i}.upsample.conv"  # LDM counts up blocks from the bottom
        for j in range(config["layers_per_block"] + 1):
            prefixes[f"encoder.down_blocks.{i}.resnets.{j}"] = f"encoder.down.{i}.block.{j}"
            prefixes[f"decoder.up_blocks.{i}.resnets.{j}"] = f"decoder.up.{n - 1 - i}.block.{j}"
    attn = {"encoder.mid_block.attentions.0": "encoder.mid.attn_1", "decoder.mid_block.attentions.0": "decoder.mid.attn_1"}
    out = {}
    for key, value in state.items():
        new = _rename(key, attn, VAE_ATTN)
        if new is not None:
            if value.ndim == 2:  # LDM's attention projections are 1x1 convolutions
                value = value[:, :, None, None]
        else:
            new = _rename(key, prefixes, {"conv_shortcut": "nin_shortcut"}) or key
        out["first_stage_model." + new] = value
    return out


def text_encoder_to_ldm(state: dict[str, Any]) -> dict[str, Any]:
    return {"cond_stage_model.transformer." + k: v for k, v in state.items()}


def write_checkpoint(diffusers_dir, path) -> None:
    """Save the diffusers pipeline at `diffusers_dir` as one CompVis-layout file (.safetensors or .ckpt)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(diffusers_dir, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(diffusers_dir, subfolder="vae")
    text = CLIPTextModel.from_pretrained(diffusers_dir, subfolder="text_encoder")
    state = {
        **unet_to_ldm(unet.state_dict(), dict(unet.config)),
        **vae_to_ldm(vae.state_dict(), dict(vae.config)),
        **text_encoder_to_ldm(text.state_dict()),
    }
    state = {k: v.detach().contiguous().clone() for k, v in state.items()}
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, str(path))
