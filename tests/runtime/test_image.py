"""Image helpers: diffusers-compatible rounding, PNG metadata, atomic writes."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from leansd.runtime.errors import InvalidInputError
from leansd.runtime.image import a1111_parameters, decoded_to_unit, load_image, save_png, unit_to_pil


def test_decode_range_and_rounding_follow_diffusers():
    decoded = np.array([-2.0, -1.0, 0.0, 0.999, 1.5], dtype=np.float32).reshape(1, 1, 1, 5).repeat(3, axis=1)
    unit = decoded_to_unit(decoded)
    assert unit.shape == (1, 1, 5, 3)
    np.testing.assert_allclose(unit[0, 0, :, 0], [0.0, 0.0, 0.5, 0.9995, 1.0])
    pil = np.asarray(unit_to_pil(unit)[0])
    assert pil[0, :, 0].tolist() == [0, 0, 128, 255, 255]  # 127.5 rounds half to even -> 128 in numpy, as in diffusers


def test_png_carries_parameters_and_refuses_to_overwrite(tmp_path):
    img = Image.new("RGB", (8, 8), (10, 20, 30))
    text = a1111_parameters("a cat", "blurry", {"Steps": 20, "Sampler": "Euler a", "Seed": 3, "Skipped": None})
    assert text == "a cat\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, Seed: 3"
    path = tmp_path / "out.png"
    save_png(img, path, text)
    with Image.open(path) as reread:
        assert reread.text["parameters"] == text
    with pytest.raises(InvalidInputError, match="already exists"):
        save_png(img, path, text)
    save_png(Image.new("RGB", (4, 4)), path, None, overwrite=True)
    with Image.open(path) as reread:
        assert reread.size == (4, 4)
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]  # no temp files left behind


def test_unreadable_init_image(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(InvalidInputError, match="cannot read init image"):
        load_image(bad)
    with pytest.raises(InvalidInputError, match="does not exist"):
        load_image(tmp_path / "missing.png")
