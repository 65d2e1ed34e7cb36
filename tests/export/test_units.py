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
