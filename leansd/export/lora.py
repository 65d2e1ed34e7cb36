"""LoRAs fused into the model at export (`sd-export ... --lora FILE[:SCALE]`), with diffusers' own loader.

Each PyTorch module is loaded from the source, given the LoRAs with diffusers' `load_lora_into_unet` /
`load_lora_into_text_encoder` (kohya / AUTOMATIC1111 and diffusers / PEFT files alike, convolution LoRAs too; for
SDXL its SDXL loader, which reads kohya's Stability-layout UNet names and the second text encoder's layers),
weighted with `set_adapters`, fused with `fuse_lora` and unwrapped, then exported as usual: the exported model
equals diffusers' pipeline after `load_lora_weights` + `fuse_lora`. leansd.json records each LoRA (file name,
hashes, scale).
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from leansd.export.errors import ExportError

# The modules a LoRA file can change, by the component names diffusers' loaders use (SDXL: also text_encoder_2).
COMPONENTS = {"unet": "unet", "text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2"}


@dataclass(frozen=True)
class LoraSpec:
    """One `--lora FILE[:SCALE]`."""

    path: Path
    scale: float = 1.0

    def record(self) -> dict[str, Any]:
        """What leansd.json says about it."""
        from leansd.runtime.adapters.tensor_file import TensorFile, file_sha256

        tensors = TensorFile(self.path)
        return {"file": self.path.name, "sha256": file_sha256(self.path)[:12],
                "a1111_hash": (tensors.metadata.get("sshs_model_hash") or tensors.body_sha256())[:12], "scale": self.scale}


def parse(specs: Sequence[str | os.PathLike[str] | tuple] | None) -> list[LoraSpec]:
    """`FILE`, `FILE:SCALE` or (FILE, SCALE) -> checked specs (the files must exist and be .safetensors)."""
    out = []
    for spec in specs or ():
        if isinstance(spec, tuple):
            path, scale = Path(spec[0]), float(spec[1])
        else:
            text = os.fspath(spec)
            head, sep, tail = text.rpartition(":")
            try:
                path, scale = (Path(head), float(tail)) if sep and head else (Path(text), 1.0)
            except ValueError:
                path, scale = Path(text), 1.0
        if not math.isfinite(scale):
            raise ExportError(f"--lora {spec}: the scale must be a finite number, e.g. FILE:0.8")
        path = path.expanduser()
        if not path.is_file():
            raise ExportError(f"--lora {path}: no such file; pass a LoRA .safetensors file (FILE or FILE:SCALE)")
        if path.suffix.lower() != ".safetensors":
            raise ExportError(f"--lora {path}: only .safetensors LoRA files are read (pickled files can run code); convert it first")
        out.append(LoraSpec(path.absolute(), scale))
    return out


class _Holder:
    """The attributes diffusers' LoRA mixins look up on a pipeline, for one module at a time."""

    def __init__(self, **modules: Any):
        self.unet = modules.get("unet")
        self.text_encoder = modules.get("text_encoder")
        self.text_encoder_2 = modules.get("text_encoder_2")
        self.hf_device_map = None


def _belongs(key: str, component: str) -> bool:
    """Whether a key of diffusers' converted state dict is for `component`; keys without a component prefix are
    UNet layers (older diffusers files), as diffusers reads them."""
    part = key.split(".", 1)[0]
    if component == "unet":
        return part not in ("text_encoder", "text_encoder_2")
    return part == component


def fuse(module: Any, component: str, loras: Sequence[LoraSpec], sdxl: bool = False) -> Any:
    """Load `loras` into `module` (the UNet or a text encoder) with diffusers, fuse them at their scales, and
    return the plain module. `sdxl`: read the files as diffusers' SDXL pipeline does (kohya's SDXL UNet names,
    `lora_te2_` / `text_encoder_2.` layers). Components a LoRA does not touch are returned unchanged."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin

    if component not in COMPONENTS or not loras:
        return module
    pipeline, mixin = (StableDiffusionXLPipeline, StableDiffusionXLLoraLoaderMixin) if sdxl else \
        (StableDiffusionPipeline, StableDiffusionLoraLoaderMixin)
    holder = type("LoraHolder", (_Holder, mixin), {})(**{component: module})
    # the UNet's config tells diffusers how kohya's SDXL block numbers (input_blocks_4_1...) map to its own
    extra = {"unet_config": module.config} if sdxl and component == "unet" else {}
    names, scales = [], []
    for k, spec in enumerate(loras):
        try:
            state, alphas, metadata = pipeline.lora_state_dict(str(spec.path), return_lora_metadata=True, **extra)
        except Exception as exc:  # diffusers raises several types for unreadable or foreign files
            raise ExportError(f"--lora {spec.path.name}: diffusers cannot read it ({str(exc).splitlines()[0][:160]})") from None
        if not any(_belongs(key, component) for key in state):
            continue
        name = f"lora{k}"
        if component == "unet":
            pipeline.load_lora_into_unet(state, alphas, unet=module, adapter_name=name, metadata=metadata)
        else:
            pipeline.load_lora_into_text_encoder(state, alphas, text_encoder=module, prefix=component, adapter_name=name,
                                                 metadata=metadata)
        names.append(name)
        scales.append(spec.scale)
    if names:
        holder.set_adapters(names, adapter_weights=scales)
        holder.fuse_lora(components=[component], lora_scale=1.0)
        holder.unload_lora_weights()
    return module


def fusing_loader(load: Callable[[str], Any], loras: Sequence[LoraSpec], sdxl: bool = False) -> Callable[[str], Any]:
    """A source loader whose UNet and text encoder(s) come with `loras` fused in."""
    if not loras:
        return load

    def loaded(name: str) -> Any:
        return fuse(load(name), name, loras, sdxl)

    return loaded
