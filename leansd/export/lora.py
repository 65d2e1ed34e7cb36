"""LoRAs fused into the model at export (`sd-export ... --lora FILE[:SCALE]`), with diffusers' own loader.

Each PyTorch module is loaded from the source, given the LoRAs with diffusers' `load_lora_into_unet` /
`load_lora_into_text_encoder` (kohya / AUTOMATIC1111 and diffusers / PEFT files alike, convolution LoRAs too),
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

# The modules a LoRA file can change, by the component names diffusers' SD loader uses.
COMPONENTS = {"unet": "unet", "text_encoder": "text_encoder"}


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
    """The attributes diffusers' SD LoRA mixin looks up on a pipeline, for one module at a time."""

    def __init__(self, **modules: Any):
        self.unet = modules.get("unet")
        self.text_encoder = modules.get("text_encoder")
        self.hf_device_map = None


def fuse(module: Any, component: str, loras: Sequence[LoraSpec]) -> Any:
    """Load `loras` into `module` (the UNet or the text encoder) with diffusers, fuse them at their scales, and
    return the plain module. Components a LoRA does not touch are returned unchanged."""
    from diffusers import StableDiffusionPipeline
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    if component not in COMPONENTS or not loras:
        return module
    holder_class = type("LoraHolder", (_Holder, StableDiffusionLoraLoaderMixin), {})
    holder = holder_class(**{component: module})
    names, scales = [], []
    for k, spec in enumerate(loras):
        try:
            state, alphas, metadata = StableDiffusionPipeline.lora_state_dict(str(spec.path), return_lora_metadata=True)
        except Exception as exc:  # diffusers raises several types for unreadable or foreign files
            raise ExportError(f"--lora {spec.path.name}: diffusers cannot read it ({str(exc).splitlines()[0][:160]})") from None
        # Keys without a component prefix are UNet layers (older diffusers files), as diffusers reads them.
        te_keys = [key for key in state if key.startswith("text_encoder.")]
        if not te_keys if component == "text_encoder" else len(te_keys) == len(state):
            continue
        name = f"lora{k}"
        if component == "unet":
            StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet=module, adapter_name=name, metadata=metadata)
        else:
            StableDiffusionPipeline.load_lora_into_text_encoder(state, alphas, text_encoder=module, adapter_name=name, metadata=metadata)
        names.append(name)
        scales.append(spec.scale)
    if names:
        holder.set_adapters(names, adapter_weights=scales)
        holder.fuse_lora(components=[component], lora_scale=1.0)
        holder.unload_lora_weights()
    return module


def fusing_loader(load: Callable[[str], Any], loras: Sequence[LoraSpec]) -> Callable[[str], Any]:
    """A source loader whose UNet and text encoder come with `loras` fused in."""
    if not loras:
        return load

    def loaded(name: str) -> Any:
        return fuse(load(name), name, loras)

    return loaded
