"""Find and validate a model folder: leansd's own exports and Optimum's ONNX / OpenVINO exports.

The folder layout is the one `optimum-cli export onnx|openvino` writes; `leansd.json`, when present,
says which files exist for each backend and precision. Without it, the files are found by their names.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from leansd.runtime import manifest as names
from leansd.runtime.errors import ModelFolderError

# File each backend looks for in a component folder when there is no manifest (Optimum's names).
DEFAULT_FILES = {"onnxruntime": "model.onnx", "openvino": "openvino_model.xml"}
_MANIFEST_BACKEND = {"onnxruntime": "onnx", "openvino": "openvino"}


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ModelFolderError(f"{path} is missing: the model folder is incomplete ({what}); re-export it with sd-export")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFolderError(f"{path} is not valid JSON ({exc}); re-export the model with sd-export") from None


@dataclass
class ModelBundle:
    """A validated model folder and the configs the runtime needs from it."""

    root: Path
    manifest: dict | None
    scheduler_config: dict
    unet_config: dict
    vae_config: dict

    @classmethod
    def open(cls, path: str | Path) -> "ModelBundle":
        root = Path(path).expanduser()
        if not root.exists():
            raise ModelFolderError(f"model folder {root} does not exist; pass a folder written by sd-export (or optimum-cli export)")
        if not root.is_dir():
            raise ModelFolderError(f"{root} is a file, not a model folder; export it first: sd-export {root} OUTPUT_DIR")
        manifest = None
        if (root / names.MANIFEST).is_file():
            manifest = _read_json(root / names.MANIFEST, "manifest")
            if manifest.get("format") != names.FORMAT:
                raise ModelFolderError(f"{root / names.MANIFEST} is not a leansd manifest; re-export the model with sd-export")
            if int(manifest.get("format_version", 0)) > names.FORMAT_VERSION:
                raise ModelFolderError(f"{root} was written by a newer leansd (format {manifest['format_version']}); upgrade leansd")
        elif not (root / "model_index.json").is_file():
            raise ModelFolderError(
                f"{root} is not a model folder (no leansd.json or model_index.json); export a model into it with sd-export"
            )
        if (root / "vae").is_dir() and not (root / "vae_decoder").is_dir():
            raise ModelFolderError(f"{root} is a PyTorch diffusers folder; convert it first: sd-export {root} OUTPUT_DIR")
        scheduler = _read_json(root / "scheduler" / "scheduler_config.json", "scheduler config")
        unet = _read_json(root / "unet" / "config.json", "UNet config")
        vae_path = root / "vae_decoder" / "config.json"
        vae = _read_json(vae_path, "VAE config")
        return cls(root, manifest, scheduler, unet, vae)

    @property
    def pipeline_class(self) -> str:
        """The diffusers pipeline class the folder was exported from (`model_index.json`), or "" when unknown."""
        path = self.root / "model_index.json"
        return str(_read_json(path, "pipeline index").get("_class_name") or "") if path.is_file() else ""

    def defaults(self) -> dict:
        """Generation defaults the model recommends (steps, guidance, size), from the manifest."""
        return dict((self.manifest or {}).get("defaults", {}))

    @property
    def static_shapes(self) -> dict | None:
        return (self.manifest or {}).get("static_shapes")

    def backends_present(self) -> list[str]:
        """Backends for which the UNet file exists."""
        return [b for b in DEFAULT_FILES if self._candidate("unet", b, "fp32", required=False) is not None]

    def _candidate(self, component: str, backend: str, precision: str, required: bool = True) -> Path | None:
        path = self._find(component, backend, precision, required=required and backend != "openvino")
        if path is None and backend == "openvino":
            # OpenVINO reads ONNX files directly: a folder with only ONNX models still runs on OpenVINO.
            path = self._find(component, "onnxruntime", precision, required=False)
            if path is None and required:
                self._find(component, backend, precision, required=True)  # raises the message about the IR
        return path

    def _find(self, component: str, backend: str, precision: str, required: bool) -> Path | None:
        if self.manifest is not None:
            entry = self.manifest.get("components", {}).get(component, {}).get(_MANIFEST_BACKEND[backend], {})
            rel = entry.get(precision)
            if rel is None and precision != "fp32":
                if not required:
                    return None
                have = ", ".join(sorted(entry)) or "none"
                raise ModelFolderError(
                    f"{self.root}: no {precision} {component} for {backend} (available: {have}); "
                    f"export it with sd-export --precision {precision} or choose another precision"
                )
            path = self.root / (rel or f"{component}/{DEFAULT_FILES[backend]}")
        else:
            if precision != "fp32":
                if not required:
                    return None
                raise ModelFolderError(f"{self.root} has no leansd.json, so only fp32 models are known; use precision fp32")
            path = self.root / component / DEFAULT_FILES[backend]
        if not path.is_file():
            if not required:
                return None
            raise ModelFolderError(
                f"{path} is missing: the model folder has no {component} for {backend}; "
                f"re-export with sd-export --backend {'onnx' if backend == 'onnxruntime' else 'openvino'} or pick the other backend"
            )
        return path

    def component_file(self, component: str, backend: str, precision: str = "fp32") -> Path:
        """The model file of a component for a backend and precision; raises naming the fix when absent."""
        path = self._candidate(component, backend, precision)
        assert path is not None
        return path

    def optional_component_file(self, component: str, backend: str, precision: str = "fp32") -> Path | None:
        """The file of an optional component (the deep-cache UNet parts), or None when the folder has none."""
        return self._candidate(component, backend, precision, required=False)

    def component_config(self, component: str) -> dict:
        """A component folder's config.json (e.g. the tiny VAE decoder's scaling factor)."""
        return _read_json(self.root / component / "config.json", f"{component} config")

    def has_component(self, component: str, backend: str) -> bool:
        return self._candidate(component, backend, "fp32", required=False) is not None

    @property
    def name(self) -> str:
        return str((self.manifest or {}).get("name") or self.root.name)
