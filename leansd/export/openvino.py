"""ONNX file -> OpenVINO IR (`openvino_model.xml` + `.bin`), weights kept in float32.

Converted from the ONNX file rather than from the PyTorch module: it keeps Optimum's input/output names
without renaming and costs no second trace, and it is as exact (tiny UNet, max-abs error vs PyTorch:
2.2e-6 from the ONNX file, 2.2e-6 from the module; the ONNX file itself 1.8e-6 on ONNX Runtime).

Attention is converted with its scale on the scores instead of on Q and K (`attention.scale_scores_once`): so
OpenVINO keeps the Q and K projections on its MLAS kernels (see there).
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path

XML = "openvino_model.xml"


def convert_openvino(onnx_path: Path, xml_path: Path) -> list[Path]:
    """Convert `onnx_path` and save it as `xml_path` (+ the `.bin` beside it); return the files written."""
    import openvino as ov

    with _scores_scaled(onnx_path) as source:
        model = ov.convert_model(str(source))
    # save_model compresses weights to fp16 by default; this is the fp32 variant.
    ov.save_model(model, str(xml_path), compress_to_fp16=False)
    del model
    return [xml_path, xml_path.with_suffix(".bin")]


def _scores_scaled(onnx_path: Path) -> AbstractContextManager[Path]:
    """`onnx_path`, or while in the context a copy of its graph with the attention scale moved to the scores."""
    from leansd.export import attention

    return attention.rewritten_copy(onnx_path, attention.scale_scores_once, "scores-scaled")
