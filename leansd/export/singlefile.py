"""Single-file SD 1.x checkpoints (`.ckpt` / `.safetensors` in the original CompVis layout), converted offline.

diffusers' own `from_single_file` does the key conversion; it is pointed at a local folder of SD 1.x configs
(`leansd/export/configs/sd1/`, with CLIP's vocabulary from `configs/clip/`) so it never reaches for the network.
Pickled `.ckpt` files are only ever read with `weights_only=True` (tensors, no arbitrary Python objects).
"""
from __future__ import annotations

import json
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any

from leansd.export.diffusers_folder import EXTRA_CHANNELS, Source, check_configs, check_folder, check_pipeline_class, read_json
from leansd.export.errors import ExportError

# Shipped inside the package so an installed leansd converts single files offline.
CONFIGS = Path(__file__).resolve().parent / "configs"
SD1_CONFIG = CONFIGS / "sd1"
CLIP_VOCAB = CONFIGS / "clip"

UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
VAE_IN = "first_stage_model.encoder.conv_in.weight"
CLIP_SD1 = "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"
OPEN_CLIP = "cond_stage_model.model.token_embedding.weight"
SDXL = "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight"


def read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a checkpoint, without loading more than needed."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as exc:  # noqa: BLE001 - a damaged or foreign file
            raise ExportError(f"'{path}' is not a readable .safetensors file ({exc.__class__.__name__}); check the download") from None
    import torch

    try:
        try:  # mmap: shapes without reading gigabytes (needs the zip format of torch >= 1.6)
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ExportError(
            f"'{path}' holds Python objects besides tensors and is not loaded for safety (weights_only); convert it to .safetensors with a tool you trust"
        ) from None
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"'{path}' is not a readable PyTorch checkpoint ({exc.__class__.__name__}); check the file") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ExportError(f"'{path}' does not hold a state dict; pass a Stable Diffusion checkpoint")
    return {k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")}


def check_checkpoint(path: Path, shapes: dict[str, tuple[int, ...]], config: Path) -> bool:
    """Raise unless the checkpoint is an SD 1.x model that matches the configs in `config`. Returns True for an
    inpainting checkpoint (a 9-channel UNet, as sd-v1-5-inpainting) read with text-to-image configs: the configs then
    need the inpainting UNet's input channels (`as_inpainting`); everything else in SD 1.x's inpainting config is the same."""
    if SDXL in shapes:
        raise ExportError(f"'{path}' is an SDXL checkpoint; sd-export converts SD 1.x single files only (export SDXL from a diffusers folder is not supported)")
    if OPEN_CLIP in shapes:
        raise ExportError(f"'{path}' is an SD 2.x checkpoint; convert it to a diffusers folder first (diffusers' from_single_file + save_pretrained) and pass that folder")
    missing = [k for k in (UNET_IN, VAE_IN, CLIP_SD1) if k not in shapes]
    if missing:
        raise ExportError(f"'{path}' is not an SD 1.x checkpoint in the original layout (no '{missing[0]}'); pass an SD 1.x .ckpt/.safetensors or a diffusers folder")
    unet = json.loads((config / "unet" / "config.json").read_text())
    channels = shapes[UNET_IN][1]
    inpainting = channels == 9 and unet["in_channels"] == 4  # 2 x 4 latent channels + the mask
    if channels != unet["in_channels"] and not inpainting:
        task = EXTRA_CHANNELS.get(channels - unet["in_channels"])
        raise ExportError(
            f"'{path}' has a UNet with {channels} input channels, the SD 1.x config {unet['in_channels']}"
            f"{f' ({task})' if task else ''}, which sd-export does not support; pass a text-to-image SD 1.x checkpoint"
        )
    context = {s[1] for k, s in shapes.items() if k.startswith("model.diffusion_model.") and k.endswith("attn2.to_k.weight")}
    if context and context != {unet["cross_attention_dim"]}:
        raise ExportError(f"'{path}' has cross-attention width {sorted(context)}, the config {unet['cross_attention_dim']}; it is not an SD 1.x model")
    return inpainting


def as_inpainting(config_dir: Path, channels: int) -> None:
    """Turn a (temporary) text-to-image config folder into the inpainting model's: UNet input channels, pipeline class."""
    for file, key, value in (("unet/config.json", "in_channels", channels), ("model_index.json", "_class_name", "StableDiffusionInpaintPipeline")):
        data = read_json(config_dir / file)
        data[key] = value
        (config_dir / file).write_text(json.dumps(data, indent=2))


def assemble_config(config: Path | None) -> Path:
    """A temporary diffusers-layout folder of configs only (no weights), with the tokenizer vocabulary filled in."""
    src = Path(config) if config is not None else SD1_CONFIG
    if not (src / "model_index.json").is_file():
        raise ExportError(f"no SD 1.x configs at '{src}' (model_index.json missing); reinstall leansd from its source tree or pass a config folder")
    # The kind of model, checked where the user's configs are (so that a refusal names that folder, not the copy).
    check_pipeline_class(src, read_json(src / "model_index.json"))
    check_configs(src)
    out = Path(tempfile.mkdtemp(prefix="leansd-sd1-config-"))
    try:
        shutil.copyfile(src / "model_index.json", out / "model_index.json")
        for sub in ("unet", "vae", "text_encoder", "scheduler", "tokenizer"):
            (out / sub).mkdir()
            for file in (src / sub).glob("*"):
                if file.is_file() and file.suffix in (".json", ".txt"):
                    shutil.copyfile(file, out / sub / file.name)
        for name in ("vocab.json", "merges.txt"):
            if not (out / "tokenizer" / name).is_file():
                shutil.copyfile(CLIP_VOCAB / name, out / "tokenizer" / name)
        check_folder(out)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return out


def single_file_source(path: Path, *, config: Path | str | None = None) -> Source:
    """Check a single-file checkpoint and return a `Source` that converts it once, on the first `load`."""
    config_dir = assemble_config(Path(config) if config is not None else None)
    try:
        shapes = read_shapes(path)
        if check_checkpoint(path, shapes, config_dir):
            as_inpainting(config_dir, shapes[UNET_IN][1])
    except BaseException:
        shutil.rmtree(config_dir, ignore_errors=True)
        raise
    modules: dict[str, Any] = {}

    def load(name: str) -> Any:
        if not modules:
            modules.update(_convert(path, config_dir))
        return modules.pop(name)  # handed over: the caller frees it, we keep no reference

    def cleanup() -> None:
        modules.clear()
        shutil.rmtree(config_dir, ignore_errors=True)

    return Source(spec=str(path), kind="single_file", config_dir=config_dir, _loader=load, _cleanup=cleanup)


def _convert(path: Path, config_dir: Path) -> dict[str, Any]:
    import torch
    from diffusers import StableDiffusionPipeline

    try:
        pipe = StableDiffusionPipeline.from_single_file(
            str(path), config=str(config_dir), local_files_only=True, torch_dtype=torch.float32
        )
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
        raise ExportError(f"cannot convert '{path}' with the SD 1.x configs: {first}; pass a diffusers folder instead") from None
    modules = {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder}
    del pipe
    return modules
