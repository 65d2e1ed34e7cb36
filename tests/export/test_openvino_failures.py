"""When OpenVINO cannot build or run a kernel while the exporter checks a file (as under ONEDNN_MAX_CPU_ISA=AVX2 on an
AVX-512 CPU, for int8-compressed weights), sd-export says so in one line with OpenVINO's reason and the fix, instead
of OpenVINO's RuntimeError with its source-file lines."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import openvino as ov
import pytest

from leansd.export import ExportError, quantize, verify

OPENVINO_MESSAGE = ("Exception from src/inference/src/cpp/core.cpp:112:\nException from src/plugins/intel_cpu/src/node.cpp:823:\n"
                    "[CPU] FullyConnectedCompressed node with name 'fc' could not create a primitive descriptor.\n")


@pytest.fixture
def relu_ir(tmp_path: Path) -> Path:
    """A one-operation IR: y = relu(x)."""
    x = ov.opset13.parameter([1, 4], np.float32, name="x")
    y = ov.opset13.relu(x)
    y.output(0).get_tensor().set_names({"y"})
    path = tmp_path / "relu.xml"
    ov.save_model(ov.Model([y], [x], "relu"), path)
    return path


FEEDS = [{"x": np.array([[-1.0, 0.5, -2.0, 3.0]], np.float32)}]


def test_the_checks_run_the_file_when_openvino_can(relu_ir: Path) -> None:
    (result,) = quantize.run_all("openvino", relu_ir, FEEDS)
    np.testing.assert_array_equal(result["y"], np.maximum(FEEDS[0]["x"], 0))
    np.testing.assert_array_equal(verify.run_openvino(relu_ir, FEEDS[0])["y"], np.maximum(FEEDS[0]["x"], 0))


@pytest.mark.parametrize("cap", [None, "AVX2"])
@pytest.mark.parametrize("runner", ["quantize.run_all", "verify.run_openvino"])
def test_a_kernel_openvino_cannot_build_is_reported_with_its_reason_and_the_fix(monkeypatch, relu_ir: Path, cap, runner) -> None:
    def failing_compile(self, *args, **kwargs):
        raise RuntimeError(OPENVINO_MESSAGE)

    monkeypatch.setattr(ov.Core, "compile_model", failing_compile)
    if cap:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    else:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    with pytest.raises(ExportError) as caught:
        if runner == "quantize.run_all":
            quantize.run_all("openvino", relu_ir, FEEDS)
        else:
            verify.run_openvino(relu_ir, FEEDS[0])
    text = str(caught.value)
    assert str(relu_ir) in text
    assert "[CPU] FullyConnectedCompressed node with name 'fc' could not create a primitive descriptor." in text
    assert "Exception from" not in text and "\n" not in text
    if cap:
        assert "ONEDNN_MAX_CPU_ISA=AVX2" in text and "unset ONEDNN_MAX_CPU_ISA" in text
    else:
        assert "--backend onnx" in text and "ONEDNN_MAX_CPU_ISA" not in text
