"""A diffusers folder as the exporter sees it: the `Source` record every kind of source becomes, and the
checks that a folder holds a Stable Diffusion 1.x/2.x or SDXL pipeline. Shared by `sources` and `singlefile`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from leansd.export.errors import ExportError

# What model_index.json must name for a Stable Diffusion 1.x/2.x pipeline.
EXPECTED = {
    "unet": {"UNet2DConditionModel"},
    "vae": {"AutoencoderKL"},
    "text_encoder": {"CLIPTextModel"},
    "tokenizer": {"CLIPTokenizer", "CLIPTokenizerFast"},
    "scheduler": None,  # any diffusers scheduler
}
REQUIRED_FILES = (
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "scheduler/scheduler_config.json",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
)
# SDXL's second text encoder and tokenizer; its refiner has only these (text_encoder and tokenizer null).
EXPECTED_SDXL = {"text_encoder_2": {"CLIPTextModelWithProjection"}, "tokenizer_2": {"CLIPTokenizer", "CLIPTokenizerFast"}}
REQUIRED_FILES_SDXL = ("text_encoder_2/config.json", "tokenizer_2/vocab.json", "tokenizer_2/merges.txt")

@dataclass
class Source:
    """A checked model source: a diffusers-layout folder of configs plus a loader of PyTorch modules."""

    spec: str
    kind: str  # "folder", "hub" or "single_file"
    config_dir: Path
    _loader: Callable[[str], Any] = field(repr=False)
    _cleanup: Callable[[], None] | None = field(default=None, repr=False)

    def config(self, name: str) -> dict[str, Any]:
        """A component's config.json (`unet`, `vae`, `text_encoder`) or the scheduler's config."""
        file = "scheduler/scheduler_config.json" if name == "scheduler" else f"{name}/config.json"
        return read_json(self.config_dir / file)

    def optional_config(self, name: str) -> dict[str, Any] | None:
        """A component's config.json, or None when the model has no such component (SDXL's refiner: text_encoder)."""
        return self.config(name) if (self.config_dir / name / "config.json").is_file() else None

    def model_index(self) -> dict[str, Any]:
        return read_json(self.config_dir / "model_index.json")

    def load(self, name: str) -> Any:
        """The float32 PyTorch module `unet`, `vae` or `text_encoder`, in eval mode. The caller owns it."""
        return self._loader(name).float().eval()

    def close(self) -> None:
        if self._cleanup is not None:
            self._cleanup()
            self._cleanup = None


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot read '{path}' ({exc.__class__.__name__}); the model folder is incomplete or damaged") from None
    if not isinstance(data, dict):
        kind = "null" if data is None else {bool: "boolean", str: "string", list: "list"}.get(type(data), "number")
        raise ExportError(f"'{path}' holds a JSON {kind}, not an object; the model folder is damaged (re-save it with save_pretrained)")
    return data


# What sd-export exports, said in every refusal of another kind of model.
SUPPORTED = ("it exports text-to-image Stable Diffusion 1.x/2.x models (StableDiffusionPipeline folders; img2img and inpainting "
             "run from the same export), inpainting models (StableDiffusionInpaintPipeline folders, 9-channel UNets), "
             "depth-to-image models (StableDiffusionDepth2ImgPipeline folders, 5-channel UNets), the x4 upscaler "
             "(StableDiffusionUpscalePipeline folders), latent consistency models (LatentConsistencyModelPipeline folders), "
             "and SDXL base, refiner and inpainting folders")

# Pipelines for a task sd-export does not export, by a part of model_index.json's `_class_name` (diffusers' spelling;
# the first match names the task).
UNSUPPORTED_PIPELINES = (
    ("LatentUpscale", "the latent x2 upscaler"),
    ("InstructPix2Pix", "instruct-pix2pix image editing"),
    ("ControlNet", "ControlNet"),
    ("Adapter", "T2I-Adapter"),
    ("UnCLIP", "unCLIP image variations"),
    ("GLIGEN", "GLIGEN grounded generation"),
    ("LDM3D", "RGB + depth (LDM3D)"),
)

# Input channels beyond the latents, in the UNets of the tasks that add them (as diffusers' pipelines concatenate them).
# Inpainting (latent channels + 1 extra), depth (one extra) and the x4 upscaler (+ 3, with a noise-level class
# embedding) are exported; the others are refused.
EXTRA_CHANNELS = {
    5: "inpainting: latents + mask + masked image",
    4: "image editing such as instruct-pix2pix: latents + the input image's latents",
    3: "the x4 upscaler: latents + the low-resolution image",
    1: "depth-to-image: latents + depth map",
}

# UNet options a text-to-image SD 1.x/2.x UNet leaves unset, and what setting them means.
UNET_EXTRAS = {
    "class_embed_type": "class-conditioned, as unCLIP is",
    "num_class_embeds": "class-conditioned, as the x4 upscaler is on its noise level",
    "addition_embed_type": "takes added embeddings, as SDXL does",
    "encoder_hid_dim_type": "projects its conditioning first",
}

# Keys of the component configs the exporter reads: the JSON type each must have, and those it cannot do without.
CONFIG_TYPES = {
    "unet": {"in_channels": int, "out_channels": int, "sample_size": int, "cross_attention_dim": int, "up_block_types": list,
             "block_out_channels": list},
    "vae": {"block_out_channels": list, "latent_channels": int, "in_channels": int, "out_channels": int, "scaling_factor": float},
    "text_encoder": {"hidden_size": int, "vocab_size": int, "max_position_embeddings": int},
}
CONFIG_REQUIRED = {"unet": ("up_block_types", "cross_attention_dim"), "vae": ("block_out_channels",),
                   "text_encoder": ("hidden_size", "vocab_size")}
_TYPE_NAMES = {int: "an integer", float: "a number", list: "a list"}


def _refuse(path: Path, what: str) -> ExportError:
    return ExportError(f"'{path}' {what}, which sd-export does not support; {SUPPORTED}")


def check_pipeline_class(path: Path, index: dict[str, Any]) -> None:
    """Refuse a pipeline whose class names a task sd-export does not export (upscaler, depth-to-image, SDXL...)."""
    name = index.get("_class_name")
    if not isinstance(name, str):
        return
    for tag, task in UNSUPPORTED_PIPELINES:
        if tag in name:
            raise _refuse(path, f"holds a {name} ({task})")


def check_configs(path: Path) -> None:
    """Refuse a UNet or VAE built for another task than text-to-image or inpainting (checked by the configs, since
    folders are often re-saved under the plain pipeline class), and configs sd-export cannot read."""
    configs = {name: read_json(path / name / "config.json") for name in CONFIG_TYPES if (path / name / "config.json").is_file()}
    for name, types in CONFIG_TYPES.items():
        for key, kind in types.items():
            value = configs.get(name, {}).get(key)
            ok = isinstance(value, (int, float) if kind is float else kind) and not isinstance(value, bool)
            if value is not None and not ok:
                raise ExportError(
                    f"'{path / name / 'config.json'}': '{key}' is {json.dumps(value)[:40]}, not {_TYPE_NAMES[kind]}; "
                    "the config is damaged (re-save the model with save_pretrained)"
                )
    unet, vae = configs.get("unet", {}), configs.get("vae", {})
    latent = vae.get("latent_channels") or 4
    channels = unet.get("in_channels") or 4
    upscaler = is_upscaler(unet, vae)
    depth = 5 if latent == 4 else None  # latents + the depth map: SD 2's depth model (no other latent space has one)
    if channels not in (latent, 2 * latent + 1, depth) and not upscaler:  # 2 x latent + 1: an inpainting UNet
        task = EXTRA_CHANNELS.get(channels - latent) if latent == 4 else None
        raise _refuse(path, f"has a UNet with {channels} input channels, not the VAE's {latent} latent channels"
                            f"{f' ({task})' if task else ''}")
    if (unet.get("out_channels") or latent) != latent:
        raise _refuse(path, f"has a UNet with {unet['out_channels']} output channels, not the VAE's {latent} latent channels")
    if unet.get("addition_embed_type") == "text_time" and unet.get("time_cond_proj_dim") is not None:
        raise _refuse(path, f"has an SDXL UNet with time_cond_proj_dim={unet['time_cond_proj_dim']} (an LCM distilled from SDXL; "
                            "SD 1.x/2.x latent consistency models and SDXL with an LCM-LoRA fused by --lora are supported)")
    xl = unet.get("addition_embed_type") == "text_time" and (path / "text_encoder_2" / "config.json").is_file()
    for key, meaning in UNET_EXTRAS.items():
        allowed = (upscaler and key == "num_class_embeds") or (xl and key == "addition_embed_type")
        if unet.get(key) is not None and not allowed:
            raise _refuse(path, f"has a UNet with {key}={json.dumps(unet[key])} ({meaning})")
    if unet.get("attention_type") not in (None, "default"):
        raise _refuse(path, f"has a UNet with attention_type={json.dumps(unet['attention_type'])} (gated attention, as GLIGEN)")
    for key in ("in_channels", "out_channels"):
        if (vae.get(key) or 3) != 3:
            raise _refuse(path, f"has a VAE with {key}={vae[key]}, not 3 (RGB images)")
    for name, config in configs.items():
        absent = [key for key in CONFIG_REQUIRED[name] if key not in config]
        if absent:
            raise ExportError(
                f"'{path / name / 'config.json'}' has no '{absent[0]}'; the config is damaged (re-save the model with save_pretrained)"
            )


def is_upscaler(unet: dict[str, Any], vae: dict[str, Any]) -> bool:
    """The x4 upscaler's UNet: the latents and the 3-channel low-resolution image in, conditioned on the noise level
    (a class embedding, `num_class_embeds`, and no other class embedding type)."""
    latent = vae.get("latent_channels") or 4
    return ((unet.get("in_channels") or 4) == latent + 3 and unet.get("num_class_embeds") is not None
            and unet.get("class_embed_type") is None)


def check_folder(path: Path) -> None:
    """Raise unless `path` holds the configs of a Stable Diffusion 1.x/2.x diffusers pipeline for text-to-image.

    Reads configs only (no weights): a model sd-export does not support is refused before anything is loaded or written.
    """
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise ExportError(f"'{path}' has no model_index.json, so it is not a diffusers model folder; pass a Stable Diffusion folder or checkpoint file")
    index = read_json(index_file)
    check_pipeline_class(path, index)

    def component(name: str) -> list:
        entry = index.get(name)
        return entry if isinstance(entry, list) and len(entry) == 2 else [None, None]

    if component("transformer")[0] is not None:
        raise _refuse(path, f"has a transformer instead of a UNet ({index.get('_class_name') or 'a diffusers pipeline'})")
    xl = component("text_encoder_2")[0] is not None
    unet_config = path / "unet" / "config.json"
    if xl and unet_config.is_file() and read_json(unet_config).get("addition_embed_type") != "text_time":
        raise _refuse(path, "has a second text encoder (text_encoder_2) but a UNet without SDXL's text_time conditioning")
    expected = {**EXPECTED, **EXPECTED_SDXL} if xl else EXPECTED
    if xl and component("text_encoder")[0] is None and component("tokenizer")[0] is None:  # SDXL's refiner
        expected = {k: v for k, v in expected.items() if k not in ("text_encoder", "tokenizer")}
    for name, classes in expected.items():
        entry = component(name)
        if entry[0] is None or (classes is not None and entry[1] not in classes):
            found = entry[1] or "nothing"
            raise ExportError(
                f"'{path}' is not a Stable Diffusion 1.x/2.x or SDXL model: its '{name}' is {found}"
                f"{'' if classes is None else ' (expected ' + ' or '.join(sorted(classes)) + ')'}; pass a StableDiffusionPipeline folder"
            )
    check_configs(path)
    required = [f for f in REQUIRED_FILES if f.split("/")[0] in expected] + (list(REQUIRED_FILES_SDXL) if xl else [])
    missing = [f for f in required if not (path / f).is_file()]
    if missing:
        raise ExportError(f"'{path}' lacks {', '.join(missing)}; the diffusers folder is incomplete (re-save it with save_pretrained)")
