"""OpenVINO IR is converted with the attention scale on the scores (`attention.scale_scores_once`), so the Q and K
projections stay plain matrix products that OpenVINO runs on MLAS (on AVX2 a projection with the scale fused in
ran on a slower oneDNN kernel)."""
from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import HAS_TORCH

pytestmark = pytest.mark.skipif(not HAS_TORCH, reason="needs torch and diffusers to export")


def _feeds(session) -> dict:
    """Random UNet inputs (batch 2, an 8x8 latent) of the widths and types the session declares."""
    rng = np.random.default_rng(0)
    specs = {arg.name: arg for arg in session.get_inputs()}
    width = specs["encoder_hidden_states"].shape[2]
    return {"sample": rng.standard_normal((2, 4, 8, 8), dtype=np.float32),
            "timestep": np.full((2,), 500, np.int64 if "int" in specs["timestep"].type else np.float32),
            "encoder_hidden_states": rng.standard_normal((2, 77, width), dtype=np.float32)}


def test_moving_the_scale_to_the_scores_keeps_the_unet_output(exported_tiny_sd, tmp_path):
    import onnx
    import onnxruntime as ort

    from leansd.export import attention

    model = onnx.load(str(exported_tiny_sd / "unet" / "model.onnx"))
    softmaxes = sum(n.op_type == "Softmax" for n in model.graph.node)
    roots = sum(n.op_type == "Sqrt" for n in model.graph.node)
    before = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = _feeds(before)
    assert attention.scale_scores_once(model.graph) == softmaxes > 0
    producer = {out: n for n in model.graph.node for out in n.output}
    for softmax in (n for n in model.graph.node if n.op_type == "Softmax"):
        scaled = producer[softmax.input[0]]
        assert scaled.op_type == "Mul" and producer[scaled.input[0]].op_type == "MatMul"
        assert all(producer[name].op_type != "Mul" for name in producer[scaled.input[0]].input)  # Q and K unscaled
    assert sum(n.op_type == "Sqrt" for n in model.graph.node) == roots - 2 * softmaxes  # the scale's two square roots go
    after = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected, got = before.run(None, feeds)[0], after.run(None, feeds)[0]
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


def test_the_openvino_unet_keeps_the_scale_out_of_the_q_projections(exported_tiny_sd):
    """Converted as exported, OpenVINO fused a product into both the Q and the K projection of every attention; with
    the scale on the scores only K keeps one (as in Optimum Intel's IR, converted from the PyTorch module)."""
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(exported_tiny_sd / "unet" / "openvino_model.xml"))
    width = model.input("encoder_hidden_states").get_partial_shape()[2].get_length()
    model.reshape({"sample": [2, 4, 8, 8], "timestep": [2], "encoder_hidden_states": [2, 77, width]})
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    projections = [op.get_rt_info()["originalLayersNames"].astype(str) for op in compiled.get_runtime_model().get_ordered_ops()
                   if op.get_rt_info()["layerType"].astype(str) == "FullyConnected"]
    queries = [names for names in projections if "/to_q/" in names]
    assert queries, projections
    assert not [names for names in queries if "Multiply" in names], queries
