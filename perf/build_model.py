"""Build the benchmark model: a diffusers Stable Diffusion folder with seeded random weights.

    python perf/build_model.py perf/configs/full.json OUT_DIR
    python perf/build_model.py --tiny-vae OUT_DIR        # a tiny VAE (TAESD's architecture) for the same latents
    python perf/build_model.py perf/configs/sdxl.json OUT_DIR   # SDXL base: configs from leansd/export/configs/sdxl_base

The architecture comes from the config's `unet`, `vae`, `text_encoder` and `scheduler` sections (the SD 1.5
numbers in `configs/full.json`, no download); the tokenizer is CLIP's real BPE vocabulary in `leansd/export/configs/clip/`.
Weights are PyTorch's default initialisation after `torch.manual_seed(seed)`. The folder is written next to
OUT_DIR and renamed into place, so an interrupted build never looks complete.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLIP_DIR = REPO / "leansd" / "export" / "configs" / "clip"


def build(config: dict, out: Path) -> Path:
    if config.get("pipeline") == "sdxl":
        return build_sdxl(config, out)
    import torch
    import diffusers
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(int(config.get("seed", 0)))
    with torch.no_grad():
        text_encoder = CLIPTextModel(CLIPTextConfig(architectures=["CLIPTextModel"], **config["text_encoder"])).eval()
        unet = UNet2DConditionModel(**config["unet"]).eval()
        vae = AutoencoderKL(**config["vae"]).eval()
    tokenizer = CLIPTokenizer(str(CLIP_DIR / "vocab.json"), str(CLIP_DIR / "merges.txt"), model_max_length=77)
    # SD 1.5's PNDM unless the config names another (SD-Turbo ships EulerDiscreteScheduler).
    scheduler = getattr(diffusers, config.get("scheduler_class", "PNDMScheduler"))(**config["scheduler"])
    # StableDiffusionPipeline unless the config names another with the same parts (LatentConsistencyModelPipeline).
    pipe = getattr(diffusers, config.get("pipeline_class", "StableDiffusionPipeline"), StableDiffusionPipeline)(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return _save(pipe, out)


def build_sdxl(config: dict, out: Path) -> Path:
    """An SDXL folder from the architecture configs leansd ships for single-file checkpoints (`config["configs"]`,
    relative to the repository) with the config's `overrides` per component, seeded random weights. `save_dtype` float16
    halves the folder (7 GB instead of 14 GB for the base model); diffusers and sd-export load it back as float32."""
    import torch
    import diffusers
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    configs = REPO / config["configs"]
    # `overrides` replaces some keys of a shipped config (a narrow model for a quick check of the harness).
    overrides = config.get("overrides", {})
    read = lambda name: {**json.loads((configs / name / "config.json").read_text()), **overrides.get(name, {})}  # noqa: E731
    torch.manual_seed(int(config.get("seed", 0)))
    dtype = getattr(torch, config.get("save_dtype", "float32"))
    with torch.no_grad():
        unet = UNet2DConditionModel.from_config(read("unet")).eval().to(dtype)
        vae = AutoencoderKL.from_config(read("vae")).eval().to(dtype)
        text_encoder = CLIPTextModel(CLIPTextConfig(**read("text_encoder"))).eval().to(dtype)
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**read("text_encoder_2"))).eval().to(dtype)
    scheduler_config = json.loads((configs / "scheduler" / "scheduler_config.json").read_text())
    scheduler_config.update(config.get("scheduler", {}))
    scheduler = getattr(diffusers, config.get("scheduler_class", scheduler_config["_class_name"])).from_config(scheduler_config)
    tokenizer = CLIPTokenizer(str(CLIP_DIR / "vocab.json"), str(CLIP_DIR / "merges.txt"), model_max_length=77)
    # SDXL's second tokenizer pads with "!" (id 0), not with the end token.
    tokenizer_2 = CLIPTokenizer(str(CLIP_DIR / "vocab.json"), str(CLIP_DIR / "merges.txt"), model_max_length=77, pad_token="!")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                                     tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler)
    return _save(pipe, out)


def _save(pipe, out: Path) -> Path:
    """`pipe.save_pretrained` into a staging folder renamed into place, so an interrupted build never looks complete."""
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    pipe.save_pretrained(staging, safe_serialization=True)
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return out


def build_tiny_vae(out: Path, seed: int = 0) -> Path:
    """diffusers' `AutoencoderTiny` with its default (TAESD) architecture and seeded random weights."""
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    return _save(AutoencoderTiny().eval(), out)


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "--tiny-vae":
        print(f"built {build_tiny_vae(Path(argv[1]))}")
        return 0
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    config = json.loads(Path(argv[0]).read_text())
    start = time.perf_counter()
    out = build(config, Path(argv[1]))
    width = 2 if config.get("save_dtype") == "float16" else 4
    params = sum(f.stat().st_size for f in out.rglob("*.safetensors")) / width / 1e6
    print(f"built {out} ({params:.0f} M parameters) in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
