"""Fast checks of the exporter's small parts: parity metrics, the atomic folder, argument parsing."""
from __future__ import annotations

import math

import numpy as np
import pytest

from leansd.export import ExportError, ParityError
from leansd.export.exporter import parse_backends, parse_static, parse_tolerance
from leansd.export.layout import StagingFolder
from leansd.export.verify import measure


def test_measure_is_relative_to_the_output_magnitude():
    p = measure({"a": np.array([2.0, -40.0])}, {"a": np.array([2.0, -40.01])}, 1e-3)
    assert math.isclose(p.max_abs, 0.01, rel_tol=1e-3) and math.isclose(p.max_rel, 0.01 / 40, rel_tol=1e-3)
    assert p.passed and 60 < p.psnr_db < 80


def test_measure_fails_nan_and_caps_exact_psnr():
    assert not measure({"a": np.ones(3)}, {"a": np.array([1.0, np.nan, 1.0])}, 1.0).passed
    assert measure({"a": np.ones(3)}, {"a": np.ones(3)}, 0.0).psnr_db == 200.0
    with pytest.raises(ParityError, match="no output 'a'"):
        measure({"a": np.ones(3)}, {"b": np.ones(3)}, 1.0)


def test_staging_folder_commits_or_vanishes(tmp_path):
    target = tmp_path / "model"
    with pytest.raises(RuntimeError):
        with StagingFolder(target) as staging:
            (staging.path / "half.onnx").write_text("x")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []
    with StagingFolder(target) as staging:
        (staging.path / "a.txt").write_text("new")
        staging.commit()
    assert (target / "a.txt").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["model"]
    with pytest.raises(ExportError, match="--overwrite"):
        StagingFolder(target)
    with StagingFolder(target, overwrite=True) as staging:
        (staging.path / "b.txt").write_text("newer")
        staging.commit()
    assert [p.name for p in target.iterdir()] == ["b.txt"] and [p.name for p in tmp_path.iterdir()] == ["model"]


def test_argument_parsing():
    assert parse_backends("all") == ("onnx", "openvino") and parse_backends(["openvino"]) == ("openvino",)
    with pytest.raises(ExportError, match="unknown backend 'tensorrt'"):
        parse_backends("tensorrt")
    assert parse_tolerance({"unet": 2e-3})["unet"] == 2e-3 and parse_tolerance(None)["vae_decoder"] == 1e-3
    with pytest.raises(ExportError, match="unknown component 'vae'"):
        parse_tolerance({"vae": 1.0})
    with pytest.raises(ExportError, match=">= 0"):
        parse_tolerance(-1.0)


def test_static_shapes_default_and_check():
    class Info:
        vae_scale_factor, default_size = 8, 512

    assert parse_static(None, Info) is None
    assert parse_static({"batch": 2}, Info) == {"height": 512, "width": 512, "batch": 2}
    with pytest.raises(ExportError, match="--width 500 is not a positive multiple of 8.*use 496 or 504"):
        parse_static({"width": 500}, Info)


def test_samples_stay_at_most_64_latents(tmp_path):
    """SDXL (128x128 latents) is traced and checked at 64x64, SD 1.x at its own 64x64, tiny models at their size;
    the UNet's trace size stays off a multiple of its upsampling factor."""
    from leansd.export import components as comp
    from leansd.export.exporter import _verification_inputs

    def info(sample_size: int, ups: int):
        unet = {"up_block_types": ["UpBlock2D"] * (ups + 1), "cross_attention_dim": 8, "sample_size": sample_size}
        return comp.ModelInfo.from_configs(unet, {"block_out_channels": [4] * 4}, {"hidden_size": 8, "vocab_size": 100})

    for sample_size, ups, side, unet_trace in ((128, 2, 64, 63), (64, 3, 64, 63), (16, 1, 16, 15), (96, 3, 64, 63)):
        model = info(sample_size, ups)
        assert model.sample_latent_side == side and model.default_size == sample_size * 8
        assert comp.trace_size("vae_decoder", model) == (side * 8, side * 8)
        assert comp.trace_size("unet", model) == (unet_trace * 8, unet_trace * 8) and unet_trace % 2**ups
        assert _verification_inputs("unet", model, None)["sample"].shape[2:] == (side, side)


def test_default_parts_follow_the_weight_size(tmp_path, monkeypatch):
    """No parts for weights inside the file, 8 for SD 1.5-size external weights, more past 8 x PART_BYTES."""
    onnx = pytest.importorskip("onnx")
    from onnx import helper, numpy_helper

    from leansd.export import streaming

    weights = [numpy_helper.from_array(np.full((256,), i, np.float32), f"w{i}") for i in range(3)]  # 1 KiB each
    nodes = [helper.make_node("Add", ["x", "w0"], ["y0"]), helper.make_node("Add", ["y0", "w1"], ["y1"]),
             helper.make_node("Add", ["y1", "w2"], ["y"])]
    value = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [256])
    out = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [256])
    model = helper.make_model(helper.make_graph(nodes, "g", [value], [out], weights))
    onnx.save_model(model, str(tmp_path / "inline.onnx"))
    onnx.save_model(model, str(tmp_path / "external.onnx"), save_as_external_data=True, location="external.onnx_data", size_threshold=0)
    assert streaming.default_parts(tmp_path / "inline.onnx") == 0
    assert streaming.external_bytes(tmp_path / "external.onnx") == 3 * 1024
    assert streaming.default_parts(tmp_path / "external.onnx") == streaming.DEFAULT_PARTS
    monkeypatch.setattr(streaming, "PART_BYTES", 256)
    assert streaming.default_parts(tmp_path / "external.onnx") == 12


def test_stage_lines_when_stderr_is_a_file(capsys):
    """Redirected to a file, the export logs one line per stage with the elapsed time and the peak memory."""
    from leansd.export.progress import StageLines, bar

    log = bar(10, "sd-export", None)
    assert isinstance(log, StageLines)  # pytest's captured stderr is not a terminal
    log.set_postfix_str("unet: ONNX export")
    log.update()
    log.set_postfix_str("unet: verify ONNX")
    log.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and lines[0].endswith("] sd-export: unet: ONNX export") and lines[1].endswith("] sd-export: unet: verify ONNX")
    assert lines[0].startswith("[") and " s, peak " in lines[0] and " GB]" in lines[0]
    assert not isinstance(bar(10, "sd-export", False), StageLines)


def test_parts_spread_the_shortfall_instead_of_piling_it_on_the_last():
    """Ten equal weights in 4 parts: a fixed budget of 1/4 would leave 2, 2, 2, 4 (the last part twice the others);
    the budget recomputed over what is left gives 2, 2, 3, 3."""
    pytest.importorskip("onnx")
    from onnx import helper, numpy_helper

    from leansd.export.streaming import _assign

    weights = {f"w{i}": numpy_helper.from_array(np.zeros(7, np.float32), f"w{i}") for i in range(10)}
    nodes = [helper.make_node("Add", ["x", f"w{i}"], [f"y{i}"]) for i in range(10)]
    assignment = _assign(nodes, weights, 4)
    assert [assignment.count(p) for p in range(4)] == [2, 2, 3, 3] and assignment == sorted(assignment)
