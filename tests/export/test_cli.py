"""`sd-export` behaviour: exit codes, one-line messages, and nothing written at OUTPUT_DIR on failure."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from leansd.export.cli import main
from tests.conftest import needs_torch

pytestmark = needs_torch


def sd_export(capsys, *args: str) -> tuple[int, str]:
    """Run the CLI in-process; return (exit status, stderr)."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    return code, capsys.readouterr().err


def assert_one_line(err: str, *fragments: str) -> None:
    # Redirected (not a terminal), stderr also has one progress line per export stage begun, "[12.3 s, ...] sd-export: ...".
    lines = [line for line in err.strip().splitlines() if not line.startswith("[")]
    assert len(lines) == 1 and lines[0].startswith("sd-export: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def no_leftovers(parent: Path) -> None:
    assert not [p.name for p in parent.iterdir() if ".leansd-" in p.name], "temporary folders left behind"


def test_missing_source(tmp_path, capsys):
    code, err = sd_export(capsys, tmp_path / "nowhere", tmp_path / "out")
    assert code == 2
    assert_one_line(err, "nowhere", "not found", "diffusers folder")
    assert not (tmp_path / "out").exists()


def test_console_script_prints_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "leansd.export.cli", str(tmp_path / "nowhere"), str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert_one_line(result.stderr, "not found")


def test_not_a_model_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, err = sd_export(capsys, tmp_path / "empty", tmp_path / "out")
    assert code == 2
    assert_one_line(err, "model_index.json", "not a diffusers model folder")


def test_not_a_stable_diffusion_model(tmp_path, capsys):
    (tmp_path / "kandinsky").mkdir()
    index = {"_class_name": "KandinskyV22Pipeline", "unet": ["diffusers", "UNet2DConditionModel"], "movq": ["diffusers", "VQModel"]}
    (tmp_path / "kandinsky" / "model_index.json").write_text(json.dumps(index))
    code, err = sd_export(capsys, tmp_path / "kandinsky", tmp_path / "out")
    assert code == 2
    assert_one_line(err, "is not a Stable Diffusion 1.x/2.x or SDXL model", "'vae' is nothing")


def test_unsupported_file_type(tmp_path, capsys):
    (tmp_path / "model.bin").write_bytes(b"\0" * 16)
    code, err = sd_export(capsys, tmp_path / "model.bin", tmp_path / "out")
    assert code == 2
    assert_one_line(err, ".bin", ".safetensors")


def test_hub_id_offline(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    code, err = sd_export(capsys, "someone/some-model-that-is-not-cached", tmp_path / "out")
    assert code == 2
    assert_one_line(err, "someone/some-model-that-is-not-cached", "pass a local diffusers folder")


def test_unknown_backend(tmp_path, capsys, tiny_sd_dir):
    code, err = sd_export(capsys, tiny_sd_dir, tmp_path / "out", "--backend", "tensorrt")
    assert code == 2
    assert_one_line(err, "--backend", "tensorrt")


def test_size_not_multiple_of_vae_factor(tmp_path, capsys, tiny_sd_vae4_vpred_dir):
    code, err = sd_export(capsys, tiny_sd_vae4_vpred_dir, tmp_path / "out", "--height", "30")
    assert code == 2
    assert_one_line(err, "--height 30", "multiple of 4", "use 28 or 32")
    assert not (tmp_path / "out").exists()
    no_leftovers(tmp_path)


def test_existing_output_is_refused(tmp_path, capsys, tiny_sd_dir):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    code, err = sd_export(capsys, tiny_sd_dir, tmp_path / "out")
    assert code == 2
    assert_one_line(err, "already exists", "--overwrite")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


@pytest.mark.slow
def test_parity_failure_writes_nothing(tmp_path, capsys, tiny_sd_dir):
    """A tolerance no export can meet: exit 2, no OUTPUT_DIR, no temporary folder, old folder untouched."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    code, err = sd_export(capsys, tiny_sd_dir, tmp_path / "out", "--overwrite", "--backend", "onnx", "--tolerance", "1e-12")
    assert code == 2
    assert_one_line(err, "differs from PyTorch", "tolerance")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["keep.txt"]
    no_leftovers(tmp_path)
    code, err = sd_export(capsys, tiny_sd_dir, tmp_path / "fresh", "--backend", "onnx", "--tolerance", "0")
    assert code == 2 and not (tmp_path / "fresh").exists()
    no_leftovers(tmp_path)


@pytest.mark.slow
def test_converter_crash_writes_nothing(tmp_path, capsys, tiny_sd_dir, monkeypatch):
    import leansd.export.exporter

    def broken(*args, **kwargs):
        raise RuntimeError("converter exploded\nsecond line")

    monkeypatch.setattr(leansd.export.exporter, "convert_openvino", broken)
    code, err = sd_export(capsys, tiny_sd_dir, tmp_path / "out", "--backend", "openvino")
    assert code == 1
    assert_one_line(err, "RuntimeError: converter exploded", "--verbose")
    assert not (tmp_path / "out").exists()
    no_leftovers(tmp_path)
