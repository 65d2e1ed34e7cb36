"""OpenVINO sessions: read the IR, reshape to static input shapes, compile.

Static shapes make OpenVINO markedly faster on CPU, so the model is reshaped to the shapes of the first call
and recompiled only when they change. A generation that will call a model at two batch sizes (a guidance cutoff
runs the UNet at batch 2, then 1) says so first (`expect_batch_sizes`), and gets one model compiled for the range
of batch sizes: one compile and one copy of the compiled weights instead of two. Which model serves a call depends
only on its shapes and its own generation's hint, never on what other threads ran before: the same seed gives the
same bits.
"""
from __future__ import annotations

import functools
import threading
from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import openvino as ov

from leansd.runtime import cpu_features
from leansd.runtime.backends import file_pages
from leansd.runtime.backends.session import Session, SessionOptions, TensorSpec
from leansd.runtime.errors import BackendError, ModelFolderError


@functools.cache
def core() -> ov.Core:
    """The process's one OpenVINO runtime core, created on first use."""
    return ov.Core()


def cpu_precision_hint(requested: str) -> str:
    """The CPU's INFERENCE_PRECISION_HINT for a requested precision: "f32", "bf16" (refused on CPUs without native
    bfloat16 arithmetic) or "bf16-if-native" (bf16 on such CPUs, else f32: what int8 files' float operations use)."""
    native_bf16 = cpu_features.openvino_bf16()
    if requested == "bf16" and not native_bf16:
        if cpu_features.capped_below_bf16():
            raise BackendError(f"ONEDNN_MAX_CPU_ISA={cpu_features.isa_cap()} leaves OpenVINO no bfloat16 kernels; "
                               "use precision fp32 or int8, or unset ONEDNN_MAX_CPU_ISA")
        raise BackendError("this CPU has no native bfloat16 arithmetic (AVX512_BF16 or AMX); use precision fp32 or int8")
    if requested == "bf16-if-native":
        return "bf16" if native_bf16 else "f32"
    return requested


def failure_reason(exc: BaseException) -> str:
    """OpenVINO's own words for why it failed, without the "Exception from <source file>" lines it nests above them."""
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip() and not line.startswith("Exception from"))


def choose_device(device: str) -> str:
    available = core().available_devices
    device = device.lower()
    if device == "cpu":
        return "CPU"
    if device == "auto":
        return "GPU" if any(d.startswith("GPU") for d in available) else "CPU"
    wanted = device.upper()
    if not any(d.startswith(wanted) for d in available):
        raise BackendError(f"device {device!r} is not available to OpenVINO (devices: {', '.join(available)}); use --device cpu or auto")
    return wanted


def _public_name(port) -> str:
    """The port's declared name. Conversion can attach internal tensor names to a model input or output as well (an
    ONNX graph's "/block/Cast_output_0" when the first op is a no-op cast), and get_any_name() may pick those."""
    names = port.get_names()
    return min(names, key=lambda n: (n.startswith("/") or "::" in n, len(n), n)) if names else port.get_any_name()


def _spec(port) -> TensorSpec:
    pshape = port.get_partial_shape()
    shape = None if pshape.rank.is_dynamic else tuple(d.get_length() if d.is_static else None for d in pshape)
    return TensorSpec(_public_name(port), shape, np.dtype(port.get_element_type().to_dtype()))


def replace_weights(model: ov.Model, weights: Mapping[str, np.ndarray], path: Path) -> None:
    """Swap constants of `model` (by name) for new values before it is compiled: how run-time adapters change
    weights. The new constants share the arrays' memory; the caller keeps them alive."""
    if not weights:
        return
    constants = {op.get_friendly_name(): op for op in model.get_ops() if op.get_type_name() == "Constant"}
    for name, array in weights.items():
        old = constants.get(name)
        if old is None:
            raise ModelFolderError(f"{path} has no weight {name!r}, which its weight_map.json names; re-export the model with sd-export")
        new = ov.op.Constant(ov.Tensor(array, shared_memory=True))
        new.set_friendly_name(name)
        for target in list(old.output(0).get_target_inputs()):
            target.replace_source_output(new.output(0))
    model.validate_nodes_and_infer_types()


Dim = int | tuple[int, int]
ShapeKey = tuple[tuple[str, tuple[Dim, ...]], ...]


def batch_key(shapes: ShapeKey, batches: frozenset[int]) -> ShapeKey:
    """The shapes to compile for: the call's own, or, when its batch is one of the `batches` its generation
    announced, the same shapes with the batch (first) dimension the range of them. Only the batch is ever made
    dynamic: a range of image sizes would slow every convolution."""
    first = {dims[0] for _, dims in shapes if dims}
    if len(batches) < 2 or not first <= batches:
        return shapes
    span = (min(batches), max(batches))
    return tuple((name, (span, *dims[1:]) if dims else dims) for name, dims in shapes)


def _partial_shape(dims: tuple[Dim, ...]) -> ov.PartialShape:
    return ov.PartialShape([ov.Dimension(*d) if isinstance(d, tuple) else ov.Dimension(d) for d in dims])


class OpenVinoSession(Session):
    def __init__(self, path: Path, options: SessionOptions):
        self.path = path
        if not path.is_file() or (path.suffix == ".xml" and not path.with_suffix(".bin").is_file()):
            raise ModelFolderError(f"OpenVINO model {path} (or its .bin) is missing; re-export the model with sd-export")
        try:
            self._model = core().read_model(str(path))
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelFolderError(f"{path} is not a readable OpenVINO IR ({first}); re-export it with sd-export") from None
        self._weights = options.weight_overrides()  # the replaced constants read these arrays: keep them alive
        replace_weights(self._model, self._weights, path)
        self.device = choose_device(options.device)
        self._config = {"PERFORMANCE_HINT": "LATENCY"}
        if options.num_threads:
            self._config["INFERENCE_NUM_THREADS"] = options.num_threads
        # Folders whose files OpenVINO maps: the IR's, and the compile cache's (a cached blob is mapped too).
        self._mapped_folders = [path.parent]
        if options.cache_dir is not None:
            self._config["CACHE_DIR"] = str(options.cache_dir)
            self._mapped_folders.append(Path(options.cache_dir))
        if self.device == "CPU":
            # f32 keeps fp32 numerics on CPUs that would otherwise pick bf16 (parity with the reference); bf16 is asked
            # for by precision="bf16", on CPUs with native bfloat16 arithmetic only; int8 files take bf16 where native.
            self._config["INFERENCE_PRECISION_HINT"] = cpu_precision_hint(options.inference_precision)
        self.inputs = [_spec(p) for p in self._model.inputs]
        self.outputs = [_spec(p) for p in self._model.outputs]
        # Compiled models by input shapes (a dimension is an int, or a (low, high) range), most recent last. Two are
        # kept (one in low-memory mode): an image can alternate between two sizes, and recompiling costs seconds.
        self._compiled: dict[ShapeKey, tuple[ov.CompiledModel, ov.InferRequest]] = {}
        self._keep = 1 if options.low_memory else 2
        self._hint = threading.local()  # per thread: each generation runs in its own (see expect_batch_sizes)
        # One infer request per compiled shape: calls from several threads take turns.
        self._lock = threading.Lock()

    def expect_batch_sizes(self, sizes: frozenset[int]) -> None:
        self._hint.batches = frozenset(sizes)

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._lock:
            shapes = tuple(sorted((name, array.shape) for name, array in feeds.items()))
            key = batch_key(shapes, getattr(self._hint, "batches", frozenset()))
            fresh = key not in self._compiled
            # Compiling, and the first inference of a model compiled for a batch range, copy the weights out of the
            # mapped file; on the CPU the compiled model then holds its own copy, so the file's pages are let go.
            with file_pages.released_while(*self._mapped_folders) if fresh and self.device == "CPU" else nullcontext():
                try:
                    if fresh:
                        self._compile(key)
                    compiled, request = self._compiled.pop(key)
                    self._compiled[key] = (compiled, request)
                    result = request.infer(feeds, share_inputs=True)
                except RuntimeError as exc:  # OpenVINO reports a kernel it cannot build only here
                    raise self._failure(exc) from exc
            return {spec.name: np.array(result[port], copy=True) for port, spec in zip(compiled.outputs, self.outputs)}

    def _failure(self, exc: RuntimeError) -> BackendError:
        reason = failure_reason(exc)
        cap = cpu_features.isa_cap()
        if cap and self.device == "CPU":
            return BackendError(f"OpenVINO could not run {self.path} with ONEDNN_MAX_CPU_ISA={cap} set ({reason}); the cap "
                                "withholds kernels OpenVINO chose for this CPU (int8-compressed weights need some): unset "
                                "ONEDNN_MAX_CPU_ISA, or use precision fp32")
        return BackendError(f"OpenVINO could not run {self.path} on {self.device} ({reason}); re-export the model with "
                            "sd-export, or use the other backend (--backend onnxruntime)")

    def _compile(self, key: ShapeKey) -> None:
        while len(self._compiled) >= self._keep:  # free the oldest before building the next one
            del self._compiled[next(iter(self._compiled))]
        self._model.reshape({name: _partial_shape(dims) for name, dims in key})
        compiled = core().compile_model(self._model, self.device, self._config)
        self._compiled[key] = (compiled, compiled.create_infer_request())

    def close(self) -> None:
        self._compiled = {}
