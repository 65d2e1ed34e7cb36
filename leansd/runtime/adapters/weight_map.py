"""Where each PyTorch weight lives in the exported graphs: `weight_map.json`, written by `sd-export`.

The exporters rename and reshape weights: ONNX keeps a convolution's weight under its PyTorch name, but a
linear layer's becomes an anonymous transposed constant (`onnx::MatMul_1644`, shape in x out) and OpenVINO IR
names it after the transposition it folded (`Transpose_40363`, out x in again). Run-time adapters (LoRA,
textual inversion) change weights by their diffusers names, so the exporter records, for every model file it
wrote, each weight's name in that graph, whether it is stored transposed, and where its float32 bytes lie
(file and offset), found by matching values against the PyTorch module:

    {"format": "leansd-weight-map", "format_version": 1,
     "files": {"unet/model.onnx": {"component": "unet", "data": "unet/model.onnx",
                                   "weights": {"conv_in.weight": ["model.conv_in.weight", false, 1234, [32, 4, 3, 3]], ...}}}}

The runtime reads the base values from those bytes (no ONNX or OpenVINO library needed) and hands the backend
new values by graph name (`patched`).
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from leansd.runtime.errors import ModelFolderError

MAP_FILE = "weight_map.json"
FORMAT = "leansd-weight-map"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class GraphWeight:
    """One weight in one graph: its name there, whether the graph stores it transposed, and its bytes' offset."""

    name: str
    transposed: bool
    offset: int
    shape: tuple[int, ...]  # as stored in the graph


@dataclass(frozen=True)
class GraphWeights:
    """The mapped weights of one model file, by diffusers parameter name."""

    model: Path
    data: Path
    weights: Mapping[str, GraphWeight]

    def stored(self, param: str) -> np.ndarray:
        """The exported value of `param` as the graph stores it (transposed for `transposed` entries), in a new array."""
        entry = self.weights[param]
        count = int(np.prod(entry.shape, dtype=np.int64))
        try:
            values = np.fromfile(self.data, dtype="<f4", count=count, offset=entry.offset)
        except OSError as exc:
            raise ModelFolderError(f"cannot read {self.data} ({exc.strerror or exc}); re-export the model with sd-export") from None
        if values.size != count:
            raise ModelFolderError(f"{self.data} is shorter than its weight map says; re-export the model with sd-export")
        return values.astype(np.float32, copy=False).reshape(entry.shape)

    def base(self, param: str) -> np.ndarray:
        """The exported value of `param`, in the PyTorch layout."""
        values = self.stored(param)
        return values.T if self.weights[param].transposed else values

    def patched(self, values: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """New values by diffusers name, in the graph's layout (see `stored`) -> the same values by graph name."""
        return {self.weights[param].name: np.ascontiguousarray(value, dtype=np.float32) for param, value in values.items()}


class WeightMap:
    """A model folder's `weight_map.json`."""

    def __init__(self, root: Path, files: Mapping[str, dict]):
        self.root = root
        self._files = files

    @classmethod
    def read(cls, root: Path) -> "WeightMap | None":
        """The folder's map, or None when it was exported without one."""
        path = Path(root) / MAP_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ModelFolderError(f"{path} is not valid JSON ({exc}); re-export the model with sd-export") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("files"), dict):
            raise ModelFolderError(f"{path} is not a leansd weight map; re-export the model with sd-export")
        if data.get("format_version") != FORMAT_VERSION:
            raise ModelFolderError(f"{path} has weight-map format version {data.get('format_version')!r}; this leansd reads "
                                   f"version {FORMAT_VERSION}: re-export the model with this sd-export")
        return cls(Path(root), data["files"])

    def graph(self, model_file: Path) -> GraphWeights | None:
        """The mapped weights of `model_file` (a file of this folder), or None when the map does not cover it."""
        try:
            rel = Path(model_file).resolve().relative_to(self.root.resolve()).as_posix()
        except ValueError:
            return None
        entry = self._files.get(rel)
        if entry is None:
            return None
        try:
            weights = {param: GraphWeight(str(v[0]), bool(v[1]), int(v[2]), tuple(int(d) for d in v[3]))
                       for param, v in entry["weights"].items()}
            return GraphWeights(self.root / rel, self.root / entry["data"], weights)
        except (KeyError, TypeError, ValueError, IndexError):
            raise ModelFolderError(f"{self.root / MAP_FILE}: the entry of {rel} is damaged; re-export the model with sd-export") from None
