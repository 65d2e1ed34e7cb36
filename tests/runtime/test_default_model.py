"""The bundled default model: loads with no arguments, and draws what the prompt says.

A small accuracy check through the public API and the CLI, with the model card's evaluator
(`models/shapes/evaluate.py`) classifying the pixels. An image counts as right only when its background
colour, its shape's colour and its shape's kind are all right. Each case uses the seed the evaluator gives
its prompt (from 1,000,000: never used in training), so every image here is one of the model card's.

The pass bar, from the model card's whole-image accuracy ("all checked attributes" in
`models/shapes/eval/*/results.md`): fp32 335 of 336 on each backend; on onnxruntime every fast mode 168 of
168 (int8, guidance cutoff 0.3, cutoff with deep cache every 3 or 5 steps); OpenVINO int8 167 of 168. At 95 %
confidence (Clopper-Pearson) these put the miss rate per image below 1.4 % (1 in 336) and 1.8 % (0 in 168).
At a 2 % miss rate, two or more wrong images of `len(CASES)` = 8 happen 1.0 % of the time, while a bar of no
miss at all would fail 15 % of the time: hence at most `MAX_WRONG` = 1 wrong image per mode. What this rejects:
a model drawing one attribute at chance (<= 1/3 per image) passes 0.3 % of the time, one right half the time
3.5 %, and the card's broken mode (deep cache on every step, without the cutoff: 64.9 % whole images) 17 %. It
catches a broken runtime or mode, not a regression of a few percent: `evaluate.py` measures that.

`tests/export/test_default_model_fast_modes.py` runs the same check on the int8 and deep-cache modes, which
need an export of the model's weights (the bundled folder has fp32 files only).
"""
from __future__ import annotations

import functools
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import leansd
from leansd.runtime.loader import bundled_model_path

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(
    not (bundled_model_path() / "leansd.json").is_file(), reason="the bundled default model is not in this checkout"
)

# (shape, colour, background): each of the 8 colours once as the shape's and once as the background, every
# shape kind at least twice.
CASES = [
    ("circle", "red", "blue"),
    ("triangle", "yellow", "purple"),
    ("square", "white", "black"),
    ("circle", "green", "orange"),
    ("square", "blue", "yellow"),
    ("triangle", "black", "white"),
    ("square", "orange", "green"),
    ("circle", "purple", "red"),
]
MAX_WRONG = 1  # wrong images allowed per mode; see the module docstring
CARD_SETTINGS = (20, 7.5)  # the steps and guidance the model card measured with (the bundled folder's defaults)


@functools.cache
def shapes_module(name: str):
    """`models/shapes/<name>.py` (the model card's tools) as a module named `leansd_shapes_<name>`, a name no package
    uses; their folder goes on sys.path for the imports between them (evaluate_inpaint imports evaluate)."""
    folder = str(REPO / "models" / "shapes")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(f"leansd_shapes_{name}", REPO / "models" / "shapes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # registered before it runs, as an import does (dataclasses look themselves up)
    spec.loader.exec_module(module)
    return module


def evaluator():
    """`models/shapes/evaluate.py`, the model card's evaluator."""
    return shapes_module("evaluate")


def cases() -> list[dict]:
    """The evaluator's cases (prompt, seed, wanted attributes) for `CASES`."""
    evaluate = evaluator()
    by_want = {tuple(c["want"][a] for a in ("shape", "colour", "background")): c
               for c in evaluate.grammar_cases(1, evaluate.SEED_BASE)}
    return [by_want[case] for case in CASES]


def draw(pipe, **settings) -> tuple[list[np.ndarray], list[str]]:
    """Every case's image (HxWx3 uint8) from `pipe`, and a line for each image with a wrong attribute."""
    evaluate = evaluator()
    images, wrong = [], []
    for case in cases():
        out = pipe(case["prompt"], seed=case["seed"], output_type="np", **settings)
        assert (out.num_inference_steps, out.guidance_scale) == CARD_SETTINGS, "not the settings the card measured"
        img = evaluate.to_uint8(out.images[0])
        got = evaluate.classify(img)
        images.append(img)
        if any(got[a] != v for a, v in case["want"].items()):
            seen = {a: got[a] for a in case["want"]}
            wrong.append(f"{case['prompt']!r} seed {case['seed']}: got {seen}")
    return images, wrong


def test_cases_cover_the_grammar():
    assert len(cases()) == len(CASES) == 8
    assert {c for _, c, _ in CASES} == {b for _, _, b in CASES} == set(evaluator().PALETTE_NAMES)
    assert {s for s, _, _ in CASES} == {"circle", "square", "triangle"}


MODES = {"exact": {}, "guidance cutoff 0.3": {"guidance_cutoff": 0.3}}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_default_model_draws_the_prompt(backend, mode):
    pipe = leansd.load(backend=backend, **MODES[mode])
    assert pipe.bundle.name == "leansd-shapes"
    _, wrong = draw(pipe)
    assert len(wrong) <= MAX_WRONG, f"{backend} {mode}: {len(wrong)} of {len(CASES)} images wrong: {wrong}"


def test_sd_run_without_model_argument(tmp_path):
    case = cases()[0]
    result = subprocess.run(
        [sys.executable, "-m", "leansd.runtime.cli", case["prompt"], "--seed", str(case["seed"]), "-o", "x.png", "-q"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr
    with Image.open(tmp_path / "x.png") as img:
        assert "Model: leansd-shapes" in img.text["parameters"]
        got = evaluator().classify(np.asarray(img.convert("RGB")))
    assert {a: got[a] for a in case["want"]} == case["want"]
