"""Write the Stable Diffusion 1.x diffusers configs that `sd-export` uses to convert a single-file checkpoint.

Dev tool; the JSON files it writes are committed next to it, so exporting needs no network. The numbers are
the SD 1.x architecture (CompVis `v1-inference.yaml`, as diffusers names it); every other key is filled in with
the library default by building each model on the meta device (no weights are allocated). Run

    python models/sd1/make_configs.py leansd/export/configs/sd1

The tokenizer's `vocab.json` and `merges.txt` are not duplicated here: the exporter takes them from
`leansd/export/configs/clip/`.
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)
VAE = dict(
    sample_size=512,
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=2,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32,
    scaling_factor=0.18215,
)
# OpenAI CLIP ViT-L/14 text tower. SD 1.x checkpoints carry the legacy token ids (bos 0, eos 2), which makes
# transformers pool at the highest token id (the end-of-text token), as the original model did.
TEXT_ENCODER = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)
SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    trained_betas=None,
    prediction_type="epsilon",
    timestep_spacing="leading",
)
MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def main(out: Path) -> None:
    import diffusers
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTokenizer

    with torch.device("meta"):
        UNet2DConditionModel(**UNET).save_config(out / "unet")
        AutoencoderKL(**VAE).save_config(out / "vae")
    CLIPTextConfig(architectures=["CLIPTextModel"], **TEXT_ENCODER).save_pretrained(out / "text_encoder")
    PNDMScheduler(**SCHEDULER).save_config(out / "scheduler")

    clip = Path(__file__).resolve().parents[2] / "leansd" / "export" / "configs" / "clip"
    with tempfile.TemporaryDirectory() as tmp:
        CLIPTokenizer(str(clip / "vocab.json"), str(clip / "merges.txt"), model_max_length=77).save_pretrained(tmp)
        (out / "tokenizer").mkdir(parents=True, exist_ok=True)
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            shutil.copyfile(Path(tmp) / name, out / "tokenizer" / name)

    index = {"_diffusers_version": diffusers.__version__, **MODEL_INDEX}
    (out / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent))
