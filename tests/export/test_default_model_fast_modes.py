"""The default model's fast modes draw what the prompt says: int8, guidance cutoff, deep cache.

The bundled folder (`leansd/bundled/shapes`) holds fp32 files only, so these modes need an export of the
model's weights (`models/shapes/weights`) with int8 variants and the deep-cache UNet parts, made here once per
module as the model card's fast-mode table was (`sd-export models/shapes/weights ... --backend onnx --precision
fp32,int8 --deep-cache`). ONNX only: that table was measured on onnxruntime, and the ONNX-only export takes
about a third of the time of one for both backends (17 s against 60 s on 2 busy cores).

Each mode draws the eight cases of `tests/runtime/test_default_model.py` (the evaluator's own seeds) through
the public API, and passes with at most one wrong image (colour, shape and background judged together); the
model card measured every one of these modes at 168 of 168 whole images, see that module's docstring for how
the bar follows from it. Each mode must also change the picture against the mode it differs from by one
setting (int8 against fp32, deep cache 3 against the cutoff alone, 5 against 3...), so that a setting that is
silently ignored cannot pass.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import needs_torch
from tests.runtime.test_default_model import CARD_SETTINGS, CASES, MAX_WRONG, REPO, draw

WEIGHTS = REPO / "models" / "shapes" / "weights"

pytestmark = [
    needs_torch,
    pytest.mark.slow,
    pytest.mark.skipif(not (WEIGHTS / "model_index.json").is_file(), reason="the shapes model's weights are not in this checkout"),
]

# name: (load() keywords, the mode it differs from by one setting). "exact" and "cutoff 0.3" are the references;
# the bundled model's own test checks them too, on both backends.
MODES = {
    "exact": ({}, None),
    "cutoff 0.3": ({"guidance_cutoff": 0.3}, "exact"),
    "int8": ({"precision": "int8"}, "exact"),
    "cutoff 0.3 + deep cache 3": ({"guidance_cutoff": 0.3, "deep_cache": 3}, "cutoff 0.3"),
    "int8 + cutoff 0.3 + deep cache 3": ({"precision": "int8", "guidance_cutoff": 0.3, "deep_cache": 3}, "cutoff 0.3 + deep cache 3"),
    "int8 + cutoff 0.3 + deep cache 5": ({"precision": "int8", "guidance_cutoff": 0.3, "deep_cache": 5}, "int8 + cutoff 0.3 + deep cache 3"),
}


@pytest.fixture(scope="module")
def shapes_fast(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shapes model exported for onnxruntime with int8 variants and the deep-cache UNet parts."""
    from tests.export.fixtures import _export

    return _export(WEIGHTS, tmp_path_factory.mktemp("shapes") / "shapes-fast", backends="onnx",
                   precisions=("fp32", "int8"), deep_cache=True)


@pytest.fixture(scope="module")
def drawn(shapes_fast: Path):
    """mode -> (images, wrong images), each mode drawn once per module."""
    import leansd

    done: dict[str, tuple[list[np.ndarray], list[str]]] = {}

    def get(mode: str):
        if mode not in done:
            # An export has no generation defaults (the bundled folder's come from bundle_default.py): the card's.
            steps, guidance = CARD_SETTINGS
            pipe = leansd.load(shapes_fast, backend="onnxruntime", num_inference_steps=steps, guidance_scale=guidance,
                               **MODES[mode][0])
            done[mode] = draw(pipe)
        return done[mode]

    return get


def test_export_has_the_fast_parts(shapes_fast):
    import json

    components = json.loads((shapes_fast / "leansd.json").read_text())["components"]
    for name in ("text_encoder", "unet", "unet_deep", "unet_shallow", "vae_decoder"):
        assert set(components[name]["onnx"]) == {"fp32", "int8"}, name


@pytest.mark.parametrize("mode", list(MODES))
def test_mode_draws_the_prompt(drawn, mode):
    images, wrong = drawn(mode)
    assert len(wrong) <= MAX_WRONG, f"onnxruntime {mode}: {len(wrong)} of {len(CASES)} images wrong: {wrong}"
    base = MODES[mode][1]
    if base is not None:
        changed = sum(not np.array_equal(a, b) for a, b in zip(images, drawn(base)[0]))
        assert changed, f"{mode} gives exactly the images of {base}: is the setting ignored?"
