"""The backend boundary: a `Session` runs one model file with onnxruntime or openvino.

Component wrappers only see `Session`: named inputs and outputs with shapes and dtypes, and `run`.
`component_opener` is where a backend picks which file of a model folder runs a component (the whole
graph, the one with fused attention, the streamed parts, an int8 variant): nothing above this layer names
a backend.
"""
from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable
from pathlib import Path

from leansd.runtime import manifest
from leansd.runtime.backends.session import LazySession, Session, SessionOptions, TensorSpec
from leansd.runtime.bundle import ModelBundle
from leansd.runtime.errors import BackendError, ModelFolderError

BACKENDS = ("onnxruntime", "openvino")
# Accepted spellings for each backend (the exporter's names and short ones).
_BACKEND_NAMES = {"onnxruntime": "onnxruntime", "onnx": "onnxruntime", "ort": "onnxruntime", "openvino": "openvino", "ov": "openvino"}


def installed_backends() -> list[str]:
    """The backends whose Python package is importable, in order of preference."""
    return [b for b in BACKENDS if importlib.util.find_spec(b) is not None]


def normalize_backend(name: str) -> str:
    """Map a user's backend name to `onnxruntime` or `openvino`, or raise naming the choices."""
    key = name.strip().lower()
    if key not in _BACKEND_NAMES:
        raise BackendError(f"unknown backend {name!r}: choose onnxruntime or openvino")
    backend = _BACKEND_NAMES[key]
    if importlib.util.find_spec(backend) is None:
        raise BackendError(f"backend {backend} is not installed: pip install 'leansd[{backend}]'")
    return backend


def open_session(path: Path, backend: str, options: SessionOptions | None = None) -> Session:
    """Open one model file (`model.onnx` or `openvino_model.xml`) with the given backend."""
    options = options or SessionOptions()
    backend = normalize_backend(backend)
    if backend == "onnxruntime":
        from leansd.runtime.backends.onnxruntime import OnnxRuntimeSession

        return OnnxRuntimeSession(Path(path), options)
    from leansd.runtime.backends.openvino import OpenVinoSession

    return OpenVinoSession(Path(path), options)


def open_streamed_session(index: Path, options: SessionOptions | None = None) -> Session:
    """Open a model that `sd-export` cut into parts (`<model>.parts.json`) for weight streaming on ONNX Runtime."""
    normalize_backend("onnxruntime")  # raises the install hint when it is missing
    from leansd.runtime.backends.streamed import StreamedOnnxSession

    return StreamedOnnxSession(Path(index), options or SessionOptions())


# Precisions that are a way of running the fp32 files rather than files of their own.
COMPUTE_PRECISIONS = {"bf16": "bf16"}
# What int8 files compute their float operations in (OpenVINO): bf16 where the CPU has it natively, as OpenVINO's own
# default does. In f32 the float half of an SD 1.5 int8 UNet made its call 1.75x slower than in bf16 on an AMX CPU, for
# about 1 dB of its error against fp32 (perf/README.md).
INT8_FLOAT_PRECISION = "bf16-if-native"


def files_precision(backend: str, precision: str) -> str:
    """The precision of the files that run `precision` on `backend` (bf16 runs the fp32 files on OpenVINO)."""
    if precision in COMPUTE_PRECISIONS:
        if backend != "openvino":
            raise BackendError(f"precision {precision} runs on the openvino backend; on {backend} use fp32 or int8")
        return "fp32"
    return precision


def unet_weights(bundle: ModelBundle, backend: str, precision: str, low_memory: bool) -> tuple[bool, int]:
    """(whether the UNet's files compute attention fused, the bytes of weights one UNet call maps in low-memory
    mode). ONNX Runtime runs a UNet cut into parts with fused attention, whole or streamed one part at a time."""
    precision = files_precision(backend, precision)
    index = bundle.optional_component_file(manifest.UNET_PARTS, backend, precision) if backend == "onnxruntime" else None
    if not low_memory:
        return index is not None, 0
    path = bundle.component_file(manifest.UNET, backend, precision)
    data = [p for p in path.parent.glob(f"{path.stem}*") if p.suffix in (".onnx_data", ".bin", ".data")]
    size = sum(p.stat().st_size for p in data) or path.stat().st_size
    return index is not None, size // (len(manifest.read_parts_index(index)["parts"]) if index is not None else 1)


def component_opener(
    bundle: ModelBundle, component: str, backend: str, precision: str, options: SessionOptions, required: bool = True
) -> Callable[[], Session] | None:
    """How to open `component` of `bundle` (None when it is optional and absent). On ONNX Runtime, a model cut
    into parts (the UNet, SDXL's second text encoder: `manifest.PARTS_OF`) runs streamed in low-memory mode (one
    part's weights in memory at a time) and otherwise as the whole graph with fused attention that the parts index
    names, or its own file when the index names none. bf16 runs the fp32 files with a bf16 hint."""
    if precision in COMPUTE_PRECISIONS:
        options = dataclasses.replace(options, inference_precision=COMPUTE_PRECISIONS[precision])
    elif precision == "int8":
        options = dataclasses.replace(options, inference_precision=INT8_FLOAT_PRECISION)
    precision = files_precision(backend, precision)
    if backend == "onnxruntime" and component in manifest.PARTS_OF:
        index = bundle.optional_component_file(manifest.PARTS_OF[component], backend, precision)
        if index is not None:
            if options.low_memory:
                return lambda: open_streamed_session(index, options)
            whole = manifest.fused_whole_file(index)
            if whole is not None:
                if not whole.is_file():
                    raise ModelFolderError(f"{whole} is missing; re-export the model with sd-export")
                return lambda: open_session(whole, backend, options)
    path = bundle.component_file(component, backend, precision) if required else bundle.optional_component_file(component, backend, precision)
    return None if path is None else (lambda: open_session(path, backend, options))


__all__ = ["LazySession", "component_opener", "Session", "SessionOptions", "TensorSpec", "installed_backends", "normalize_backend", "open_session", "open_streamed_session", "BACKENDS"]
