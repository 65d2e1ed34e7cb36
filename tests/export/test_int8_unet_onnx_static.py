"""The ONNX UNet's static int8 recipe (`--int8-unet-onnx static`): calibrated QDQ int8 on the convolutions as well as
the matrix products, the form that uses VNNI and AMX; the default stays dynamic int8."""
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


def test_the_recipe_is_checked_and_large_unets_are_refused(tmp_path):
    assert q.check_onnx_unet_recipe("dynamic") == "dynamic" and q.check_onnx_unet_recipe("static") == "static"
    with pytest.raises(ExportError, match=r"ONNX int8 UNet recipe 'hybrid' is unknown: choose dynamic, static"):
        q.check_onnx_unet_recipe("hybrid")
    for name, size in (("big", 4 * q.LARGE_UNET_PARAMETERS), ("small", 4 * q.LARGE_UNET_PARAMETERS - 4)):
        (tmp_path / name / "unet").mkdir(parents=True)
        with open(tmp_path / name / "unet" / "model.onnx_data", "wb") as f:
            f.truncate(size)  # sparse: nothing is written
    with pytest.raises(ExportError, match="under 1 B parameters.*use --int8-unet-onnx dynamic"):
        q.check_onnx_unet_recipe("static", tmp_path / "big")
    assert q.check_onnx_unet_recipe("static", tmp_path / "small") == "static"
    assert q.check_onnx_unet_recipe("dynamic", tmp_path / "big") == "dynamic"


def test_only_the_static_recipe_calibrates_the_onnx_unet():
    assert q.calibrates(("onnx",), "weights", "static") and not q.calibrates(("onnx",), "weights", "dynamic")
    assert not q.calibrates(("openvino",), "weights", "static")  # an OpenVINO-only stage has no ONNX UNet
    assert "static QDQ" in q.method("unet", "onnx", onnx_recipe="static")
    assert "dynamic" in q.method("text_encoder", "onnx", onnx_recipe="static")  # only the UNet changes recipe


@needs_torch
def test_an_unknown_onnx_recipe_is_refused_before_exporting(tmp_path, tiny_sd_dir):
    from leansd.export import export_model

    with pytest.raises(ExportError, match="ONNX int8 UNet recipe 'qdq' is unknown"):
        export_model(tiny_sd_dir, tmp_path / "out", precisions="fp32,int8", int8_unet_onnx="qdq", progress=False)
    assert not (tmp_path / "out").exists()
    done = subprocess.run([sys.executable, "-m", "leansd.export.int8", str(tmp_path), "--int8-unet-onnx", "qdq"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "invalid choice: 'qdq'" in done.stderr


@pytest.fixture(scope="module")
def static_int8(tiny_sd_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model exported for ONNX in fp32 with two UNet parts, then given int8 in place with the static recipe.
    --force-int8 keeps a part that lands near its gate on some CPU from failing the fixture; the figures are
    asserted below."""
    from tests.export.fixtures import _export

    root = tmp_path_factory.mktemp("int8-static")
    folder = shutil.copytree(_export(tiny_sd_dir, root / "fp32", backends="onnx", unet_parts=2), root / "model")
    done = subprocess.run([sys.executable, "-m", "leansd.export.int8", str(folder), "--backend", "onnx",
                           "--int8-unet-onnx", "static", "--force-int8", "--quiet"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return folder


def _producers(model) -> dict[str, str]:
    return {out: node.op_type for node in model.graph.node for out in node.output}


@needs_torch
@pytest.mark.slow
def test_static_unet_is_calibrated_recorded_and_quantizes_convolutions(static_int8):
    import onnx

    m = json.loads((static_int8 / "leansd.json").read_text())
    assert m["int8"]["onnx_unet_recipe"] == "static" and m["int8"]["unet_calibration_calls"] > 0
    unet = m["parity"]["unet"]["onnx"]["int8"]
    assert "static QDQ" in unet["method"] and unet["passed"] == (unet["psnr_db"] >= q.GATES["unet"].min_psnr_db)
    # Broken ranges or saturated products land far below this (a few dB); the recipe measured 25-30 dB.
    assert 20 < unet["psnr_db"] < 60, unet  # quantized (not fp32's 100+ dB), and close
    assert "dynamic" in m["parity"]["text_encoder"]["onnx"]["int8"]["method"]

    model = onnx.load(str(static_int8 / "unet" / "model_int8.onnx"), load_external_data=False)
    made_by = _producers(model)
    quantized = {n.name: made_by.get(n.input[0]) == made_by.get(n.input[1]) == "DequantizeLinear"
                 for n in model.graph.node if n.op_type == "Conv"}
    ends = {name for name in quantized if "conv_in" in name or "conv_out" in name}
    assert len(ends) == 2 and not any(quantized[name] for name in ends)  # the latents in and the noise out stay float
    assert len(quantized) > 2 and all(q for name, q in quantized.items() if name not in ends)
    # Quantized from the graph with fused attention (written with the UNet's parts): the attention's products of two
    # activations stay inside onnxruntime's float attention operator; the weighted MatMuls are quantized.
    attention = [n for n in model.graph.node if n.domain == "com.microsoft" and "Attention" in n.op_type]
    assert attention and not [n for n in model.graph.node if n.op_type.startswith("QAttention")]
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    assert any(made_by.get(n.input[1]) == "DequantizeLinear" for n in matmuls)
    assert m["components"]["unet_parts"]["onnx"]["int8"] == "unet/model_int8.parts.json"


@needs_torch
@pytest.mark.slow
def test_static_unet_generates_close_to_fp32_and_streams_the_same(static_int8):
    import leansd

    def generate(precision: str, **options) -> np.ndarray:
        pipe = leansd.load(static_int8, backend="onnxruntime", precision=precision, **options)
        try:
            return pipe("a lighthouse on a cliff", num_inference_steps=6, seed=11, output_type="np").images
        finally:
            pipe.close()

    fp32 = generate("fp32")
    # Low memory runs the int8 file cut into parts, one at a time. Its int8 kernels round differently from the whole
    # file's (ONNX Runtime fuses a quantized convolution only when its quantize/dequantize pair is in one part), so
    # like the parts' own check at export it is held to fp32, not to the whole int8 file.
    for options in ({}, {"low_memory": True}):
        diff = np.abs(generate("int8", **options) - fp32)
        psnr = 20 * np.log10(1.0 / np.sqrt(np.mean(diff**2)))
        assert diff.max() > 0 and psnr > 25, (options, psnr)  # int8 ran (not bit-equal), and the image stayed close


@needs_torch
def test_without_streaming_parts_the_recipe_quantizes_a_temporary_fused_graph(exported_tiny_sd):
    """An export without the UNet's parts has no fused graph: the recipe writes one beside the plain graph for the
    quantizer (so calibration never holds attention scores) and removes it afterwards. It computes what the plain
    graph does."""
    import onnx
    import onnxruntime as ort

    src = exported_tiny_sd / "unet" / "model.onnx"
    assert not src.with_name("model.fused.onnx").exists()
    before = sorted(p.name for p in src.parent.iterdir())
    with q._static_source(src) as source:
        assert source != src and source.parent == src.parent
        graph = onnx.load(str(source), load_external_data=False).graph
        assert any(n.domain == "com.microsoft" and n.op_type == "MultiHeadAttention" for n in graph.node)
        feeds = {"sample": np.random.default_rng(0).standard_normal((2, 4, 8, 8), dtype=np.float32),
                 "timestep": np.array([500, 500], dtype=_timestep_dtype(src)),
                 "encoder_hidden_states": np.random.default_rng(1).standard_normal((2, 77, 32), dtype=np.float32)}
        got, want = (ort.InferenceSession(str(f), providers=["CPUExecutionProvider"]).run(None, feeds)[0] for f in (source, src))
    assert float(np.abs(got - want).max()) <= 1e-4
    assert sorted(p.name for p in src.parent.iterdir()) == before  # the temporary graph is gone


def _timestep_dtype(path: Path) -> np.dtype:
    import onnxruntime as ort

    kind = next(i.type for i in ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs() if i.name == "timestep")
    return np.dtype(np.int64 if "int64" in kind else np.float32)


def _unet_inputs(batch: int, timesteps: int, seed: int, path: Path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"sample": rng.standard_normal((batch, 4, 8, 8), dtype=np.float32),
            "timestep": np.full(timesteps, 100 + 300 * seed, dtype=_timestep_dtype(path)),
            "encoder_hidden_states": rng.standard_normal((batch, 77, 32), dtype=np.float32)}


@needs_torch
def test_calibrating_one_image_at_a_time_gives_onnxruntimes_own_ranges(exported_tiny_sd, tmp_path):
    """The recipe calibrates each guided call's halves apart, its calibrator's model copy dropped; the ranges it
    writes are those onnxruntime's calibrator computes over the whole calls in one go."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator, load_tensors_data

    from leansd.export import quantize_static as qs

    src = exported_tiny_sd / "unet" / "model.onnx"
    calls = [_unet_inputs(2, 1, 0, src), _unet_inputs(2, 2, 1, src), _unet_inputs(2, 1, 2, src)]
    feeds = qs.one_image_feeds(src, calls)
    assert len(feeds) == 6 and all(len(f["sample"]) == 1 and len(f["encoder_hidden_states"]) == 1 for f in feeds)
    assert [len(f["timestep"]) for f in feeds] == [1] * 6  # a shared timestep stays whole, a per-image one is cut
    np.testing.assert_array_equal(feeds[3]["sample"][0], calls[1]["sample"][1])
    qs.write_activation_ranges(src, feeds, tmp_path / "ranges.json", tmp_path)
    mine = load_tensors_data(tmp_path / "ranges.json").data

    whole = create_calibrator(src, qs.QUANTIZED_OPS, augmented_model_path=str(tmp_path / "whole.onnx"),
                              calibrate_method=CalibrationMethod.MinMax, use_external_data_format=True)
    whole.collect_data(qs._Reader(calls))
    theirs = whole.compute_data().data
    assert mine.keys() == theirs.keys() and len(mine) > 50
    for name, ranges in theirs.items():
        np.testing.assert_allclose(np.ravel(mine[name].range_value), np.ravel(ranges.range_value), rtol=1e-5, atol=1e-5,
                                   err_msg=name)


def test_a_static_exports_fixed_batch_is_calibrated_whole(tmp_path):
    """A static export's UNet takes only its own batch: its calls go to the calibrator uncut."""
    import onnx
    from onnx import TensorProto, helper

    from leansd.export import quantize_static as qs

    graph = helper.make_graph([helper.make_node("Identity", ["sample"], ["out"])], "fixed",
                              [helper.make_tensor_value_info("sample", TensorProto.FLOAT, [2, 4, 8, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 4, 8, 8])])
    onnx.save(helper.make_model(graph), tmp_path / "model.onnx")
    calls = [{"sample": np.zeros((2, 4, 8, 8), np.float32)}] * 3
    feeds = qs.one_image_feeds(tmp_path / "model.onnx", calls)
    assert len(feeds) == 3 and all(mine["sample"] is theirs["sample"] for mine, theirs in zip(feeds, calls))
