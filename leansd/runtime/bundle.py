"""Find and validate a model folder: leansd's own exports and Optimum's ONNX / OpenVINO exports.

The folder layout is the one `optimum-cli export onnx|openvino` writes; `leansd.json`, when present,
says which files exist for each backend and precision. Without it, the files are found by their names.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from leansd.runtime import manifest as names
from leansd.runtime.errors import ModelFolderError
from leansd.runtime.schedulers import SCHEDULER_ALIASES, get_scheduler
from leansd.runtime.schedulers.common import SchedulerConfigTypeError, UnsupportedSchedulerOption, shown

# File each backend looks for in a component folder when there is no manifest (Optimum's names).
DEFAULT_FILES = {"onnxruntime": "model.onnx", "openvino": "openvino_model.xml"}
_MANIFEST_BACKEND = {"onnxruntime": "onnx", "openvino": "openvino"}

# A small schema per file: for each key the runtime reads, a test its value must pass and what the test expects.
# Checked once when the folder opens, so the code that reads the values can trust them.
Rule = tuple[Callable[[Any], bool], str]


def _read_json(path: Path, what: str, schema: Mapping[str, Rule] | None = None) -> dict:
    """A JSON object file, with the keys in `schema` checked (absent keys are left to their defaults)."""
    if not path.is_file():
        raise ModelFolderError(f"{path} is missing: the model folder is incomplete ({what}); re-export it with sd-export")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFolderError(f"{path} is not valid JSON ({exc}); re-export the model with sd-export") from None
    if not isinstance(data, dict):
        raise ModelFolderError(f"{path} holds {shown(data)}, not a JSON object ({what}); re-export the model with sd-export")
    _check_keys(path, data, schema or {})
    return data


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


POSITIVE_INT: Rule = (lambda v: _is_int(v) and v > 0, "a positive integer")
NUMBER: Rule = (_is_number, "a number")
NONZERO_NUMBER: Rule = (lambda v: _is_number(v) and v != 0, "a non-zero number")
STRING: Rule = (lambda v: isinstance(v, str), "a string")
SIZE: Rule = (lambda v: POSITIVE_INT[0](v) or (isinstance(v, list) and len(v) in (1, 2) and all(POSITIVE_INT[0](x) for x in v)),
              "a positive integer or a [height, width] list")
CHANNEL_LIST: Rule = (lambda v: isinstance(v, list) and len(v) > 0 and all(POSITIVE_INT[0](x) for x in v),
                      "a non-empty list of positive integers")
OBJECT: Rule = (lambda v: isinstance(v, dict), "a JSON object")
STRING_LIST: Rule = (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of key names")


def _or_null(rule: Rule) -> Rule:
    return (lambda v: v is None or rule[0](v), f"{rule[1]} or null")


MANIFEST_SCHEMA: dict[str, Rule] = {
    "format_version": POSITIVE_INT,
    "name": _or_null(STRING),
    "components": (OBJECT[0], 'a JSON object {component: {backend: {precision: "relative/path"}}}'),
    "static_shapes": _or_null(OBJECT),
    "defaults": OBJECT,
}
STATIC_SHAPES_SCHEMA: dict[str, Rule] = {key: POSITIVE_INT for key in ("height", "width", "batch", "unet_batch")}
DEFAULTS_SCHEMA: dict[str, Rule] = {
    "num_inference_steps": POSITIVE_INT,
    "guidance_scale": NUMBER,
    "strength": NUMBER,  # image-to-image's default (diffusers' SDXL pipelines: 0.3)
    "inpaint_strength": NUMBER,  # inpainting's (diffusers' SDXL inpainting pipeline: 0.9999)
    "height": POSITIVE_INT,
    "width": POSITIVE_INT,
}
MODEL_INDEX_SCHEMA: dict[str, Rule] = {"_class_name": _or_null(STRING)}
SCHEDULER_SCHEMA: dict[str, Rule] = {"_class_name": STRING, "_use_default_values": STRING_LIST}
UNET_SCHEMA: dict[str, Rule] = {
    "in_channels": POSITIVE_INT,
    "sample_size": SIZE,
    "time_cond_proj_dim": _or_null(POSITIVE_INT),
}
VAE_SCHEMA: dict[str, Rule] = {
    "scaling_factor": NONZERO_NUMBER,
    "shift_factor": _or_null(NUMBER),
    "latent_channels": POSITIVE_INT,
    "block_out_channels": CHANNEL_LIST,
    "sample_size": SIZE,
}


def _check_keys(path: Path, data: Mapping[str, Any], schema: Mapping[str, Rule], prefix: str = "") -> None:
    """Check the keys of `schema` that `data` has; `prefix` spells where `data` sits in the file."""
    for key, rule in schema.items():
        if key in data:
            _require(path, prefix + key, data[key], rule)


def _require(path: Path, key: str, value: Any, rule: Rule) -> None:
    test, expected = rule
    if not test(value):
        raise ModelFolderError(
            f"{path}: key '{key}' is {shown(value)}, expected {expected}; correct it or re-export the model with sd-export"
        )


def _check_components(path: Path, components: Mapping[str, Any]) -> None:
    """`components`: {component: {backend: {precision: "relative/path"}}}, each level checked."""
    for component, per_backend in components.items():
        _require(path, f"components.{component}", per_backend, (OBJECT[0], 'a JSON object {backend: {precision: "relative/path"}}'))
        for backend, files in per_backend.items():
            where = f"components.{component}.{backend}"
            _require(path, where, files, (OBJECT[0], 'a JSON object {precision: "relative/path"}'))
            for precision, rel in files.items():
                _require(path, f"{where}.{precision}", rel, (STRING[0], "a file path relative to the model folder"))


def _check_manifest(path: Path, manifest: dict) -> None:
    if manifest.get("format") != names.FORMAT:
        raise ModelFolderError(f"{path} is not a leansd manifest; re-export the model with sd-export")
    _check_keys(path, manifest, {"format_version": MANIFEST_SCHEMA["format_version"]})
    if manifest.get("format_version", 0) > names.FORMAT_VERSION:
        raise ModelFolderError(f"{path.parent} was written by a newer leansd (format {manifest['format_version']}); upgrade leansd")
    _check_keys(path, manifest, MANIFEST_SCHEMA)
    _check_components(path, manifest.get("components", {}))
    _check_keys(path, manifest.get("static_shapes") or {}, STATIC_SHAPES_SCHEMA, "static_shapes.")
    _check_keys(path, manifest.get("defaults", {}), DEFAULTS_SCHEMA, "defaults.")


def _check_scheduler(path: Path, config: dict) -> None:
    """Build the config's own scheduler, and every other one leansd has, from it: a value of the wrong type (for
    any of them) is reported now, naming the file. A value a scheduler does not implement, or a class leansd
    does not have, is reported when that scheduler is chosen: another one (`scheduler=`) may still run."""
    own = config.get("_class_name")
    for name in dict.fromkeys([own] + sorted(set(SCHEDULER_ALIASES.values()))):
        if name is None:
            continue
        try:
            get_scheduler(name, config)
        except SchedulerConfigTypeError as exc:
            raise ModelFolderError(f"{path}: {exc}") from None
        except UnsupportedSchedulerOption:
            pass


@dataclass
class ModelBundle:
    """A validated model folder and the configs the runtime needs from it."""

    root: Path
    manifest: dict | None
    scheduler_config: dict
    unet_config: dict
    vae_config: dict
    model_index: dict | None = None  # model_index.json, when the folder has one

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
            _check_manifest(root / names.MANIFEST, manifest)
        elif not (root / "model_index.json").is_file():
            raise ModelFolderError(
                f"{root} is not a model folder (no leansd.json or model_index.json); export a model into it with sd-export"
            )
        if (root / "vae").is_dir() and not (root / "vae_decoder").is_dir():
            raise ModelFolderError(f"{root} is a PyTorch diffusers folder; convert it first: sd-export {root} OUTPUT_DIR")
        index = None
        if (root / "model_index.json").is_file():
            index = _read_json(root / "model_index.json", "pipeline index", MODEL_INDEX_SCHEMA)
        scheduler_path = root / "scheduler" / "scheduler_config.json"
        scheduler = _read_json(scheduler_path, "scheduler config", SCHEDULER_SCHEMA)
        _check_scheduler(scheduler_path, scheduler)
        unet = _read_json(root / "unet" / "config.json", "UNet config", UNET_SCHEMA)
        vae = _read_json(root / names.VAE_DECODER / "config.json", "VAE config", VAE_SCHEMA)
        if (root / names.TINY_VAE_DECODER / "config.json").is_file():
            _read_json(root / names.TINY_VAE_DECODER / "config.json", "tiny VAE config", VAE_SCHEMA)
        return cls(root, manifest, scheduler, unet, vae, index)

    @property
    def pipeline_class(self) -> str:
        """The diffusers pipeline class the folder was exported from (`model_index.json`), or "" when unknown."""
        return str((self.model_index or {}).get("_class_name") or "")

    @property
    def low_res_scheduler_config(self) -> dict | None:
        """The x4 upscaler's scheduler that noises its low-resolution input (`low_res_scheduler/`), if the folder has one."""
        path = self.root / "low_res_scheduler" / "scheduler_config.json"
        return _read_json(path, "low-resolution scheduler config", SCHEDULER_SCHEMA) if path.is_file() else None

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
        schema = VAE_SCHEMA if component in (names.VAE_DECODER, names.TINY_VAE_DECODER) else None
        return _read_json(self.root / component / "config.json", f"{component} config", schema)

    def has_component(self, component: str, backend: str) -> bool:
        return self._candidate(component, backend, "fp32", required=False) is not None

    @property
    def name(self) -> str:
        return str((self.manifest or {}).get("name") or self.root.name)
