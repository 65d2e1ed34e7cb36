"""`sd-run` behaviour: exit codes, one-line errors, files written (and not written on failure)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from PIL import Image

from tests.cli.helpers import assert_clean_error, sd_run


def test_missing_model_folder(tmp_path):
    result = sd_run("a cat", "--model", str(tmp_path / "nowhere"), "-o", "cat.png", cwd=tmp_path)
    assert_clean_error(result, "does not exist")
    assert not (tmp_path / "cat.png").exists()


def test_strength_out_of_range(tmp_path, cli_model):
    (tmp_path / "in.png").write_bytes(b"")
    result = sd_run("a cat", "--model", str(cli_model), "--init-image", "in.png", "--strength", "1.5", cwd=tmp_path)
    assert_clean_error(result, "argument --strength: must be a number in (0, 1], got '1.5'")


def test_unreadable_init_image(tmp_path, cli_model):
    (tmp_path / "in.png").write_text("not a png")
    result = sd_run("a cat", "--model", str(cli_model), "--init-image", "in.png", "-o", "out.png", cwd=tmp_path)
    assert_clean_error(result, "cannot read init image")
    assert not (tmp_path / "out.png").exists()


def test_unknown_scheduler(tmp_path, cli_model):
    result = sd_run("a cat", "--model", str(cli_model), "--scheduler", "warp-drive", "-o", "out.png", cwd=tmp_path)
    assert_clean_error(result, "warp-drive")
    assert not (tmp_path / "out.png").exists()


def test_size_not_multiple_of_vae_factor(tmp_path, cli_model):
    result = sd_run("a cat", "--model", str(cli_model), "--width", "33", "--height", "32", "-o", "out.png", cwd=tmp_path)
    assert_clean_error(result, "width 33 is not a positive multiple of")
    assert not (tmp_path / "out.png").exists()


def test_existing_output_is_refused_and_kept(tmp_path, cli_model):
    (tmp_path / "out.png").write_bytes(b"precious")
    result = sd_run("a cat", "--model", str(cli_model), "-o", "out.png", "--steps", "2", cwd=tmp_path)
    assert_clean_error(result, "out.png already exists", "--overwrite")
    assert (tmp_path / "out.png").read_bytes() == b"precious"


def test_generates_png_with_parameters(tmp_path, cli_model):
    result = sd_run("a red circle on a blue background", "--model", str(cli_model), "--steps", "3", "--seed", "42",
                    "--negative-prompt", "blurry", "--scheduler", "euler_a", "-o", "out.png", "-q", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "out.png"
    with Image.open(tmp_path / "out.png") as img:
        text = img.text["parameters"]
        size = img.size
    lines = text.splitlines()
    assert lines[0] == "a red circle on a blue background"
    assert lines[1] == "Negative prompt: blurry"
    assert "Steps: 3" in lines[2] and "Sampler: Euler a" in lines[2] and "Seed: 42" in lines[2]
    assert f"Size: {size[0]}x{size[1]}" in lines[2] and "Model: " in lines[2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]


def test_several_images_into_a_folder(tmp_path, cli_model):
    result = sd_run("a cat", "--model", str(cli_model), "--steps", "2", "--seed", "5", "-n", "2", "-o", "cats/", "-q", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "cats").iterdir()) == ["leansd-5-1.png", "leansd-5-2.png"]


def test_console_script_is_installed():
    exe = shutil.which("sd-run") or str(Path(sys.executable).with_name("sd-run"))
    result = subprocess.run([exe, "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and "--init-image" in result.stdout


def test_cache_dir_is_filled_once_and_reused(tmp_path, cli_model):
    args = ("a red circle", "--model", str(cli_model), "--backend", "onnxruntime", "--steps", "2", "--seed", "1",
            "--cache-dir", "cache", "-q", "--overwrite")
    first = sd_run(*args, "-o", "first.png", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    entries = sorted((tmp_path / "cache" / "onnxruntime").iterdir())
    assert entries and all((e / "key.json").is_file() for e in entries)
    written = [(e / "key.json").stat().st_mtime_ns for e in entries]
    second = sd_run(*args, "-o", "second.png", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert sorted((tmp_path / "cache" / "onnxruntime").iterdir()) == entries
    assert [(e / "key.json").stat().st_mtime_ns for e in entries] == written  # read, not rewritten
    assert (tmp_path / "first.png").read_bytes() == (tmp_path / "second.png").read_bytes()


def _stderr_on_a_terminal(args: list[str], cwd: Path) -> tuple[int, str]:
    """Run sd-run with stderr on a pseudo-terminal (stdout piped); its exit status and everything it wrote there."""
    import fcntl
    import os
    import pty
    import struct
    import termios

    leader, follower = pty.openpty()
    # A fresh pseudo-terminal is 0 columns wide, and tqdm draws nothing into that: make it an ordinary 120x40.
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    process = subprocess.Popen([sys.executable, "-m", "leansd.runtime.cli", *args], cwd=cwd, stdout=subprocess.PIPE,
                               stderr=follower, stdin=subprocess.DEVNULL)
    os.close(follower)
    written = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the terminal closes with the process
            break
        if not chunk:
            break
        written += chunk
    process.stdout.close()
    os.close(leader)
    return process.wait(timeout=300), written.decode(errors="replace")


def test_a_terminal_sees_the_preparing_line_before_the_steps(tmp_path, cli_model):
    """Models compile on first use (a minute or more on SDXL): a terminal is told so until the first step, then
    gets the step bar. Piped stderr, as every other test here reads it, gets no such line."""
    from leansd.runtime.run_progress import PREPARING

    args = ["a red circle", "--model", str(cli_model), "--steps", "3", "--seed", "1", "-o", "out.png"]
    status, terminal = _stderr_on_a_terminal(args, tmp_path)
    assert status == 0, terminal
    assert PREPARING in terminal and "0/3" in terminal, terminal  # the bar drawn when the first step is done
    assert terminal.index(PREPARING) < terminal.index("0/3")
    piped = sd_run(*args, "--overwrite", cwd=tmp_path)
    assert piped.returncode == 0 and PREPARING not in piped.stderr and "0/3" in piped.stderr, piped.stderr
    failed_status, failed = _stderr_on_a_terminal([*args[:-2], "--scheduler", "nope", "-o", "other.png"], tmp_path)
    # The unknown scheduler is found inside the pipeline call, after the line was drawn: it is cleared before the error.
    assert failed_status == 2 and PREPARING in failed and not (tmp_path / "other.png").exists(), failed
    assert failed.split("\r")[-2].startswith("sd-run: error: unknown scheduler"), failed
