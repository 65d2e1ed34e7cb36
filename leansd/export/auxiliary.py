"""Writing an auxiliary model (the safety checker, the depth estimator): one ONNX file and its OpenVINO IR, each
verified against PyTorch on the same inputs, as every diffusion component is."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from leansd.export import verify
from leansd.export.onnx import export_onnx
from leansd.export.openvino import XML, convert_openvino


def export_verified(component: str, graph: Any, example: Mapping[str, np.ndarray], feeds: Mapping[str, np.ndarray],
                    reference: Mapping[str, np.ndarray], root: Path, backends: tuple[str, ...], opset: int,
                    tolerance: float) -> tuple[dict, dict]:
    """Trace `graph` on `example` into root/component, convert it for each backend and check each file on `feeds`
    against `reference`. Returns ({backend: {"fp32": path}}, {backend: {"fp32": parity}})."""
    folder, scratch = root / component, root / f".{component}-scratch"
    onnx_path = (folder if "onnx" in backends else scratch) / "model.onnx"
    export_onnx(component, graph, dict(example), onnx_path, opset=opset)
    files: dict[str, dict[str, str]] = {}
    parity: dict[str, dict[str, Any]] = {}
    try:
        if "onnx" in backends:
            parity["onnx"] = {"fp32": verify.check(component, "onnx", onnx_path, feeds, reference, tolerance).to_json()}
            files["onnx"] = {"fp32": f"{component}/model.onnx"}
        if "openvino" in backends:
            convert_openvino(onnx_path, folder / XML)
            parity["openvino"] = {"fp32": verify.check(component, "openvino", folder / XML, feeds, reference, tolerance).to_json()}
            files["openvino"] = {"fp32": f"{component}/{XML}"}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return files, parity
