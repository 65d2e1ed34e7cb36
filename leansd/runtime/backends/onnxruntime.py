"""ONNX Runtime sessions."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from leansd.runtime.backends import graph_cache
from leansd.runtime.backends.session import Session, SessionOptions, TensorSpec
from leansd.runtime.errors import BackendError, ModelFolderError

_ONNX_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
               "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
               "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}
# GPU-capable execution providers, in the order "auto" tries them.
_GPU_PROVIDERS = ("CUDAExecutionProvider", "ROCMExecutionProvider", "DmlExecutionProvider", "CoreMLExecutionProvider")
_DEVICE_PROVIDERS = {"cuda": "CUDAExecutionProvider", "rocm": "ROCMExecutionProvider", "dml": "DmlExecutionProvider", "directml": "DmlExecutionProvider", "coreml": "CoreMLExecutionProvider"}


def choose_providers(device: str) -> list[str]:
    """Execution providers for a device name; CPU always last as the fallback."""
    available = ort.get_available_providers()
    device = device.lower()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    gpu = [p for p in _GPU_PROVIDERS if p in available]
    if device == "auto":
        return gpu[:1] + ["CPUExecutionProvider"]
    wanted = next(iter(gpu), None) if device == "gpu" else _DEVICE_PROVIDERS.get(device)
    if wanted not in available:
        raise BackendError(f"device {device!r} is not available in this onnxruntime (providers: {', '.join(available)}); "
                           "use --device cpu or auto, or install onnxruntime-gpu / onnxruntime-directml")
    return [wanted, "CPUExecutionProvider"]


def session_options(options: SessionOptions, level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL) -> ort.SessionOptions:
    """ONNX Runtime's options for `options`, at graph optimization `level`."""
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.log_severity_level = 3
    if options.num_threads:
        so.intra_op_num_threads = options.num_threads
    # The memory pattern recorded on a first call makes the second call of the same shape ask the arena for
    # one large block, which the arena (already cut into per-tensor chunks) cannot reuse: SD 1.5's VAE decoder
    # grew by 0.9 GB more on its second 512x512 decode. Off, the arena is reused; UNet calls measured no slower.
    so.enable_mem_pattern = False
    if options.low_memory:
        # The CPU arena keeps peak activations allocated between calls; without it memory is returned.
        so.enable_cpu_mem_arena = False
    return so


def inference_session(path: Path, so: ort.SessionOptions, providers: list[str], source: Path | None = None) -> ort.InferenceSession:
    """Open the ONNX file `path` (the copy of model file `source`, if given); a failure names the model file."""
    try:
        return ort.InferenceSession(str(path), sess_options=so, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types for bad files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelFolderError(f"{source or path} is not a loadable ONNX model ({first}); re-export the model with sd-export") from None


def _spec(arg) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) and d >= 0 else None for d in arg.shape) if arg.shape is not None else None
    return TensorSpec(arg.name, shape, np.dtype(_ONNX_TYPES.get(arg.type, np.float32)))


def with_weights(so: ort.SessionOptions, weights: dict[str, ort.OrtValue], external: bool) -> ort.SessionOptions:
    """`so` with initializers replaced by `weights` (ONNX Runtime reads them from these buffers, which the caller
    keeps alive as long as the session).

    `external`: the graph keeps these weights in an external data file (models over 2 GB) and has all of them;
    they are then injected as that data, before the graph is optimized, so full optimization sees them. Otherwise
    they replace initializers after the graph transformers ran (names the graph lacks are ignored), and as the
    layout transformers of level ALL copy the file's values first (blocked convolution weights), such sessions
    run at the EXTENDED level."""
    if not weights:
        return so
    if external:
        so.add_external_initializers(list(weights), list(weights.values()))
        return so
    for name, value in weights.items():
        so.add_initializer(name, value)
    if so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    return so


def _external_data(path: Path) -> bool:
    """Whether the model keeps its weights in an external data file beside it (sd-export's and Optimum's name)."""
    return any(path.parent.glob("*.onnx_data"))


def weight_values(options: SessionOptions) -> dict[str, ort.OrtValue]:
    """The session's replacement weights as ONNX Runtime values (sharing the arrays' memory)."""
    return {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array, dtype=np.float32))
            for name, array in options.weight_overrides().items()}


def _open(path: Path, options: SessionOptions, providers: list[str],
          weights: dict[str, ort.OrtValue] | None = None) -> tuple[ort.InferenceSession, Path]:
    """A session for `path` and the file it was opened from. With a cache folder (CPU only) that is the graph an
    earlier process optimized, or `path`, optimized now and saved for the next process (see `graph_cache`).
    Replaced weights bypass the cache: the saved graph would hold them."""
    if options.cache_dir is None or providers != ["CPUExecutionProvider"] or weights:
        return inference_session(path, with_weights(session_options(options), weights or {}, _external_data(path)), providers), path
    entry = graph_cache.lookup(path, options.cache_dir, ort.__version__)
    if entry.ready:
        try:  # optimized before it was saved: open it as it is
            as_saved = session_options(options, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
            return inference_session(entry.model, as_saved, providers, source=path), entry.model
        except ModelFolderError:
            entry.discard()  # a damaged entry: rebuild it below
    try:
        stage = entry.staging()
    except OSError:  # the cache folder cannot be written: run without it
        return inference_session(path, session_options(options), providers), path
    so = session_options(options)
    so.optimized_model_filepath = str(stage / graph_cache.MODEL)
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name", graph_cache.DATA)
    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    try:
        session = inference_session(path, so, providers)
    except ModelFolderError:  # the model, or saving its optimized graph (a full disk), failed: try without saving
        entry.abandon(stage)
        return inference_session(path, session_options(options), providers), path
    entry.commit(stage)
    return session, path


class OnnxRuntimeSession(Session):
    def __init__(self, path: Path, options: SessionOptions):
        self.path = path
        if not path.is_file():
            raise ModelFolderError(f"model file {path} is missing; re-export the model with sd-export")
        self._run_options = None
        if options.release_after_run and not options.low_memory:
            # The arena serves the call (reusing freed blocks, instead of fresh pages for every large tensor: SD 1.5's
            # 512x512 VAE decode 14.7 s against 19.3 s without it) and is shrunk when the call ends.
            self._run_options = ort.RunOptions()
            self._run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        self._weights = weight_values(options)  # kept alive for the session, which reads them in place
        # opened_from: the optimized copy instead of `path`, when a cache entry was used.
        self._session, self.opened_from = _open(path, options, choose_providers(options.device), self._weights)
        self.device = self._session.get_providers()[0]
        self.inputs = [_spec(a) for a in self._session.get_inputs()]
        self.outputs = [_spec(a) for a in self._session.get_outputs()]

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [o.name for o in self.outputs]
        return dict(zip(names, self._session.run(names, feeds, self._run_options)))

    def close(self) -> None:
        self._session = None
