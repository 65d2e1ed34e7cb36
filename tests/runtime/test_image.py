"""Image helpers: diffusers-compatible rounding, PNG metadata, atomic writes, init images of every kind."""
from __future__ import annotations

import os
import stat
import struct
import threading
import zlib

import numpy as np
import pytest
from PIL import Image

from leansd.runtime.errors import InvalidInputError
from leansd.runtime.image import (
    a1111_parameters,
    commit_file,
    decoded_to_unit,
    infotext_prompt,
    load_image,
    load_mask,
    mask_to_model_input,
    nearest_resize,
    save_png,
    stage_png,
    unit_to_pil,
)
from tests.cli.a1111_infotext import parse_generation_parameters


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


# ---------------------------------------------------------------- file modes and atomic writes


def test_new_png_gets_the_umask_mode_and_overwrite_keeps_the_files_mode(tmp_path):
    old = os.umask(0o027)
    try:
        save_png(Image.new("RGB", (4, 4)), tmp_path / "new.png")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new.png").stat().st_mode) == 0o640  # 0o666 & ~0o027, not mkstemp's 0o600
    kept = tmp_path / "kept.png"
    kept.write_bytes(b"old")
    kept.chmod(0o664)
    save_png(Image.new("RGB", (4, 4)), kept, overwrite=True)
    assert stat.S_IMODE(kept.stat().st_mode) == 0o664
    assert kept.read_bytes().startswith(b"\x89PNG")


def test_never_overwrite_is_atomic_two_writers_one_winner(tmp_path):
    """Both writers pass the existence check; committing is what decides, and only one commit succeeds."""
    target = tmp_path / "out.png"
    first = stage_png(Image.new("RGB", (4, 4), (255, 0, 0)), target)
    second = stage_png(Image.new("RGB", (4, 4), (0, 0, 255)), target)
    commit_file(first, target)
    with pytest.raises(InvalidInputError, match="already exists"):
        commit_file(second, target)
    with Image.open(target) as img:
        assert img.getpixel((0, 0)) == (255, 0, 0)  # the winner's file, untouched
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]  # both temp files are gone


def test_never_overwrite_under_real_threads(tmp_path):
    for round_ in range(20):
        target = tmp_path / f"race-{round_}.png"
        staged = [stage_png(Image.new("RGB", (4, 4), (k, 0, 0)), target) for k in range(4)]
        barrier, outcomes = threading.Barrier(len(staged)), []

        def commit(tmp, target=target, barrier=barrier, outcomes=outcomes):
            barrier.wait()
            try:
                commit_file(tmp, target)
                outcomes.append("won")
            except InvalidInputError:
                outcomes.append("refused")

        threads = [threading.Thread(target=commit, args=(tmp,)) for tmp in staged]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(outcomes) == ["refused"] * 3 + ["won"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"race-{k}.png" for k in range(20))


# ---------------------------------------------------------------- infotext


ADVERSARIAL_PROMPTS = [
    "a cat\nNegative prompt: a dog",
    "a cat\nSteps: 1, Sampler: Evil, CFG scale: 99, Seed: 1, Size: 8x8",
    "a cat\r\nNegative prompt: x\r\nSteps: 1, Sampler: Evil, CFG scale: 99, Seed: 1",
    "Negative prompt: a dog",
    "  Negative prompt: leading spaces do not hide it",
    "a cat\u2028Negative prompt: line separator\u2029Steps: 1, Sampler: a, Seed: 2",
    "a cat\x85Negative prompt: next-line\x0bSteps: 1\x0cSampler: b\x1cSeed: 3\x1e",
    "commas, colons: and \"quotes\", kept",
    "   \n\t  ",
    "",
    "(masterpiece:1.2), [blurry], <lora:x:0.5>",
    "Steps: 2, Sampler: Euler, CFG scale: 3, Seed: 4, Size: 64x64",
]
ODD_VALUES = {"Model": 'my, "model": v2\nSteps: 1', "Backend": "  padded  ", "VAE": "a\u2028b", "Empty": ""}


@pytest.mark.parametrize("prompt", ADVERSARIAL_PROMPTS)
@pytest.mark.parametrize("negative", [None, "blurry", "x\nSteps: 5, Sampler: Evil, Seed: 6", "Negative prompt: twice"])
def test_infotext_fields_always_parse_back(prompt, negative):
    settings = {"Steps": 20, "Sampler": "DPM++ 2M Karras", "CFG scale": 7.5, "Seed": 18446744073709551615,
                "Size": "64x64", **ODD_VALUES}
    text = a1111_parameters(prompt, negative, settings)
    parsed = parse_generation_parameters(text)
    assert parsed["Prompt"] == infotext_prompt(prompt)
    assert parsed["Negative prompt"] == (infotext_prompt(negative) if negative else "")
    assert "errors" not in parsed
    for key, value in settings.items():
        assert parsed[key] == str(value), key
    assert len(text.splitlines()) == 1 + bool(negative) + 1  # also splitlines()-based readers see three lines at most


def test_folded_prompt_keeps_the_text_encoders_tokens():
    """Folding whitespace, trimming and the lower-case "n" of a leading "Negative prompt:" change nothing CLIP sees."""
    from leansd.runtime.loader import bundled_model_path
    from leansd.runtime.tokenizer import ClipTokenizer

    tokenizer = ClipTokenizer.from_folder(bundled_model_path() / "tokenizer")
    for prompt in ADVERSARIAL_PROMPTS:
        if any(c in prompt for c in "\x1c\x1e"):  # control characters (not whitespace to CLIP) become spaces
            continue
        assert tokenizer.encode(infotext_prompt(prompt)) == tokenizer.encode(prompt), repr(prompt)
    assert infotext_prompt("Negative prompt: a dog") == "negative prompt: a dog"
    assert infotext_prompt("a\n\n cat\t") == "a cat"


# ---------------------------------------------------------------- init images


def test_unreadable_init_image(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(InvalidInputError, match="cannot read init image"):
        load_image(bad)
    with pytest.raises(InvalidInputError, match="does not exist"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(InvalidInputError, match=r"init image .* is a folder; pass the path of a PNG or JPEG file"):
        load_image(tmp_path)
    truncated = tmp_path / "truncated.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:60])
    with pytest.raises(InvalidInputError, match="cannot read init image"):
        load_image(truncated)


def test_16_bit_greyscale_png_is_scaled_to_8_bits(tmp_path):
    ramp = (np.arange(256, dtype=np.uint32).reshape(16, 16) * 257).astype(np.uint16)  # 0..65535
    Image.fromarray(ramp).save(tmp_path / "grey16.png")
    with Image.open(tmp_path / "grey16.png") as img:
        assert img.mode == "I;16"
    rgb = np.asarray(load_image(tmp_path / "grey16.png"))
    assert rgb.shape == (16, 16, 3)
    assert (rgb[..., 0] == np.arange(256).reshape(16, 16)).all() and (rgb[..., 0] == rgb[..., 2]).all()
    Image.fromarray(ramp).save(tmp_path / "grey16.pgm")  # Pillow opens 16-bit PGM as mode "I"
    assert (np.asarray(load_image(tmp_path / "grey16.pgm"))[..., 1] == np.arange(256).reshape(16, 16)).all()


def test_other_modes_convert_sensibly(tmp_path):
    la = Image.new("LA", (2, 1))
    la.putpixel((0, 0), (0, 0))  # fully transparent black: shows the (white) background
    la.putpixel((1, 0), (0, 255))  # opaque black
    assert np.asarray(load_image(la))[0].tolist() == [[255, 255, 255], [0, 0, 0]]
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0
    palette.save(tmp_path / "p.png")
    assert np.asarray(load_image(tmp_path / "p.png"))[0].tolist() == [[255, 255, 255], [255, 0, 0]]
    assert np.asarray(load_image(Image.new("CMYK", (1, 1), (0, 255, 255, 0))))[0, 0].tolist() == [255, 0, 0]
    assert np.asarray(load_image(Image.new("I", (1, 1), 65535)))[0, 0].tolist() == [255, 255, 255]
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert np.asarray(load_image(floats))[0, :, 0].tolist() == [0, 128, 255]  # [0, 1] floats -> 0..255
    assert np.asarray(load_image(Image.new("F", (1, 1), 200.0)))[0, 0, 0] == 200  # else already 0..255
    assert load_image(Image.new("1", (2, 2), 1)).mode == "RGB"


def test_exif_orientation_is_applied_like_diffusers_load_image(tmp_path):
    img = Image.new("RGB", (4, 2), (0, 0, 0))
    img.putpixel((0, 0), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img.save(tmp_path / "rotated.png", exif=exif)
    upright = load_image(tmp_path / "rotated.png")
    assert upright.size == (2, 4) and upright.getpixel((1, 0)) == (255, 0, 0)


def png_claiming_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 4)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [100_000, 10_000])  # past Pillow's error limit, and in its warning-only range
def test_decompression_bomb_is_refused_cleanly(tmp_path, side):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_claiming_size(side, side))
    with pytest.raises(InvalidInputError, match=r"init image .*bomb\.png is too large to open safely \(.*\); pass a smaller image"):
        load_image(bomb)


# ---------------------------------------------------------------- inpainting masks


def test_mask_grey_level_is_binarized_after_resizing():
    grey = Image.fromarray(np.array([[0, 127], [128, 255]], np.uint8), "L")
    assert mask_to_model_input(load_mask(grey), 2, 2)[0, 0].tolist() == [[0, 0], [1, 1]]
    rgb = Image.new("RGB", (4, 4), (255, 255, 255))
    assert mask_to_model_input(load_mask(rgb), 8, 6).shape == (1, 1, 6, 8)  # resized to the output size


def test_mask_with_transparency_is_its_alpha_channel(tmp_path):
    """alpha < 255 (partly transparent too) = repaint, whatever the colour; a fully opaque RGBA mask is read by its grey."""
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., 3] = [[0, 128, 255], [254, 255, 255]]
    rgba[0, 2, :3] = 255  # a white but opaque pixel is kept
    Image.fromarray(rgba, "RGBA").save(tmp_path / "holes.png")
    assert mask_to_model_input(load_mask(tmp_path / "holes.png"), 3, 2)[0, 0].tolist() == [[1, 1, 0], [1, 0, 0]]
    opaque = rgba.copy()
    opaque[..., 3] = 255
    assert mask_to_model_input(load_mask(Image.fromarray(opaque, "RGBA")), 3, 2)[0, 0].tolist() == [[0, 0, 1], [0, 0, 0]]
    palette = Image.fromarray(np.array([[0, 1], [1, 1]], np.uint8), "P")
    palette.info["transparency"] = 0  # palette index 0 is the transparent colour
    assert mask_to_model_input(load_mask(palette), 2, 2)[0, 0].tolist() == [[1, 0], [0, 0]]


def test_mask_arrays():
    assert load_mask(np.array([[0, 255]], np.uint8)).tolist() == [[[0.0, 1.0]]]  # uint8 is 0..255
    assert load_mask(np.ones((2, 3, 1), bool)).shape == (1, 2, 3)
    assert load_mask(np.zeros((4, 2, 3, 1), np.float32)).shape == (4, 2, 3)
    for bad in (np.zeros((2, 3, 3)), np.zeros(5), np.zeros((1, 2, 3, 2))):
        with pytest.raises(InvalidInputError, match="mask array has shape"):
            load_mask(bad)


def test_nearest_resize_picks_the_pixels_torch_interpolate_picks():
    """torch's rule: source index floor(i * float32(in / out)), clamped (values checked against torch 2.13)."""
    row = np.arange(7, dtype=np.float32)[None, None, :]
    assert nearest_resize(row, 1, 3)[0, 0].tolist() == [0, 2, 4]
    assert nearest_resize(row, 1, 10)[0, 0].tolist() == [0, 0, 1, 2, 2, 3, 4, 4, 5, 6]
    assert nearest_resize(row, 1, 14)[0, 0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6]


def test_unreadable_mask_names_the_mask(tmp_path):
    (tmp_path / "m.png").write_text("not a png")
    with pytest.raises(InvalidInputError, match="cannot read mask image .*m.png"):
        load_mask(tmp_path / "m.png")
    with pytest.raises(InvalidInputError, match="mask image .*missing.png does not exist"):
        load_mask(tmp_path / "missing.png")
