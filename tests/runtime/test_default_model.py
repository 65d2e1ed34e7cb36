"""The bundled default model: loads with no arguments, and draws what the prompt says.

A small accuracy check through the public API and the CLI, with the model card's evaluator classifying the
pixels. Seeds are fixed, from the evaluator's range (never used in training).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import leansd
from leansd.runtime.pipeline import bundled_model_path

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(
    not (bundled_model_path() / "leansd.json").is_file(), reason="the bundled default model is not in this checkout"
)

CASES = [
    ("red", "circle", "blue"),
    ("yellow", "triangle", "purple"),
    ("white", "square", "black"),
    ("green", "circle", "orange"),
    ("blue", "square", "yellow"),
    ("black", "triangle", "white"),
]


@pytest.fixture(scope="module")
def classify():
    sys.path.insert(0, str(REPO / "models" / "shapes"))
    try:
        from evaluate import classify as fn
    finally:
        sys.path.pop(0)
    return fn


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_default_model_draws_the_prompt(backend, classify):
    pipe = leansd.load(backend=backend)
    assert pipe.bundle.name == "leansd-shapes"
    hits = {"background": 0, "colour": 0, "shape": 0}
    for k, (colour, shape, background) in enumerate(CASES):
        out = pipe(f"a {colour} {shape} on a {background} background", seed=1_000_000 + k, output_type="np")
        img = (out.images[0] * 255).round().astype(np.uint8)
        got = classify(img)
        hits["background"] += got["background"] == background
        hits["colour"] += got["colour"] == colour
        hits["shape"] += got["shape"] == shape
    # The model card reports >= 95 % / 95 % / 90 % over 480 pairs; allow one miss per attribute in six.
    assert all(v >= len(CASES) - 1 for v in hits.values()), hits


def test_sd_run_without_model_argument(tmp_path, classify):
    result = subprocess.run(
        [sys.executable, "-m", "leansd.runtime.cli", "a red circle on a blue background", "--seed", "1000001", "-o", "x.png", "-q"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    with Image.open(tmp_path / "x.png") as img:
        assert "Model: leansd-shapes" in img.text["parameters"]
        got = classify(np.asarray(img.convert("RGB")))
    assert (got["background"], got["colour"]) == ("blue", "red")
