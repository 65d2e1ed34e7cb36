"""`python -m leansd.export.int8 FOLDER`: int8 variants added in place to an fp32-only export, recorded in leansd.json
exactly where a fresh `--precision fp32,int8` export records them, streamed part by part in low-memory mode, and
refused without a trace when they cannot be made."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from leansd.export import ExportError, ParityError
from leansd.export import int8 as int8_upgrade
from leansd.export import layout
from leansd.export import quantize as q
from tests.conftest import needs_torch

pytestmark = [needs_torch, pytest.mark.slow]

CALL = dict(prompt="a lighthouse on a cliff", num_inference_steps=4, output_type="np")


def _upgrade(folder: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "leansd.export.int8", str(folder), "--quiet", *args], capture_output=True, text=True)


def _shape(value: Any) -> Any:
    """The structure of a manifest entry: its keys all the way down, its strings and booleans, not its measured numbers."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()}
    if isinstance(value, float) or (isinstance(value, int) and not isinstance(value, bool)):
        return "number"
    return value


def _snapshot(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): layout.sha256_file(p) if p.is_file() else "dir" for p in folder.rglob("*")}


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(20 * np.log10(1.0 / np.sqrt(np.mean((a - b) ** 2))))


@pytest.fixture(scope="module")
def sd_exports(tiny_sd_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny SD model exported for ONNX with deep-cache parts and UNet parts: fp32 only, and fp32 + int8."""
    from tests.export.fixtures import _export

    root = tmp_path_factory.mktemp("int8-inplace")
    kwargs = dict(backends="onnx", deep_cache=True, unet_parts=2)
    return _export(tiny_sd_dir, root / "fp32", **kwargs), _export(tiny_sd_dir, root / "fresh", precisions=("fp32", "int8"), **kwargs)


@pytest.fixture(scope="module")
def sd_upgraded(sd_exports, tmp_path_factory) -> Path:
    folder = shutil.copytree(sd_exports[0], tmp_path_factory.mktemp("upgraded") / "model")
    done = _upgrade(folder, "--backend", "onnx")
    assert done.returncode == 0, done.stderr
    assert "unet (onnx): int8" in done.stdout
    return folder


def test_the_upgrade_records_what_a_fresh_int8_export_records(sd_exports, sd_upgraded):
    fresh = json.loads((sd_exports[1] / "leansd.json").read_text())
    got = json.loads((sd_upgraded / "leansd.json").read_text())
    assert got["components"] == fresh["components"]  # every int8 file where a fresh export puts it, deep cache and parts too
    assert got["components"]["unet_parts"]["onnx"]["int8"] == "unet/model_int8.parts.json"
    assert got["components"]["unet_deep"]["onnx"]["int8"] == "unet_deep/model_int8.onnx"
    assert _shape(got["parity"]) == _shape(fresh["parity"])
    assert got["int8"] == fresh["int8"]  # same calibration, held-out runs, size and gates
    assert got["parity_metric"] == fresh["parity_metric"] and list(got) == list(fresh)
    assert set(got["files"]) == set(fresh["files"])
    for rel, entry in got["files"].items():
        assert entry["sha256"] == layout.sha256_file(sd_upgraded / rel), rel
    for name, per_backend in got["parity"].items():
        if name != "pipeline":
            int8 = per_backend["onnx"]["int8"]
            assert int8["psnr_db"] >= int8["min_psnr_db"] == q.GATES["unet" if "unet" in name else name].min_psnr_db, name
    assert "int8_added_at" in got["provenance"] and not list(sd_upgraded.rglob("*.tmp")) and not list(sd_upgraded.rglob(".*quantize"))


def test_the_upgraded_folder_generates_int8_close_to_fp32(sd_upgraded):
    import leansd

    images = {}
    for precision in ("fp32", "int8"):
        pipe = leansd.load(sd_upgraded, backend="onnxruntime", precision=precision)
        assert pipe.bundle.component_file("unet", "onnxruntime", precision).name == q.FILES["onnx"][precision == "int8"]
        images[precision] = pipe(**CALL, seed=11).images
        pipe.close()
    diff = np.abs(images["int8"] - images["fp32"])
    assert diff.max() > 0 and _psnr(images["int8"], images["fp32"]) > 28  # int8 ran, and stayed close to fp32


def test_a_second_upgrade_and_a_missing_folder_are_refused(sd_exports, sd_upgraded, tmp_path):
    before = _snapshot(sd_upgraded)
    again = _upgrade(sd_upgraded, "--backend", "onnx")
    assert again.returncode == 2 and "already has int8 files for onnx" in again.stderr and "Traceback" not in again.stderr
    assert _snapshot(sd_upgraded) == before
    for folder, args, message in [(tmp_path / "nowhere", (), "not a folder"),
                                  (sd_upgraded, ("--backend", "openvino"), "no fp32 openvino files"),
                                  (sd_exports[0], ("--backend", "openvino"), "only onnx files; pass --backend onnx"),
                                  (sd_upgraded, ("--size", "30"), "--size 30")]:
        result = _upgrade(folder, *args)
        assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize("where", ["gate", "unet parts"])
def test_a_failure_leaves_the_folder_as_it_was(sd_exports, tmp_path, monkeypatch, where):
    """A gate miss (in quantize.build), or one after the int8 files and the provisional leansd.json were written
    (cutting the int8 UNet): the folder ends byte-identical."""
    folder = shutil.copytree(sd_exports[0], tmp_path / "model")
    before = _snapshot(folder)
    if where == "gate":
        monkeypatch.setitem(q.GATES, "unet", q.Gate(500.0, "fail"))
    else:
        def fail(*args, **kwargs):
            raise ParityError("the int8 UNet's parts fail; test")

        monkeypatch.setattr(int8_upgrade.parts, "split_int8_unet", fail)
    with pytest.raises(ParityError):
        int8_upgrade.add_int8(folder, "onnx", progress=False)
    assert _snapshot(folder) == before


def test_static_shapes_fix_the_size(tmp_path):
    with pytest.raises(ExportError, match="static shapes"):
        int8_upgrade._plan(None, {"batch": 1, "height": 32, "width": 32}, 64)
    assert int8_upgrade._plan(None, {"batch": 2, "height": 32, "width": 32}, None) == q.RunPlan(32, 32, 2)


@pytest.fixture(scope="module")
def sdxl_upgraded(tmp_path_factory) -> Path:
    from leansd.export import export_model
    from tests.tiny_sdxl import build_tiny_sdxl

    source = build_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl", seed=5)
    folder = export_model(source, tmp_path_factory.mktemp("exports") / "sdxl", backends="onnx", unet_parts=2, text_encoder_parts=2,
                          progress=False)
    done = _upgrade(folder, "--size", "64")
    assert done.returncode == 0, done.stderr
    return folder


def test_sdxl_low_memory_streams_the_int8_unet_parts(sdxl_upgraded):
    import leansd
    from leansd.runtime.backends.streamed import StreamedOnnxSession

    m = json.loads((sdxl_upgraded / "leansd.json").read_text())
    assert m["int8"]["size"] == [64, 64]
    index = json.loads((sdxl_upgraded / m["components"]["unet_parts"]["onnx"]["int8"]).read_text())
    fp32_index = json.loads((sdxl_upgraded / m["components"]["unet_parts"]["onnx"]["fp32"]).read_text())
    assert len(index["parts"]) == len(fp32_index["parts"]) == m["parity"]["unet_parts"]["onnx"]["int8"]["parts"]
    assert m["components"]["text_encoder_2"]["onnx"]["int8"] == "text_encoder_2/model_int8.onnx"
    images = {}
    for low_memory in (False, True):
        pipe = leansd.load(sdxl_upgraded, backend="onnxruntime", precision="int8", low_memory=low_memory)
        session = pipe.unet.session.open()
        if low_memory:
            assert isinstance(session, StreamedOnnxSession) and session.part_count == len(index["parts"])
            assert session.path.name == "model_int8.parts.json"
        else:
            assert not isinstance(session, StreamedOnnxSession)
        images[low_memory] = pipe(**CALL, seed=3, height=32, width=32).images
        pipe.close()
    # The parts run unfused int8 kernels, which round a little differently from the whole file's (see parts.split_int8_unet).
    assert _psnr(images[True], images[False]) > 30


def test_an_openvino_upgrade_quantizes_the_deep_cache_parts(exported_tiny_sd_deepcache, tmp_path):
    """In place as in a fresh export, OpenVINO's deep-cache parts get int8 weights; the fast mode then runs them."""
    import leansd

    folder = shutil.copytree(exported_tiny_sd_deepcache, tmp_path / "model")
    done = _upgrade(folder, "--backend", "openvino", "--int8-unet", "weights")  # weights: no calibration, quick
    assert done.returncode == 0, done.stderr
    m = json.loads((folder / "leansd.json").read_text())
    for part in ("unet_deep", "unet_shallow"):
        assert m["components"][part]["openvino"]["int8"] == f"{part}/openvino_model_int8.xml"
        assert "int8" not in m["components"][part]["onnx"]  # only the backend asked for
        assert m["parity"][part]["openvino"]["int8"]["passed"]
        assert {f"{part}/openvino_model_int8.xml", f"{part}/openvino_model_int8.bin"} <= set(m["files"])
    pipe = leansd.load(folder, backend="openvino", precision="int8")
    fast = pipe(**CALL, height=32, width=32, seed=3, deep_cache=2).images
    assert pipe.models.denoiser.deep.session.open().path == folder / "unet_deep" / "openvino_model_int8.xml"
    pipe.close()
    exact = leansd.load(folder, backend="openvino")(**CALL, height=32, width=32, seed=3, deep_cache=2).images
    assert 28 < _psnr(fast, exact) < float("inf")
