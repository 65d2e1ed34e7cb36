"""What every backend session offers, and the input checks they share."""
from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
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
    low_memory: ask the backend not to keep memory arenas between calls.
    release_after_run: keep the memory arena during a call but return its memory after each call (ONNX Runtime's
        arena shrinkage; for models that run rarely with large activations, such as the VAE).
    inference_precision: "f32" (exact), "bf16" (OpenVINO computes in bfloat16 on CPUs that have it natively; refused
        elsewhere) or "bf16-if-native" (bf16 on such CPUs, f32 on others: the float operations of int8 files).
    weights: called when the model opens; returns weights to run instead of the file's, by their name in the graph
        (ONNX initializers, OpenVINO constants): how run-time LoRA and textual inversion reach the backend.
    """

    device: str = "cpu"
    num_threads: int | None = None
    cache_dir: Path | None = None
    low_memory: bool = False
    release_after_run: bool = False
    inference_precision: str = "f32"
    weights: Callable[[], Mapping[str, np.ndarray]] | None = field(default=None, compare=False)

    def weight_overrides(self) -> Mapping[str, np.ndarray]:
        """The weights to use instead of the file's now (empty: the file's own)."""
        return self.weights() if self.weights is not None else {}


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

    def expect_batch_sizes(self, sizes: frozenset[int]) -> None:
        """A hint: calls will come at these batch sizes (a guidance cutoff: 2B, then B). Backends that compile per
        shape can compile once for all of them; the others ignore it."""

    def close(self) -> None:
        """Release the backend's memory. The session cannot run afterwards."""


class LazySession:
    """A model file opened on first use, safe to share between threads.

    `use()` lends the session for one piece of work (opening it if needed); `hold()` keeps it from being closed
    across many (a stage of a generation). A `transient` session (low-memory mode) is closed as soon as nobody
    uses or holds it, so only the models of the stages running now stay in memory, whatever the threads do.
    """

    def __init__(self, opener: Callable[[], Session], transient: bool = False):
        self._opener = opener
        self._session: Session | None = None
        self._users = 0
        self._lock = threading.Lock()
        self.transient = transient

    @property
    def loaded(self) -> bool:
        return self._session is not None

    def open(self) -> Session:
        """The open session (opened now if it is not), e.g. at load time so a bad file fails before any generation."""
        with self._lock:
            if self._session is None:
                self._session = self._opener()
            return self._session

    @contextmanager
    def use(self) -> Iterator[Session]:
        with self.hold():
            yield self.open()

    @contextmanager
    def hold(self) -> Iterator[None]:
        with self._lock:
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self.transient and self._users == 0:
                    self._close()

    def close(self) -> None:
        """Release the model now (it reopens on next use)."""
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None
