"""Static int8 (calibrated QDQ) quantization of an ONNX UNet, with the calibration's memory peak kept apart from the
quantizer's.

One `quantize_static` call with a calibration reader holds the model it loaded while its calibrator loads a second
copy and runs it in a session without graph optimisations over every recorded call: on SD 1.5's UNet at 512x512
(10 calls at batch 2) that process peaked at 16.6 GB, all of it during calibration. Here:

1. the activation ranges (min/max of every tensor a quantized node reads or writes) are computed first, by
   onnxruntime's own calibrator. Its copy of the model is dropped once its session is made (the session has its
   own weights), and each call is fed one image at a time: a guided call's two halves (unconditional and
   conditional) run apart, and the min/max over the halves is the min/max over the call, so the ranges are the same;
2. the calibrator is released and the ranges go to `quantize_static` through its calibration cache file, so the
   quantizer loads the model only after the calibration session is gone.

onnxruntime releases whose `quantize_static` has no cache parameter (1.24 and before) get one call with a reader
over the same one-image feeds: the same ranges, with both copies of the model in memory.
"""
from __future__ import annotations

import inspect
import shutil
from pathlib import Path
from typing import Any

import numpy as np

QUANTIZED_OPS = ["Conv", "MatMul", "Gemm"]


def static_int8(src: Path, dst: Path, calibration: list[dict[str, np.ndarray]]) -> None:
    """`quantize.onnx_static_int8`: QDQ int8 of every Conv, MatMul and Gemm of `src` but `_kept_float`'s, per-channel
    int8 weights and uint8 activations whose ranges come from running `calibration` (the model's recorded inputs)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from leansd.export.onnx import EXTERNAL_DATA_THRESHOLD, _relocate
    from leansd.export.quantize_parts import quantizer_environment

    feeds = one_image_feeds(src, calibration)
    scratch = dst.parent / f".{dst.stem}-quantize"
    scratch.mkdir(parents=True, exist_ok=True)
    settings: dict[str, Any] = dict(
        quant_format=QuantFormat.QDQ, op_types_to_quantize=QUANTIZED_OPS, per_channel=True, reduce_range=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, use_external_data_format=True,
        calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=_kept_float(src),
    )
    try:
        with quantizer_environment(scratch):
            if "calibration_cache_path" in inspect.signature(quantize_static).parameters:
                ranges = scratch / "ranges.json"
                write_activation_ranges(src, feeds, ranges, scratch)
                quantize_static(str(src), str(scratch / "model.onnx"), None, calibration_cache_path=ranges, **settings)
            else:
                quantize_static(str(src), str(scratch / "model.onnx"), _Reader(feeds), **settings)
        _relocate(scratch / "model.onnx", dst, EXTERNAL_DATA_THRESHOLD)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def write_activation_ranges(src: Path, feeds: list[dict[str, np.ndarray]], out: Path, scratch: Path) -> None:
    """Run `feeds` through onnxruntime's min/max calibrator for `src` (the tensors of its Conv, MatMul and Gemm nodes)
    and write the ranges to `out` in the format `quantize_static`'s `calibration_cache_path` reads."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator, save_tensors_data

    calibrator = create_calibrator(src, QUANTIZED_OPS, augmented_model_path=str(scratch / "augmented.onnx"),
                                   calibrate_method=CalibrationMethod.MinMax, use_external_data_format=True)
    # The session holds the weights it runs; the calibrator's own copy of the graph (2.1 GB of SD 1.5's 3.4 GB
    # measured as resident) is only read while augmenting. Clearing its initializers alone frees nothing.
    calibrator.model = None
    for feed in feeds:  # one at a time: each call's ranges are merged into the running min/max, then dropped
        calibrator.collect_data(_Reader([feed]))
    save_tensors_data(calibrator.compute_data(), out)


def one_image_feeds(src: Path, feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """`feeds` cut into one image per feed along the batch axis of the inputs whose first axis `src` leaves free (a
    static export fixes it, and its feeds stay whole); an input shorter than the batch (one timestep for the whole
    batch) is kept whole in every feed."""
    import onnx

    inputs = onnx.load(str(src), load_external_data=False).graph.input
    batch_free = {i.name for i in inputs if i.type.tensor_type.shape.dim and not i.type.tensor_type.shape.dim[0].dim_value}
    out = []
    for feed in feeds:
        batch = max((len(feed[name]) for name in batch_free & feed.keys() if np.ndim(feed[name])), default=1)
        out += [{name: value[i:i + 1] if name in batch_free and np.ndim(value) and len(value) == batch else value
                 for name, value in feed.items()} for i in range(batch)]
    return out


class _Reader:
    """onnxruntime's calibration data reader protocol over a list of feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._feeds = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def _kept_float(src: Path) -> list[str]:
    """The names of `src`'s nodes that the static recipe leaves float:
    - MatMuls whose both inputs are computed (attention's scores and weighted values): the static quantizer would
      quantize them too (it ignores MatMulConstBOnly), and they have no weight to share the error with;
    - the convolution that reads the model's input and the one that writes its output (a UNet's conv_in and
      conv_out): the latents and the predicted noise themselves, which 8 bits resolve worst, for little compute."""
    import onnx

    graph = onnx.load(str(src), load_external_data=False).graph
    constants = {t.name for t in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    ends = {i.name for i in graph.input} | {o.name for o in graph.output}
    return [n.name for n in graph.node
            if (n.op_type == "MatMul" and n.input[1] not in constants)
            or (n.op_type == "Conv" and (n.input[0] in ends or n.output[0] in ends))]
