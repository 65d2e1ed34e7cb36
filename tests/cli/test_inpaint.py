"""`sd-run --init-image IMAGE --mask MASK`: inpainting from the command line, and its one-line errors."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from leansd.runtime.loader import bundled_model_path
from tests.cli.helpers import assert_clean_error, sd_run

bundled = pytest.mark.skipif(not (bundled_model_path() / "leansd.json").is_file(), reason="the bundled default model is not in this checkout")


@pytest.fixture(scope="module")
def first(tmp_path_factory) -> tuple:
    """A red circle on blue drawn by sd-run, and a mask of the circle's bounding box: (folder, judge module, case, mask)."""
    from tests.runtime.test_default_model_inpaint import cases, inpaint_eval

    folder = tmp_path_factory.mktemp("inpaint-cli")
    case = cases()[0]  # a red circle on a blue background -> yellow
    assert (case["colour"], case["shape"], case["background"], case["new"]) == ("red", "circle", "blue", "yellow")
    result = sd_run("a red circle on a blue background", "--seed", str(case["seed"]), "-o", "first.png", "-q", cwd=folder)
    assert result.returncode == 0, result.stderr
    ev = inpaint_eval()
    mask = ev.shape_mask(np.asarray(Image.open(folder / "first.png").convert("RGB")), "blue")
    Image.fromarray((mask * 255).astype(np.uint8), "L").save(folder / "mask.png")
    return folder, ev, case, mask


@bundled
def test_inpaint_recolours_the_circle(first):
    folder, ev, case, mask = first
    result = sd_run("a yellow circle on a blue background", "--init-image", "first.png", "--mask", "mask.png",
                    "--seed", str(case["seed"]), "-o", "yellow.png", "-q", cwd=folder)
    assert result.returncode == 0 and result.stdout.strip() == "yellow.png", result.stderr
    with Image.open(folder / "yellow.png") as img:
        assert "Denoising strength: 1.0" in img.text["parameters"]
        image = np.asarray(img.convert("RGB"))
    verdict = ev.judge(image, mask, case)
    assert verdict["right"], verdict


@bundled
def test_transparent_init_image_is_its_own_mask(first):
    """The circle erased (alpha 0) from the picture, passed as both image and mask, is the picture laid over white
    (as any transparent init image) with the erased part as the mask: the same PNG pixels."""
    folder, _, case, mask = first
    rgb = np.asarray(Image.open(folder / "first.png").convert("RGB"))
    Image.fromarray(np.dstack([rgb, np.where(mask > 0, 0, 255).astype(np.uint8)]), "RGBA").save(folder / "erased.png")
    Image.fromarray(np.where(mask[..., None] > 0, 255, rgb).astype(np.uint8)).save(folder / "flat.png")
    common = ("a yellow circle on a blue background", "--seed", str(case["seed"]), "--steps", "6", "-q")
    for name, image, mask_file in (("by-alpha.png", "erased.png", "erased.png"), ("by-mask.png", "flat.png", "mask.png")):
        result = sd_run(*common, "--init-image", image, "--mask", mask_file, "-o", name, cwd=folder)
        assert result.returncode == 0, result.stderr
    a, b = (np.asarray(Image.open(folder / n).convert("RGB")) for n in ("by-alpha.png", "by-mask.png"))
    assert np.array_equal(a, b)


def test_mask_errors_are_one_line(tmp_path, cli_model):
    Image.new("RGB", (64, 64), "grey").save(tmp_path / "in.png")
    (tmp_path / "broken.png").write_text("not a png")
    args = ("a cat", "--model", str(cli_model), "--steps", "2", "-o", "out.png")
    assert_clean_error(sd_run(*args, "--init-image", "in.png", "--mask", "missing.png", cwd=tmp_path),
                       "mask image missing.png does not exist; pass the path of a PNG or JPEG file")
    assert_clean_error(sd_run(*args, "--init-image", "in.png", "--mask", "broken.png", cwd=tmp_path), "cannot read mask image broken.png")
    assert_clean_error(sd_run(*args, "--mask", "in.png", cwd=tmp_path), "--mask needs --init-image")
    assert not (tmp_path / "out.png").exists()


def test_a_mask_of_another_shape_is_stretched_with_a_warning(tmp_path, cli_model):
    Image.new("RGB", (64, 64), "grey").save(tmp_path / "in.png")
    Image.new("L", (64, 32), 255).save(tmp_path / "wide.png")
    Image.new("L", (32, 32), 255).save(tmp_path / "half.png")
    args = ("a cat", "--model", str(cli_model), "--steps", "2", "--init-image", "in.png", "-q")
    result = sd_run(*args, "--mask", "wide.png", "-o", "a.png", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.strip().splitlines()
    warning = ("sd-run: warning: the mask is 64x32 and the output 64x64: the mask is stretched to the output size; "
               "pass a mask of the image's shape")
    assert lines == [warning], result.stderr
    result = sd_run(*args, "--mask", "half.png", "-o", "b.png", cwd=tmp_path)  # same shape, other size: resized quietly
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_inpainting_model_without_a_mask(tmp_path, exported_tiny_sd_inpaint):
    result = sd_run("a cat", "--model", str(exported_tiny_sd_inpaint), "--steps", "2", "-o", "out.png", cwd=tmp_path)
    assert_clean_error(result, "is an inpainting model", "sd-run --init-image IMAGE --mask MASK")
    Image.new("RGB", (32, 32), "grey").save(tmp_path / "in.png")
    Image.new("L", (32, 32), 255).save(tmp_path / "mask.png")
    result = sd_run("a cat", "--model", str(exported_tiny_sd_inpaint), "--steps", "2", "--init-image", "in.png", "--mask", "mask.png",
                    "-o", "out.png", "-q", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "out.png").size == (32, 32)
