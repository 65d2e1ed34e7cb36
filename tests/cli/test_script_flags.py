"""The CompVis/Stability scripts/txt2img.py and img2img.py commands, run with sd-run and the bundled model: the
files they write (names, count, sizes, the grid), the seeds recorded, and each --n_iter iteration reproducible."""
from __future__ import annotations

import numpy as np
from PIL import Image

from tests.cli.a1111_infotext import parse_generation_parameters
from tests.cli.helpers import assert_clean_error, sd_run, snapshot

TXT2IMG = ("--prompt", "a red circle on a blue background", "--plms", "--ddim_steps", "4", "--n_samples", "2",
           "--n_iter", "2", "--H", "64", "--W", "64", "--seed", "42")


def files(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def info(path) -> dict:
    with Image.open(path) as img:
        return {"size": img.size, **parse_generation_parameters(img.text["parameters"])}


def pixels(path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def test_txt2img_tutorial_command(tmp_path, cli_model):
    result = sd_run(*TXT2IMG, "--model", str(cli_model), "--outdir", "OUT", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    samples = [f"OUT/samples/0000{k}.png" for k in range(4)]
    assert files(tmp_path) == ["OUT/grid-0000.png", *samples]
    assert result.stdout.split() == [*samples, "OUT/grid-0000.png"]
    for k, name in enumerate(samples):
        got = info(tmp_path / name)
        assert got["size"] == (64, 64)
        assert (got["Seed"], got["Batch size"], got["Batch pos"]) == (str(42 + k // 2), "2", str(k % 2))  # iteration k: seed + k
        assert (got["Steps"], got["Sampler"], got["Prompt"]) == ("4", "PLMS", "a red circle on a blue background")
    # The grid: n_iter rows x n_samples columns with torchvision make_grid's 2-pixel black border.
    grid = pixels(tmp_path / "OUT/grid-0000.png")
    assert grid.shape == (2 * 66 + 2, 2 * 66 + 2, 3)
    for k, name in enumerate(samples):
        top, left = 2 + (k // 2) * 66, 2 + (k % 2) * 66
        assert (grid[top : top + 64, left : left + 64] == pixels(tmp_path / name)).all()
    assert (grid[:2] == 0).all() and (grid[:, 66:68] == 0).all()

    # Iteration 1 (seed 43) alone gives the same images; a second run numbers upward.
    again = sd_run(*TXT2IMG[:-1], "43", "--n_iter", "1", "--model", str(cli_model), "--outdir", "OUT", "--skip_grid", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert again.stdout.split() == ["OUT/samples/00004.png", "OUT/samples/00005.png"]
    assert (pixels(tmp_path / "OUT/samples/00004.png") == pixels(tmp_path / "OUT/samples/00002.png")).all()
    assert (pixels(tmp_path / "OUT/samples/00005.png") == pixels(tmp_path / "OUT/samples/00003.png")).all()
    assert "OUT/grid-0001.png" not in files(tmp_path)


def test_img2img_tutorial_command_and_default_outdir(tmp_path, cli_model):
    Image.new("RGB", (64, 64), (20, 40, 200)).save(tmp_path / "sketch.png")
    result = sd_run("--prompt", "a red circle on a blue background", "--init-img", "sketch.png", "--strength", "0.5",
                    "--ddim_steps", "4", "--seed", "7", "--ckpt", str(cli_model), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = "outputs/img2img-samples"
    assert files(tmp_path) == [f"{out}/grid-0000.png", f"{out}/samples/00000.png", "sketch.png"]
    got = info(tmp_path / out / "samples/00000.png")
    assert (got["size"], got["Seed"], got["Denoising strength"], got["Steps"]) == ((64, 64), "7", "0.5", "4")
    assert info(tmp_path / out / "grid-0000.png")["size"] == (68, 68)


def test_script_flags_with_o_keep_sd_runs_names_and_grid_on_request(tmp_path, cli_model):
    result = sd_run("a cat", "--model", str(cli_model), "--ddim_steps", "1", "--n_samples", "2", "--n_iter", "2",
                    "--seed", "9", "--grid", "-o", "cats.png", "-q", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert files(tmp_path) == ["cats-1.png", "cats-2.png", "cats-3.png", "cats-4.png", "cats-grid.png"]
    assert [info(tmp_path / f"cats-{k}.png")["Seed"] for k in range(1, 5)] == ["9", "9", "10", "10"]
    assert info(tmp_path / "cats-grid.png")["size"] == (134, 134)
    plain = sd_run("a cat", "--model", str(cli_model), "--steps", "1", "--seed", "9", "-q", cwd=tmp_path)
    assert plain.returncode == 0 and plain.stdout.split() == ["leansd-9.png"]  # no grid by default


def test_ddim_eta(tmp_path, cli_model):
    args = ("a cat", "--model", str(cli_model), "--ddim_steps", "3", "--seed", "4", "--scheduler", "ddim", "-q")
    assert sd_run(*args, "--ddim_eta", "0.5", "-o", "eta.png", cwd=tmp_path).returncode == 0
    assert sd_run(*args, "-o", "plain.png", cwd=tmp_path).returncode == 0
    assert info(tmp_path / "eta.png")["Eta DDIM"] == "0.5" and "Eta DDIM" not in info(tmp_path / "plain.png")
    assert not (pixels(tmp_path / "eta.png") == pixels(tmp_path / "plain.png")).all()
    before = snapshot(tmp_path)
    assert_clean_error(sd_run("a cat", "--model", str(cli_model), "--plms", "--ddim_eta", "0.5", "-o", "x.png", cwd=tmp_path),
                       "eta=0.5 does not apply to PNDMScheduler; leave eta at 0 or use the ddim scheduler")
    assert snapshot(tmp_path) == before


def test_ckpt_file_gets_the_sd_export_command(tmp_path):
    (tmp_path / "sd-v1-4.ckpt").write_bytes(b"weights")
    (tmp_path / "my model.safetensors").write_bytes(b"weights")
    assert_clean_error(sd_run("--prompt", "a cat", "--ckpt", "sd-v1-4.ckpt", cwd=tmp_path),
                       "--ckpt sd-v1-4.ckpt is a PyTorch checkpoint, which sd-run does not read; convert it once with "
                       "`sd-export sd-v1-4.ckpt sd-v1-4-leansd` (needs PyTorch), then pass --model sd-v1-4-leansd")
    assert_clean_error(sd_run("--prompt", "a cat", "--ckpt", "my model.safetensors", cwd=tmp_path),
                       "`sd-export 'my model.safetensors' 'my model-leansd'`")
    assert_clean_error(sd_run("--prompt", "a cat", "--ckpt", "gone.ckpt", cwd=tmp_path), "--ckpt gone.ckpt does not exist")
    assert_clean_error(sd_run("a cat", "--ckpt", "sd-v1-4.ckpt", "--model", ".", cwd=tmp_path),
                       "--model and --ckpt cannot be used together")
    assert_clean_error(sd_run("a cat", "--outdir", "o", "-o", "x.png", cwd=tmp_path), "-o/--output and --outdir cannot be used together")
    assert_clean_error(sd_run("a cat", "--grid", "--skip_grid", cwd=tmp_path), "--grid and --skip_grid cannot be used together")
    assert files(tmp_path) == ["my model.safetensors", "sd-v1-4.ckpt"]


def test_numbered_name_taken_while_generating_moves_up(tmp_path, cli_model, monkeypatch, capsys):
    from leansd.runtime import cli

    original = cli.generate

    def generate_then_someone_writes(*args, **kwargs):
        results = original(*args, **kwargs)
        (tmp_path / "OUT/samples").mkdir(parents=True)
        (tmp_path / "OUT/samples/00000.png").write_bytes(b"theirs")
        return results

    monkeypatch.setattr(cli, "generate", generate_then_someone_writes)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["a cat", "--model", str(cli_model), "--ddim_steps", "1", "--n_samples", "2", "--outdir", "OUT", "-q"]) == 0
    assert capsys.readouterr().out.split() == ["OUT/samples/00001.png", "OUT/samples/00002.png", "OUT/grid-0000.png"]
    assert (tmp_path / "OUT/samples/00000.png").read_bytes() == b"theirs"


def test_help_lists_the_script_flags(tmp_path):
    result = sd_run("--help", cwd=tmp_path)
    for flag in ("--prompt", "--plms", "--dpm", "--ddim_steps", "--ddim_eta", "--scale", "--n_samples", "--n_iter", "--H",
                 "--W", "--outdir", "--skip_grid", "--init-img", "--ckpt", "--grid"):
        assert flag in result.stdout, flag
