"""Single-file SD 1.x and 2.x checkpoints (`.ckpt` / `.safetensors` in the CompVis / Stability layout), converted offline.

diffusers' own `from_single_file` does the key conversion; it is pointed at a local folder of configs
(`leansd/export/configs/sd1/` or `sd2/`, with CLIP's vocabulary from `configs/clip/`, or the user's folder) so it never
reaches for the network. SD 2.x is told from SD 1.x by its OpenCLIP text encoder (`cond_stage_model.model.*`); the
variant (prediction type, native size) by `checkpoint_variant`. Pickled `.ckpt` files are only ever read with
`weights_only=True` (tensors and plain values, no arbitrary Python objects).
"""
from __future__ import annotations

import json
import pickle
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leansd.export import checkpoint_variant
from leansd.export.diffusers_folder import EXTRA_CHANNELS, Source, check_configs, check_folder, check_pipeline_class, read_json
from leansd.export.errors import ExportError

# Shipped inside the package so an installed leansd converts single files offline.
CONFIGS = Path(__file__).resolve().parent / "configs"
SD1_CONFIG = CONFIGS / "sd1"
SD2_CONFIG = CONFIGS / "sd2"
X4_CONFIG = CONFIGS / "x4_upscaler"  # stable-diffusion-x4-upscaler (x4-upscaler-ema.safetensors)
SDXL_CONFIGS = {"sdxl": CONFIGS / "sdxl_base", "sdxl_refiner": CONFIGS / "sdxl_refiner"}  # sd_xl_base_1.0 / sd_xl_refiner_1.0
FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "sdxl_refiner": "SDXL refiner"}
CLIP_VOCAB = CONFIGS / "clip"

UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
VAE_IN = "first_stage_model.encoder.conv_in.weight"
CLIP_SD1 = "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"
OPEN_CLIP = "cond_stage_model.model.token_embedding.weight"
# The text encoder's width, by family: where each layout keeps a [tokens or positions, width] matrix.
TEXT_WIDTH = {"sd1": CLIP_SD1, "sd2": OPEN_CLIP}
# The text encoder's activation in diffusers' config, by family: OpenAI CLIP (SD 1) and OpenCLIP (SD 2) differ only there
# and in the layout, so a config folder of the other family would convert without error and compute something else.
TEXT_ACT = {"sd1": "quick_gelu", "sd2": "gelu"}
PROJ_IN = "proj_in.weight"
LABEL_EMB = "model.diffusion_model.label_emb.weight"  # the x4 upscaler's noise-level embedding
SDXL = "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight"
SDXL_REFINER = "conditioner.embedders.0.model.token_embedding.weight"  # the refiner's only encoder: OpenCLIP bigG
SDXL_OPEN_CLIP = "conditioner.embedders.1.model.token_embedding.weight"  # the base model's second encoder


@dataclass(frozen=True)
class Checkpoint:
    """What the exporter reads of a checkpoint before converting it: tensor shapes, the `.safetensors` header's
    metadata, and the training step a `.ckpt` records."""

    shapes: dict[str, tuple[int, ...]]
    metadata: dict[str, str] = field(default_factory=dict)
    global_step: int | None = None


def read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a checkpoint, without loading more than needed."""
    return read_checkpoint(path).shapes


def read_checkpoint(path: Path) -> Checkpoint:
    """Shapes and metadata of a checkpoint, without loading more than needed."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
                return Checkpoint(shapes, {str(k): str(v) for k, v in (f.metadata() or {}).items()})
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
    step = state.get("global_step") if isinstance(state, dict) else None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ExportError(f"'{path}' does not hold a state dict; pass a Stable Diffusion checkpoint")
    try:
        global_step = int(step) if step is not None and not isinstance(step, bool) else None
    except (TypeError, ValueError, RuntimeError):  # a tensor of several values, a string: not a step count
        global_step = None
    return Checkpoint({k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")}, global_step=global_step)


def checkpoint_family(path: Path, shapes: dict[str, tuple[int, ...]]) -> str:
    """"sd1" (OpenAI CLIP text encoder) or "sd2" (OpenCLIP); refuse other checkpoints."""
    if SDXL in shapes or SDXL_REFINER in shapes:
        family = "sdxl" if SDXL in shapes else "sdxl_refiner"
        if UNET_IN not in shapes or VAE_IN not in shapes or (family == "sdxl" and SDXL_OPEN_CLIP not in shapes):
            raise ExportError(f"'{path}' looks like an {FAMILY_NAMES[family]} checkpoint but lacks part of one (UNet, VAE or its "
                              "second text encoder); check the download")
        return family
    family = "sd2" if OPEN_CLIP in shapes else "sd1"
    missing = [k for k in (UNET_IN, VAE_IN, TEXT_WIDTH[family]) if k not in shapes]
    if missing:
        raise ExportError(f"'{path}' is not an {FAMILY_NAMES[family]} checkpoint in the original layout (no '{missing[0]}'); "
                          "pass an SD 1.x/2.x .ckpt/.safetensors or a diffusers folder")
    return family


def check_checkpoint(path: Path, shapes: dict[str, tuple[int, ...]], config: Path) -> bool:
    """Raise unless the checkpoint is an SD 1.x/2.x model that matches the configs in `config`. Returns True for an
    inpainting checkpoint (a 9-channel UNet, as sd-v1-5-inpainting or SD 2's 512-inpainting) read with text-to-image
    configs: the configs then need the inpainting UNet's input channels (`as_inpainting`); everything else in the
    family's inpainting config is the same."""
    family = checkpoint_family(path, shapes)
    label = FAMILY_NAMES[family]
    unet = read_json(config / "unet" / "config.json")
    text = read_json(config / "text_encoder" / "config.json")
    if text.get("hidden_act", "quick_gelu") != TEXT_ACT[family]:
        other = next(FAMILY_NAMES[f] for f, act in TEXT_ACT.items() if f != family)
        raise ExportError(f"'{path}' is an {label} checkpoint but the config folder's text encoder is {other}'s "
                          f"(hidden_act {text.get('hidden_act', 'quick_gelu')}); pass {label} configs")
    channels = shapes[UNET_IN][1]
    task = unet_task(family, channels, unet["in_channels"])
    if channels != unet["in_channels"] and task == "text-to-image":
        extra = EXTRA_CHANNELS.get(channels - unet["in_channels"])
        raise ExportError(
            f"'{path}' has a UNet with {channels} input channels, the {label} config {unet['in_channels']}"
            f"{f' ({extra})' if extra else ''}, which sd-export does not support; pass a text-to-image, inpainting or "
            f"(SD 2) depth {label} checkpoint"
        )
    context = {s[1] for k, s in shapes.items() if k.startswith("model.diffusion_model.") and k.endswith("attn2.to_k.weight")}
    if context and context != {unet["cross_attention_dim"]}:
        raise ExportError(f"'{path}' has cross-attention width {sorted(context)}, the config {unet['cross_attention_dim']}; it is not an {label} model "
                          "for these configs")
    width = shapes[TEXT_WIDTH[family]][1]
    if width != text.get("hidden_size"):
        raise ExportError(f"'{path}' has a {width}-wide text encoder, the config {text.get('hidden_size')}; pass {label} configs that fit it")
    return task == "inpainting"


# Pipelines of the UNets that take channels beyond the latents, when read with text-to-image configs.
TASK_PIPELINES = {"inpainting": "StableDiffusionInpaintPipeline", "depth": "StableDiffusionDepth2ImgPipeline"}


def unet_task(family: str, channels: int, config_channels: int) -> str:
    """"inpainting" (latents + mask + masked image latents), "depth" (latents + depth map; SD 2's 512-depth only) or
    "text-to-image", by the UNet's input channels in a checkpoint read with configs for `config_channels`."""
    if channels == 2 * config_channels + 1 and config_channels == 4:
        return "inpainting"
    if channels == config_channels + 1 and family == "sd2":
        return "depth"
    return "text-to-image"


def linear_projection(shapes: dict[str, tuple[int, ...]]) -> bool | None:
    """Whether the UNet's transformers project in and out with linear layers (SD 2) rather than 1x1 convolutions (SD 1);
    None when it has no transformer."""
    found = {len(s) == 2 for k, s in shapes.items() if k.startswith("model.diffusion_model.") and k.endswith(PROJ_IN)}
    return found.pop() if len(found) == 1 else None


def edit_config(config_dir: Path, file: str, **values: Any) -> None:
    """Set keys of one JSON config in the (temporary) config folder."""
    data = read_json(config_dir / file)
    data.update(values)
    (config_dir / file).write_text(json.dumps(data, indent=2))


def apply_variant(config_dir: Path, variant: checkpoint_variant.Variant) -> None:
    """Write the decided prediction type and native size into the temporary configs."""
    if variant.prediction_type is not None:
        edit_config(config_dir, "scheduler/scheduler_config.json", prediction_type=variant.prediction_type)
    if variant.image_size is not None:
        factor = 2 ** (len(read_json(config_dir / "vae" / "config.json")["block_out_channels"]) - 1)
        if variant.image_size % factor:
            raise ExportError(f"--image-size {variant.image_size} is not a multiple of {factor}, the VAE's scale factor; "
                              f"use {variant.image_size - variant.image_size % factor + factor}")
        edit_config(config_dir, "unet/config.json", sample_size=variant.image_size // factor)


def as_inpainting(config_dir: Path, channels: int, task: str = "inpainting") -> None:
    """Turn a (temporary) text-to-image config folder into the inpainting (or depth) model's: UNet input channels,
    pipeline class."""
    edit_config(config_dir, "unet/config.json", in_channels=channels)
    edit_config(config_dir, "model_index.json", _class_name=TASK_PIPELINES[task])


def assemble_config(config: Path | None, default: Path = SD1_CONFIG) -> Path:
    """A temporary diffusers-layout folder of configs only (no weights), with the tokenizer vocabulary filled in."""
    src = Path(config) if config is not None else default
    if not (src / "model_index.json").is_file():
        raise ExportError(f"no single-file configs at '{src}' (model_index.json missing); reinstall leansd from its source tree or pass a config folder")
    # The kind of model, checked where the user's configs are (so that a refusal names that folder, not the copy).
    check_pipeline_class(src, read_json(src / "model_index.json"))
    check_configs(src)
    out = Path(tempfile.mkdtemp(prefix="leansd-single-file-config-"))
    try:
        shutil.copyfile(src / "model_index.json", out / "model_index.json")
        # SDXL adds text_encoder_2 and tokenizer_2 (its refiner has only those), the x4 upscaler low_res_scheduler.
        subfolders = ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler", "tokenizer", "tokenizer_2", "low_res_scheduler")
        for sub in (s for s in subfolders if (src / s).is_dir()):
            (out / sub).mkdir()
            for file in (src / sub).glob("*"):
                if file.is_file() and file.suffix in (".json", ".txt"):
                    shutil.copyfile(file, out / sub / file.name)
        for tokenizer in (t for t in ("tokenizer", "tokenizer_2") if (out / t).is_dir()):
            for name in ("vocab.json", "merges.txt"):
                if not (out / tokenizer / name).is_file():
                    shutil.copyfile(CLIP_VOCAB / name, out / tokenizer / name)
        check_folder(out)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return out


def single_file_source(path: Path, *, config: Path | str | None = None, prediction_type: str | None = None,
                       image_size: int | None = None) -> Source:
    """Check a single-file checkpoint and return a `Source` that converts it once, on the first `load`.

    `config`: a diffusers-layout config folder (default: the shipped SD 1.x or SD 2.x configs, by the checkpoint's text
    encoder). `prediction_type` / `image_size` override the scheduler's prediction type and the UNet's native size;
    see `checkpoint_variant` for how they are decided without them."""
    checkpoint_variant.check_options(prediction_type, image_size)
    if config is not None:  # the user's configs are checked before the (possibly large) checkpoint is opened
        config_dir = assemble_config(Path(config))
        checkpoint = None
    else:
        checkpoint = read_checkpoint(path)
        config_dir = assemble_config(None, shipped_config(path, checkpoint.shapes))
    try:
        checkpoint = checkpoint or read_checkpoint(path)
        shapes = checkpoint.shapes
        if checkpoint_family(path, shapes) in SDXL_CONFIGS:
            prepare_sdxl(path, shapes, config_dir, prediction_type, image_size)
            return _converting_source(path, config_dir)
        check_checkpoint(path, shapes, config_dir)
        family = checkpoint_family(path, shapes)
        task = unet_task(family, shapes[UNET_IN][1], read_json(config_dir / "unet" / "config.json")["in_channels"])
        if "Upscale" in str(read_json(config_dir / "model_index.json").get("_class_name")):
            task = "upscale"
        elif task != "text-to-image":
            as_inpainting(config_dir, shapes[UNET_IN][1], task)
        linear = linear_projection(shapes)
        if linear is not None:  # decided by the weights' shapes, whatever the config folder says
            edit_config(config_dir, "unet/config.json", use_linear_projection=linear)
        variant = checkpoint_variant.decide(
            path, family=family, task=task,
            metadata=checkpoint.metadata, global_step=checkpoint.global_step, prediction_type=prediction_type,
            image_size=image_size, config_given=config is not None)
        apply_variant(config_dir, variant)
    except BaseException:
        shutil.rmtree(config_dir, ignore_errors=True)
        raise
    return _converting_source(path, config_dir)


def _converting_source(path: Path, config_dir: Path) -> Source:
    """A `Source` that converts the file with the configs in `config_dir` on its first `load`."""
    modules: dict[str, Any] = {}

    def load(name: str) -> Any:
        if not modules:
            modules.update(_convert(path, config_dir))
        return modules.pop(name)  # handed over: the caller frees it, we keep no reference

    def cleanup() -> None:
        modules.clear()
        shutil.rmtree(config_dir, ignore_errors=True)

    return Source(spec=str(path), kind="single_file", config_dir=config_dir, _loader=load, _cleanup=cleanup)


def prepare_sdxl(path: Path, shapes: dict[str, tuple[int, ...]], config_dir: Path, prediction_type: str | None,
                 image_size: int | None) -> None:
    """Check an SDXL (base or refiner) checkpoint against its configs and adapt them: a 9-channel UNet makes it SDXL
    inpainting; --prediction-type / --image-size override the configs (SDXL 1.0: epsilon, 1024)."""
    family = checkpoint_family(path, shapes)
    index = read_json(config_dir / "model_index.json")
    refiner_configs = not (config_dir / "text_encoder").is_dir()
    if refiner_configs != (family == "sdxl_refiner"):
        raise ExportError(f"'{path}' is an {FAMILY_NAMES[family]} checkpoint but the configs are an "
                          f"{'SDXL refiner' if refiner_configs else 'SDXL base model'}'s ({index.get('_class_name')}); pass configs that fit it")
    unet = read_json(config_dir / "unet" / "config.json")
    channels = shapes[UNET_IN][1]
    if channels == 2 * unet["in_channels"] + 1 and family == "sdxl":
        edit_config(config_dir, "unet/config.json", in_channels=channels)
        edit_config(config_dir, "model_index.json", _class_name="StableDiffusionXLInpaintPipeline", requires_aesthetics_score=False)
    elif channels != unet["in_channels"]:
        raise ExportError(f"'{path}' has a UNet with {channels} input channels, the {FAMILY_NAMES[family]} config {unet['in_channels']}; "
                          "sd-export converts SDXL text-to-image, refiner and inpainting single files")
    context = {s[1] for k, s in shapes.items() if k.startswith("model.diffusion_model.") and k.endswith("attn2.to_k.weight")}
    if context and context != {unet["cross_attention_dim"]}:
        raise ExportError(f"'{path}' has cross-attention width {sorted(context)}, the config {unet['cross_attention_dim']}; "
                          f"pass {FAMILY_NAMES[family]} configs that fit it")
    reason = "--prediction-type" if prediction_type else "the SDXL configs"
    apply_variant(config_dir, checkpoint_variant.Variant(prediction_type, image_size, reason))


def shipped_config(path: Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    """The shipped configs for a checkpoint: SD 1.x, SD 2.x, the x4 upscaler (OpenCLIP, 7 UNet input channels and a
    noise-level embedding), SDXL base or refiner."""
    family = checkpoint_family(path, shapes)
    if family in SDXL_CONFIGS:
        return SDXL_CONFIGS[family]
    if family == "sd1":
        return SD1_CONFIG
    return X4_CONFIG if LABEL_EMB in shapes and shapes[UNET_IN][1] == 7 else SD2_CONFIG


# Pipelines whose own from_single_file converts a file of their kind (the class the config folder names).
CONVERTERS = ("StableDiffusionUpscalePipeline", "StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline",
              "StableDiffusionXLInpaintPipeline")


def _convert(path: Path, config_dir: Path) -> dict[str, Any]:
    import diffusers
    import torch

    name = str(read_json(config_dir / "model_index.json").get("_class_name"))
    cls = getattr(diffusers, name) if name in CONVERTERS else diffusers.StableDiffusionPipeline
    try:  # the text encoder's kind (CLIP or OpenCLIP) is told by diffusers from the keys, its size from our configs
        pipe = cls.from_single_file(
            str(path), config=str(config_dir), local_files_only=True, torch_dtype=torch.float32
        )
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
        raise ExportError(f"cannot convert '{path}' with its configs: {first}; pass a config folder that fits it (--config) or a diffusers folder") from None
    modules = {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder}
    if getattr(pipe, "text_encoder_2", None) is not None:
        modules["text_encoder_2"] = pipe.text_encoder_2
    del pipe
    return modules
