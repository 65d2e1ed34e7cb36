"""The OpenVINO UNet's int8 recipe: "hybrid" (calibrated activations in the convolutions) or "weights" (int8
matrix-product weights only, convolutions float, no calibration), chosen by `--int8-unet`, and by "auto" from the
UNet's size (weights-only from 1 B parameters: SDXL)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from leansd.export import ExportError
from leansd.export import quantize as q
from tests.conftest import needs_torch


def _unet_folder(root: Path, weight_bytes: int) -> Path:
    """A folder whose OpenVINO UNet weights file has `weight_bytes` bytes (sparse: nothing is written)."""
    (root / "unet").mkdir(parents=True)
    with open(root / "unet" / "openvino_model.bin", "wb") as f:
        f.truncate(weight_bytes)
    return root


def test_auto_picks_weights_only_from_one_billion_parameters(tmp_path):
    big = _unet_folder(tmp_path / "big", 4 * q.LARGE_UNET_PARAMETERS)  # fp32: 4 bytes per parameter
    small = _unet_folder(tmp_path / "small", 4 * q.LARGE_UNET_PARAMETERS - 4)
    assert q.openvino_unet_recipe(big) == "weights" and q.openvino_unet_recipe(small) == "hybrid"
    assert q.openvino_unet_recipe(big, "hybrid") == "hybrid" and q.openvino_unet_recipe(small, "weights") == "weights"
    assert q.openvino_unet_recipe(tmp_path / "no-openvino-files") == "hybrid"  # ONNX-only: nothing to decide
    with pytest.raises(ExportError, match=r"recipe 'int4' is unknown: choose auto, hybrid, weights"):
        q.openvino_unet_recipe(big, "int4")


def test_only_the_hybrid_openvino_unet_is_calibrated():
    assert q.calibrates(("openvino",), "hybrid") and q.calibrates(("onnx", "openvino"), "hybrid")
    assert not q.calibrates(("openvino",), "weights") and not q.calibrates(("onnx",), "hybrid")
    assert "NNCF hybrid" in q.method("unet", "openvino", "hybrid")
    assert "weight compression" in q.method("unet", "openvino", "weights")


@needs_torch
def test_an_unknown_recipe_is_refused_before_exporting(tmp_path, tiny_sd_dir):
    from leansd.export import export_model

    with pytest.raises(ExportError, match="recipe 'activations' is unknown"):
        export_model(tiny_sd_dir, tmp_path / "out", precisions="fp32,int8", int8_unet="activations", progress=False)
    assert not (tmp_path / "out").exists()
    done = subprocess.run([sys.executable, "-m", "leansd.export.int8", str(tmp_path), "--int8-unet", "fp8"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "invalid choice: 'fp8'" in done.stderr


def _compressed(xml: Path, op_type: str) -> tuple[int, int]:
    """(`op_type` ops whose constant weights are stored as 8-bit integers, `op_type` ops with constant weights) in an IR."""
    import openvino as ov

    def stored_type(port) -> str | None:
        node = port.get_node()
        while node.get_type_name() != "Constant" and node.get_input_size():
            if node.get_type_name() not in ("Convert", "Subtract", "Multiply", "Reshape", "Transpose"):
                return None  # an activation, not a stored weight
            node = node.input_value(0).get_node()  # through Convert, Subtract (zero point), Multiply (scale), Reshape
        return str(node.get_element_type()) if node.get_type_name() == "Constant" else None

    ops = [op for op in ov.Core().read_model(str(xml)).get_ops() if op.get_type_name() == op_type]
    weights = [t for t in (stored_type(op.input_value(1)) for op in ops) if t is not None]
    return sum(t in ("<Type: 'uint8_t'>", "<Type: 'int8_t'>") for t in weights), len(weights)


@pytest.fixture(scope="module")
def weights_only(tiny_sd_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model exported for OpenVINO in fp32, then given int8 in place with the weights-only UNet recipe."""
    from tests.export.fixtures import _export

    root = tmp_path_factory.mktemp("int8-weights")
    folder = shutil.copytree(_export(tiny_sd_dir, root / "fp32", backends="openvino"), root / "model")
    done = subprocess.run([sys.executable, "-m", "leansd.export.int8", str(folder), "--backend", "openvino",
                           "--int8-unet", "weights", "--quiet"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return folder


@needs_torch
@pytest.mark.slow
def test_weights_only_unet_is_recorded_gated_and_not_calibrated(weights_only):
    m = json.loads((weights_only / "leansd.json").read_text())
    assert m["int8"]["openvino_unet_recipe"] == "weights"
    assert m["int8"]["unet_calibration_calls"] == m["int8"]["calibration_prompts"] == 0
    unet = m["parity"]["unet"]["openvino"]["int8"]
    assert "weight compression" in unet["method"] and unet["passed"] and unet["psnr_db"] >= q.GATES["unet"].min_psnr_db
    assert m["components"]["unet"]["openvino"]["int8"] == "unet/openvino_model_int8.xml"
    ir = weights_only / "unet" / "openvino_model_int8.xml"
    assert 'type="FakeQuantize"' not in ir.read_text()  # no quantized activations
    # int8 matrix-product weights; convolutions keep float ones, which OpenVINO would expand into a float copy
    compressed, matmuls = _compressed(ir, "MatMul")
    assert matmuls > 0 and compressed == matmuls
    compressed, convolutions = _compressed(ir, "Convolution")
    assert convolutions > 0 and compressed == 0
    assert _compressed(weights_only / "unet" / "openvino_model.xml", "MatMul")[0] == 0
    fp32, int8 = ((weights_only / "unet" / f"{stem}.bin").stat().st_size for stem in ("openvino_model", "openvino_model_int8"))
    assert int8 < fp32


@needs_torch
@pytest.mark.slow
def test_weights_only_unet_generates_close_to_fp32(weights_only):
    import leansd

    images = {}
    for precision in ("fp32", "int8"):
        pipe = leansd.load(weights_only, backend="openvino", precision=precision)
        assert pipe.bundle.component_file("unet", "openvino", precision).name == q.FILES["openvino"][precision == "int8"]
        images[precision] = pipe("a lighthouse on a cliff", num_inference_steps=6, seed=11, output_type="np").images
        pipe.close()
    diff = np.abs(images["int8"] - images["fp32"])
    psnr = 20 * np.log10(1.0 / np.sqrt(np.mean(diff**2)))
    assert diff.max() > 0 and psnr > 28, psnr  # int8 ran (not bit-equal), and the image stayed close
