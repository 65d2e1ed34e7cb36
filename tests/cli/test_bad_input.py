"""Every bad input gets a clear answer: exit status 2, one line naming the problem and the fix, no traceback, and no
file written or changed. Grouped by class: numbers, text, output files, preview, init images."""
from __future__ import annotations

import errno
import os
import stat

import pytest
from PIL import Image

from tests.cli.helpers import assert_clean_error, sd_run, snapshot
from tests.runtime.test_image import png_claiming_size

# ---------------------------------------------------------------- numbers, refused while parsing

WHOLE = "must be a whole number >= 1, got"
SEED = "must be a whole number from 0 to 18446744073709551615 (2**64-1), or -1 for a random seed, got"


@pytest.mark.parametrize("args, message", [
    (["--width", "0"], f"argument --width/--W: {WHOLE} '0'"),
    (["--width", "-64"], f"argument --width/--W: {WHOLE} '-64'"),
    (["--H", "0"], f"argument --height/--H: {WHOLE} '0'"),
    (["--width", "6.4"], f"argument --width/--W: {WHOLE} '6.4'"),
    (["--steps", "0"], f"argument --steps/--ddim_steps: {WHOLE} '0'"),
    (["-n", "0"], f"argument -n/--num-images/--n_samples: {WHOLE} '0'"),
    (["--n_iter", "0"], f"argument --n_iter: {WHOLE} '0'"),
    (["--guidance", "nan"], "argument --guidance/--scale: must be a number >= 0 (0 or 1 turn guidance off), got 'nan'"),
    (["--guidance", "inf"], "argument --guidance/--scale: must be a number >= 0 (0 or 1 turn guidance off), got 'inf'"),
    (["--guidance", "-1"], "argument --guidance/--scale: must be a number >= 0 (0 or 1 turn guidance off), got '-1'"),
    (["--scale", "seven"], "argument --guidance/--scale: must be a number >= 0 (0 or 1 turn guidance off), got 'seven'"),
    (["--strength", "2"], "argument --strength: must be a number in (0, 1], got '2'"),
    (["--strength", "0"], "argument --strength: must be a number in (0, 1], got '0'"),
    (["--strength", "nan"], "argument --strength: must be a number in (0, 1], got 'nan'"),
    (["--guidance-cutoff", "1.5"], "argument --guidance-cutoff: must be a number in [0, 1], got '1.5'"),
    (["--ddim_eta", "-0.1"], "argument --eta/--ddim_eta: must be a number >= 0, got '-0.1'"),
    (["--seed", "18446744073709551616"], f"argument --seed: {SEED} '18446744073709551616'"),
    (["--seed", "-2"], f"argument --seed: {SEED} '-2'"),
    (["--seed", "1e3"], f"argument --seed: {SEED} '1e3'"),
    (["--threads", "0"], f"argument --threads: {WHOLE} '0'"),
    (["--deep-cache", "0"], f"argument --deep-cache: {WHOLE} '0'"),
])
def test_numbers_out_of_range_are_refused_while_parsing(tmp_path, args, message):
    result = sd_run("a cat", *args, "-o", "out.png", cwd=tmp_path)
    assert assert_clean_error(result) == f"sd-run: error: {message}"
    assert snapshot(tmp_path) == {}


def test_seed_past_the_range_with_n_iter_is_refused(tmp_path):
    result = sd_run("a cat", "--seed", "18446744073709551615", "--n_iter", "2", "-o", "out.png", cwd=tmp_path)
    assert_clean_error(result, "--seed 18446744073709551615 with --n_iter 2 would go past the largest seed 2**64-1; pass a smaller --seed")


@pytest.mark.parametrize("guidance", ["0", "1"])
def test_guidance_0_and_1_mean_no_guidance(tmp_path, cli_model, guidance):
    result = sd_run("a cat", "--model", str(cli_model), "--steps", "1", "--seed", "3", "--guidance", guidance, "-o", "g.png", "-q", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    with Image.open(tmp_path / "g.png") as img:
        assert f"CFG scale: {float(guidance)}" in img.text["parameters"]


def test_seed_minus_one_is_random_and_recorded(tmp_path, cli_model):
    result = sd_run("a cat", "--model", str(cli_model), "--steps", "1", "--seed", "-1", "-q", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (name,) = [p.name for p in tmp_path.iterdir()]
    seed = name.removeprefix("leansd-").removesuffix(".png")
    assert result.stdout.strip() == name and 0 <= int(seed) < 2**32
    with Image.open(tmp_path / name) as img:
        assert f"Seed: {seed}," in img.text["parameters"]


def test_largest_seed_is_accepted(tmp_path, cli_model):
    result = sd_run("a cat", "--model", str(cli_model), "--steps", "1", "--seed", str(2**64 - 1), "-o", "s.png", "-q", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    with Image.open(tmp_path / "s.png") as img:
        assert "Seed: 18446744073709551615," in img.text["parameters"]


# ---------------------------------------------------------------- text


@pytest.mark.parametrize("args, argument", [
    ([b"\xff\xfe"], "argument prompt"),
    ([b"--prompt", b"caf\xe9"], "argument --prompt"),
    ([b"a cat", b"--negative-prompt", b"bl\xfcrry"], "argument --negative-prompt"),
])
def test_prompt_that_is_not_utf8_is_refused(tmp_path, args, argument):
    """The shell hands Python undecodable bytes as surrogate escapes; generating from U+FFFD stand-ins would spend
    the run on a prompt nobody wrote, so sd-run says which byte is wrong instead."""
    result = sd_run(*args, "-o", "out.png", cwd=tmp_path)
    line = assert_clean_error(result, f"{argument}: is not valid UTF-8 text (byte 0x", "pass the text as UTF-8")
    assert "at character" in line
    assert snapshot(tmp_path) == {}


def test_missing_or_doubled_prompt(tmp_path):
    assert_clean_error(sd_run("-o", "out.png", cwd=tmp_path), "no prompt; pass what to draw")
    assert_clean_error(sd_run("a cat", "--prompt", "a dog", cwd=tmp_path),
                       "the prompt is given twice; pass it either as the first argument or with --prompt")
    assert_clean_error(sd_run("a cat", "--bogus", cwd=tmp_path), "unrecognized arguments: --bogus")


def test_runtime_warnings_are_one_line_each(tmp_path, cli_model, monkeypatch, capsys):
    import logging
    import warnings

    from leansd.runtime import cli

    original = cli.generate

    def generate_with_warnings(*args, **kwargs):
        warnings.warn("the prompt is longer than\nthe text encoder takes")
        logging.getLogger("leansd.runtime.tokenizer").warning("a logged\nwarning")
        return original(*args, **kwargs)

    monkeypatch.setattr(cli, "generate", generate_with_warnings)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["a cat", "--model", str(cli_model), "--steps", "1", "-o", "w.png", "-q"]) == 0
    assert capsys.readouterr().err.splitlines() == ["sd-run: warning: the prompt is longer than the text encoder takes",
                                                    "sd-run: warning: a logged warning"]


# ---------------------------------------------------------------- output files


def test_unwritable_destinations_are_refused_before_generating(tmp_path):
    (tmp_path / "file.txt").write_text("a file")
    before = snapshot(tmp_path)
    assert_clean_error(sd_run("a cat", "-o", "/proc/x.png", cwd=tmp_path), "cannot write to folder /proc (", "choose another -o/--output")
    assert_clean_error(sd_run("a cat", "-o", "file.txt/x.png", cwd=tmp_path), "file.txt is a file, not a folder; choose another -o/--output")
    assert_clean_error(sd_run("a cat", "-o", "file.txt/sub/", cwd=tmp_path), "file.txt is a file, not a folder")
    assert_clean_error(sd_run("a cat", "-o", "nowhere/x.png", cwd=tmp_path), "folder nowhere does not exist; create it or choose another -o/--output")
    assert_clean_error(sd_run("a cat", "--outdir", "/proc/out", cwd=tmp_path), "cannot write to folder /proc (", "choose another --outdir")
    assert_clean_error(sd_run("a cat", "-o", "x.jpg", cwd=tmp_path), "output x.jpg must be a .png file or a folder")
    assert snapshot(tmp_path) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders (the /proc case covers root)")
def test_read_only_folder_is_refused_before_generating(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert_clean_error(sd_run("a cat", "-o", "locked/x.png", cwd=tmp_path), "cannot write to folder locked (Permission denied)")
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


def test_output_modes_follow_the_umask_and_overwrite_keeps_the_mode(tmp_path, cli_model):
    args = ("a cat", "--model", str(cli_model), "--steps", "1", "--seed", "1", "-q")
    assert sd_run(*args, "-o", "new.png", cwd=tmp_path, umask=0o027).returncode == 0
    assert stat.S_IMODE((tmp_path / "new.png").stat().st_mode) == 0o640
    (tmp_path / "old.png").write_bytes(b"old")
    (tmp_path / "old.png").chmod(0o664)
    assert sd_run(*args, "-o", "old.png", "--overwrite", cwd=tmp_path, umask=0o077).returncode == 0
    assert stat.S_IMODE((tmp_path / "old.png").stat().st_mode) == 0o664
    assert (tmp_path / "old.png").read_bytes().startswith(b"\x89PNG")


def test_output_taken_while_generating_is_kept_and_the_run_leaves_nothing(tmp_path, cli_model, monkeypatch, capsys):
    """Another writer finishes first: its file stays, and the image this run already placed is taken back."""
    from leansd.runtime import cli

    original = cli.generate

    def generate_then_someone_writes(*args, **kwargs):
        results = original(*args, **kwargs)
        (tmp_path / "out-2.png").write_bytes(b"theirs")
        return results

    monkeypatch.setattr(cli, "generate", generate_then_someone_writes)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["a cat", "--model", str(cli_model), "--steps", "1", "-n", "2", "-o", "out.png", "-q"]) == 2
    assert capsys.readouterr().err == "sd-run: error: out-2.png already exists; choose another --output or pass --overwrite\n"
    assert snapshot(tmp_path) == {"out-2.png": (b"theirs", 0o666 & ~_umask())}


def test_disk_full_while_writing_is_one_line_and_leaves_nothing(tmp_path, cli_model, monkeypatch, capsys):
    from leansd.runtime import cli, image

    real_save, calls = image.save_png, []

    def save_until_full(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(image, "save_png", save_until_full)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["a cat", "--model", str(cli_model), "--steps", "1", "-n", "2", "-o", "out/", "-q", "--seed", "5"]) == 2
    assert capsys.readouterr().err == ("sd-run: error: cannot write out/leansd-5-2.png (No space left on device); "
                                       "free some space or choose another -o/--output\n")
    assert snapshot(tmp_path) == {}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------- preview


def test_preview_is_not_an_output_and_needs_overwrite_to_replace_a_file(tmp_path, cli_model):
    (tmp_path / "keep.png").write_bytes(b"precious")
    before = snapshot(tmp_path)
    args = ("a cat", "--model", str(cli_model), "--steps", "2", "--seed", "1", "-q")
    assert_clean_error(sd_run(*args, "--preview", "keep.png", "-o", "out.png", cwd=tmp_path),
                       "--preview keep.png already exists; choose another --preview path or pass --overwrite")
    assert_clean_error(sd_run(*args, "--preview", "out.png", "-o", "out.png", cwd=tmp_path),
                       "--preview out.png is also an output file; choose another --preview path")
    assert_clean_error(sd_run(*args, "--preview", "./sub/../out.png", "-o", "out.png", "--overwrite", cwd=tmp_path),
                       "is also an output file")
    assert_clean_error(sd_run(*args, "--preview", "nowhere/p.png", "-o", "out.png", cwd=tmp_path),
                       "folder nowhere does not exist; create it or choose another --preview path")
    assert_clean_error(sd_run(*args, "--preview", "p.jpg", "-o", "out.png", cwd=tmp_path), "--preview p.jpg must be a .png file path")
    assert snapshot(tmp_path) == before
    (tmp_path / "keep.png").chmod(0o664)
    assert sd_run(*args, "--preview", "keep.png", "-o", "out.png", "--overwrite", cwd=tmp_path).returncode == 0
    with Image.open(tmp_path / "keep.png") as img:
        assert img.size == (64, 64)
    assert stat.S_IMODE((tmp_path / "keep.png").stat().st_mode) == 0o664


# ---------------------------------------------------------------- init images


def test_bad_init_images(tmp_path, cli_model):
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "bomb.png").write_bytes(png_claiming_size(100_000, 100_000))
    (tmp_path / "warn.png").write_bytes(png_claiming_size(10_000, 10_000))
    before = snapshot(tmp_path)
    args = ("a cat", "--model", str(cli_model), "-o", "out.png")
    assert_clean_error(sd_run(*args, "--init-image", "folder.png", cwd=tmp_path),
                       "init image folder.png is a folder; pass the path of a PNG or JPEG file")
    assert_clean_error(sd_run(*args, "--init-image", "missing.png", cwd=tmp_path), "init image missing.png does not exist")
    for name in ("bomb.png", "warn.png"):
        assert_clean_error(sd_run(*args, "--init-image", name, cwd=tmp_path),
                           f"init image {name} is too large to open safely (Image size (", "; pass a smaller image")
    assert snapshot(tmp_path) == before


def test_16_bit_greyscale_init_image(tmp_path, cli_model):
    import numpy as np

    Image.fromarray(np.full((64, 64), 32896, dtype=np.uint16)).save(tmp_path / "grey16.png")  # 50 % grey
    result = sd_run("a cat", "--model", str(cli_model), "--init-image", "grey16.png", "--strength", "0.3", "--steps", "4",
                    "--seed", "2", "-o", "out.png", "-q", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    with Image.open(tmp_path / "out.png") as img:
        assert np.asarray(img.convert("L")).mean() < 200  # not the white image a clipped conversion gave
