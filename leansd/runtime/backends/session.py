"""What every backend session offers, and the input checks they share."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from leansd.runtime.errors import InvalidInputError


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output: its name, shape (None for a dynamic dimension) and numpy dtype."""

    name: str
    shape: tuple[int | None, ...] | None
    dtype: np.dtype


@dataclass(frozen=True)
class SessionOptions:
    """Settings shared by the backends.

    device: "cpu", "gpu", "auto" (a GPU when the backend offers one) or a backend's own device name.
    num_threads: intra-op threads; None lets the backend choose (physical cores).
    cache_dir: where later runs find work done by earlier ones (None: no cache): OpenVINO's compiled blobs,
        ONNX Runtime's optimized graphs on CPU (`graph_cache`).
    static_shapes: OpenVINO reshapes the model to the first input shapes it sees and recompiles on change.
    low_memory: ask the backend not to keep memory arenas between calls.
    release_after_run: keep the memory arena during a call but return its memory after each call (ONNX Runtime's
        arena shrinkage; for models that run rarely with large activations, such as the VAE).
    """

    device: str = "cpu"
    num_threads: int | None = None
    cache_dir: Path | None = None
    static_shapes: bool = True
    low_memory: bool = False
    release_after_run: bool = False
    extra: dict = field(default_factory=dict)


class Session(ABC):
    """One loaded model file. `run` checks its feeds against `inputs` before calling the backend."""

    path: Path
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    device: str

    def input(self, name: str) -> TensorSpec:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise KeyError(name)

    def has_input(self, name: str) -> bool:
        return any(spec.name == name for spec in self.inputs)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model; feeds are cast to the declared dtypes and their shapes checked."""
        return self._run(self._check(feeds))

    def _check(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        expected = {s.name: s for s in self.inputs}
        missing = sorted(set(expected) - set(feeds))
        unknown = sorted(set(feeds) - set(expected))
        if missing or unknown:
            raise InvalidInputError(
                f"{self.path}: inputs do not match the model (missing {missing}, unexpected {unknown}); "
                f"it expects {sorted(expected)}"
            )
        checked = {}
        for name, value in feeds.items():
            spec = expected[name]
            array = np.asarray(value, dtype=spec.dtype)
            if array.ndim and not array.flags.c_contiguous:  # (ascontiguousarray would turn a scalar into 1-D)
                array = np.ascontiguousarray(array)
            if spec.shape is not None:
                if array.ndim != len(spec.shape) or any(
                    want is not None and want != got for want, got in zip(spec.shape, array.shape)
                ):
                    shown = tuple("?" if d is None else d for d in spec.shape)
                    raise InvalidInputError(
                        f"{self.path}: input {name!r} has shape {array.shape} but the model expects {shown}; "
                        "re-export the model without static shapes or use the size it was exported for"
                    )
            checked[name] = array
        return checked

    @abstractmethod
    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None:
        """Release the backend's memory. The session cannot run afterwards."""
