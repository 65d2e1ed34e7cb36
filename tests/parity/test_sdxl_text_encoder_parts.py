"""SDXL's second text encoder cut into weight-streaming parts (`text_encoder_parts`, `python -m leansd.export.parts`).

sd-export cuts text_encoder_2 when it keeps its weights in an external data file (SDXL's: 2.8 GB in fp32); here the
cut is forced on the tiny SDXL (tests/tiny_sdxl.py). Low-memory generations on onnxruntime must stream it and still
equal diffusers' StableDiffusionXLPipeline (max-abs 1e-4 in [0, 1], as tests/parity/test_sdxl.py), run-time LoRA
included; normal mode keeps opening the whole file; an export written without parts is upgraded in place.
"""
from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

import leansd  # noqa: E402
from leansd.export import layout  # noqa: E402
from leansd.runtime.backends.streamed import StreamedOnnxSession  # noqa: E402
from tests.lora_files import sdxl_kohya_lora  # noqa: E402

pytestmark = pytest.mark.needs_torch

TOLERANCE = 1e-4
PARTS = 2
KEY = "text_encoder_2_parts"
CALL = dict(prompt="a red circle on a blue background", negative_prompt="blurry", num_inference_steps=3, height=32, width=32)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    from tests.tiny_sdxl import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl", seed=5)


@pytest.fixture(scope="module")
def with_parts(source, tmp_path_factory):
    from leansd.export import export_model

    return export_model(source, tmp_path_factory.mktemp("exports") / "te2-parts", backends="onnx", text_encoder_parts=PARTS,
                        progress=False)


@pytest.fixture(scope="module")
def without_parts(source, tmp_path_factory):
    from leansd.export import export_model

    return export_model(source, tmp_path_factory.mktemp("exports") / "whole", backends="onnx", progress=False)


@functools.cache
def _reference(folder, lora=None):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(folder, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora), adapter_name="a")
        pipe.set_adapters(["a"], adapter_weights=[1.0])
    return pipe


def _expected(source, seed: int, lora=None) -> np.ndarray:
    return _reference(source, lora)(**CALL, generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images


def _te2(pipe: leansd.Pipeline):
    """The second text encoder's session, opened as the pipeline opens it."""
    return pipe.models.prompt_encoder.encoders[-1].session.open()


def _streamed_low_memory_matches(folder, source, seed: int, lora=None) -> None:
    pipe = leansd.load(folder, backend="onnxruntime", low_memory=True)
    session = _te2(pipe)
    assert isinstance(session, StreamedOnnxSession) and session.part_count == PARTS
    pipe.models.prompt_encoder.encoders[-1].session.close()
    loras = {str(lora): 1.0} if lora is not None else None
    got = pipe(**CALL, seed=seed, output_type="np", loras=loras).images
    assert float(np.abs(got - _expected(source, seed, lora)).max()) < TOLERANCE


def test_export_cuts_and_checks_the_second_text_encoder(with_parts):
    manifest = json.loads((with_parts / "leansd.json").read_text())
    assert manifest["components"][KEY] == {"onnx": {"fp32": "text_encoder_2/model.parts.json"}}
    assert "unet_parts" not in manifest["components"]  # the tiny UNet is under 2 GB and was not asked to be cut
    parity = manifest["parity"][KEY]["onnx"]["fp32"]
    assert parity["parts"] == PARTS and parity["max_rel"] <= 1e-3
    index = json.loads((with_parts / "text_encoder_2" / "model.parts.json").read_text())
    assert len(index["parts"]) == PARTS
    for part in index["parts"]:
        assert manifest["files"][f"text_encoder_2/{part['file']}"]["bytes"] > 0  # hashed like every file


def test_low_memory_streams_the_second_text_encoder(with_parts, source):
    _streamed_low_memory_matches(with_parts, source, seed=11)


def test_normal_mode_opens_the_whole_second_text_encoder(with_parts, source):
    pipe = leansd.load(with_parts, backend="onnxruntime")
    session = _te2(pipe)
    assert not isinstance(session, StreamedOnnxSession)
    assert session.path == with_parts / "text_encoder_2" / "model.onnx"
    got = pipe(**CALL, seed=12, output_type="np").images
    assert float(np.abs(got - _expected(source, 12)).max()) < TOLERANCE


def test_runtime_lora_reaches_the_streamed_second_text_encoder(with_parts, source, tmp_path):
    from safetensors.torch import load_file, save_file

    full = sdxl_kohya_lora(source, tmp_path / "style.safetensors", seed=1)
    path = tmp_path / "te2.safetensors"
    save_file({k: v for k, v in load_file(str(full)).items() if k.startswith("lora_te2_")}, str(path))
    assert np.abs(_expected(source, 3, path) - _expected(source, 3)).max() > 0.01  # the LoRA changes the image
    _streamed_low_memory_matches(with_parts, source, seed=3, lora=path)


def _upgrade(folder, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "leansd.export.parts", str(folder), *args], capture_output=True, text=True)


def test_an_existing_export_is_cut_in_place(without_parts, source, tmp_path):
    folder = shutil.copytree(without_parts, tmp_path / "model")
    assert KEY not in json.loads((folder / "leansd.json").read_text())["components"]
    assert _te2(leansd.load(folder, backend="onnxruntime", low_memory=True)).path.name == "model.onnx"
    done = _upgrade(folder, "--parts", str(PARTS))
    assert done.returncode == 0, done.stderr
    manifest = json.loads((folder / "leansd.json").read_text())
    assert manifest["components"][KEY] == {"onnx": {"fp32": "text_encoder_2/model.parts.json"}}
    parity = manifest["parity"][KEY]["onnx"]["fp32"]
    assert parity["parts"] == PARTS and parity["max_rel"] <= 1e-3 and "whole" in parity["reference"]
    for part in json.loads((folder / "text_encoder_2" / "model.parts.json").read_text())["parts"]:
        rel = f"text_encoder_2/{part['file']}"
        assert manifest["files"][rel]["sha256"] == layout.sha256_file(folder / rel)
    assert not list(folder.glob(".*.tmp"))
    _streamed_low_memory_matches(folder, source, seed=11)

    again = _upgrade(folder, "--parts", str(PARTS))
    assert again.returncode == 2 and "already cut into parts" in again.stderr and "Traceback" not in again.stderr
    assert json.loads((folder / "leansd.json").read_text()) == manifest


def test_the_upgrade_refuses_what_it_cannot_cut(without_parts, tmp_path):
    # A model the size of the tiny one is not cut unless told how many parts.
    folder = shutil.copytree(without_parts, tmp_path / "model")
    result = _upgrade(folder)
    assert result.returncode == 2 and "--parts N" in result.stderr
    assert not (folder / "text_encoder_2" / "model.parts.json").exists()
    # SD 1.x and 2.x folders have no second text encoder.
    sd1 = tmp_path / "sd1"
    sd1.mkdir()
    manifest = json.loads((without_parts / "leansd.json").read_text())
    del manifest["components"]["text_encoder_2"]
    (sd1 / "leansd.json").write_text(json.dumps(manifest))
    result = _upgrade(sd1, "--parts", "2")
    assert result.returncode == 2 and "has no fp32 ONNX text_encoder_2" in result.stderr
    result = _upgrade(tmp_path / "nowhere")
    assert result.returncode == 2 and "not a folder" in result.stderr
    result = _upgrade(folder, "--parts", "1")
    assert result.returncode == 2 and "--parts 1" in result.stderr


def test_the_upgrade_cuts_the_unet_too(without_parts, source, tmp_path):
    """`--component unet`: the same upgrade for an export whose UNet was written whole; low-memory mode streams it."""
    folder = shutil.copytree(without_parts, tmp_path / "model")
    done = _upgrade(folder, "--component", "unet", "--parts", "3")
    assert done.returncode == 0, done.stderr
    manifest = json.loads((folder / "leansd.json").read_text())
    assert manifest["components"]["unet_parts"] == {"onnx": {"fp32": "unet/model.parts.json"}}
    assert manifest["parity"]["unet_parts"]["onnx"]["fp32"]["parts"] == 3 and KEY not in manifest["components"]
    pipe = leansd.load(folder, backend="onnxruntime", low_memory=True)
    assert pipe.models.denoiser.streamed_bytes > 0  # the parts are in use, not the whole graph
    got = pipe(**CALL, seed=13, output_type="np").images
    assert float(np.abs(got - _expected(source, 13)).max()) < TOLERANCE


def test_a_failed_check_leaves_the_folder_as_it_was(without_parts, tmp_path):
    from leansd.export import ParityError
    from leansd.export.parts import add_parts

    folder = shutil.copytree(without_parts, tmp_path / "model")
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    manifest = (folder / "leansd.json").read_text()
    with pytest.raises(ParityError, match=r"second text encoder \(text_encoder_2\)'s .* differ from the whole model\.onnx"):
        add_parts(folder, count=PARTS, tolerance=-1.0)  # no result passes a negative tolerance
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before
    assert (folder / "leansd.json").read_text() == manifest


def test_external_data_layout_is_cut_by_default(source, tmp_path, monkeypatch):
    """The full-size layout forced on the tiny model (weights in `model.onnx_data`, as SDXL's 2.8 GB encoder has them):
    the upgrade then cuts text_encoder_2 without being told a count (sd-export's default), the parts point into the
    weights file, and low-memory generations still equal diffusers'."""
    import leansd.export.onnx as onnx_export
    from leansd.export import export_model, streaming
    from leansd.export.parts import add_parts

    relocate = onnx_export._relocate
    monkeypatch.setattr(onnx_export, "_relocate", lambda src, dst, threshold: relocate(src, dst, 0))
    folder = export_model(source, tmp_path / "large", backends="onnx", text_encoder_parts=0, unet_parts=0, progress=False)
    model = folder / "text_encoder_2" / "model.onnx"
    assert streaming.has_external_data(model) and KEY not in json.loads((folder / "leansd.json").read_text())["components"]
    index = add_parts(folder)
    entry = json.loads((folder / "leansd.json").read_text())["parity"][KEY]["onnx"]["fp32"]
    assert entry["parts"] == streaming.default_parts(model) >= 2 and entry["max_rel"] <= 1e-3
    parts = json.loads(index.read_text())["parts"]
    assert all(p["weight_bytes"] > 0 for p in parts)  # every part holds some of the weights ...
    data = (folder / "text_encoder_2" / "model.onnx_data").stat().st_size
    assert sum((index.parent / p["file"]).stat().st_size for p in parts) < data  # ... by reference into the weights file
    pipe = leansd.load(folder, backend="onnxruntime", low_memory=True)
    assert _te2(pipe).part_count == len(parts)
    pipe.models.prompt_encoder.encoders[-1].session.close()
    got = pipe(**CALL, seed=14, output_type="np").images
    assert float(np.abs(got - _expected(source, 14)).max()) < TOLERANCE
