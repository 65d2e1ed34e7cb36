"""An existing model folder written by sd-export, read back by the tools that upgrade it in place
(`python -m leansd.export.parts`, `python -m leansd.export.int8`)."""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from leansd.export import components as comp
from leansd.export.errors import ExportError
from leansd.runtime.manifest import MANIFEST, TEXT_ENCODER_2, UNET


def read_manifest(root: Path) -> dict[str, Any]:
    """The folder's leansd.json; raises `ExportError` naming the fix when there is none."""
    path = root / MANIFEST
    if not root.is_dir():
        raise ExportError(f"{root} is not a folder; pass a model folder written by sd-export")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        raise ExportError(f"{root} has no readable {MANIFEST}; pass a model folder written by sd-export") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("components"), dict):
        raise ExportError(f"{path} lists no components; pass a model folder written by sd-export")
    return manifest


def _config(root: Path, folder: str) -> dict[str, Any] | None:
    path = root / folder / "config.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def model_info(root: Path) -> comp.ModelInfo:
    """What the exporter knew of the model, from the configs it copied into the folder."""
    unet, vae = _config(root, UNET), _config(root, "vae_decoder")
    if unet is None or vae is None:
        raise ExportError(f"{root} lacks unet/config.json or vae_decoder/config.json; re-export the model with sd-export")
    return comp.ModelInfo.from_configs(unet, vae, _config(root, "text_encoder"), _config(root, TEXT_ENCODER_2))


def static_shapes(manifest: Mapping[str, Any]) -> dict[str, int] | None:
    """The export's static batch and size, or None for dynamic shapes."""
    static = manifest.get("static_shapes")
    return {k: int(static[k]) for k in ("batch", "height", "width")} if isinstance(static, dict) else None
