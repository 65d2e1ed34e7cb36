"""Weight streaming: the ONNX UNet cut into parts (`sd-export --unet-parts N`) that low-memory mode on
onnxruntime loads one at a time.

Parity: the part chain against the whole file on the same inputs, whole low-memory generations against
diffusers' `StableDiffusionPipeline`, and the split of a model whose weights live in an external data file
(how SD 1.5 sizes are stored), where the parts must point into that file instead of copying it.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

import leansd  # noqa: E402
from leansd.export import streaming  # noqa: E402
from leansd.runtime.backends import SessionOptions, open_session, open_streamed_session  # noqa: E402
from leansd.runtime.errors import ModelFolderError  # noqa: E402
from tests.parity.test_pipeline import reference_images, reference_pipeline  # noqa: E402

pytestmark = pytest.mark.needs_torch

PROMPT = "a red circle on a blue background"
PARTS = 3


@pytest.fixture(scope="module")
def exported_with_parts(tiny_sd_dir, tmp_path_factory):
    from tests.export.fixtures import _export

    return _export(tiny_sd_dir, tmp_path_factory.mktemp("exports") / "tiny-sd-parts", backends="onnx", unet_parts=PARTS)


def _unet_feeds(seed: int, batch: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "sample": rng.standard_normal((batch, 4, 16, 16), dtype=np.float32),
        "timestep": np.full((batch,), 501.0, np.float32),
        "encoder_hidden_states": rng.standard_normal((batch, 77, 32), dtype=np.float32),
    }


def _feeds_for(session, feeds):
    return {spec.name: feeds[spec.name].astype(spec.dtype) for spec in session.inputs}


def test_export_writes_verified_parts_and_records_them(exported_with_parts):
    manifest = json.loads((exported_with_parts / "leansd.json").read_text())
    rel = manifest["components"]["unet_parts"]["onnx"]["fp32"]
    assert rel == "unet/model.parts.json"
    index = json.loads((exported_with_parts / rel).read_text())
    assert len(index["parts"]) == PARTS
    # Every attention (one Softmax each in the exported graph) became ONNX Runtime's fused operator.
    softmaxes = [n for n in onnx.load(str(exported_with_parts / "unet" / "model.onnx")).graph.node if n.op_type == "Softmax"]
    assert index["fused_attention"] == len(softmaxes) > 0
    fused = [n for p in index["parts"] for n in onnx.load(str(exported_with_parts / "unet" / p["file"])).graph.node
             if n.op_type == "MultiHeadAttention"]
    assert len(fused) == len(softmaxes)
    for part in index["parts"]:
        assert (exported_with_parts / "unet" / part["file"]).is_file()
        assert part["weight_bytes"] > 0
    # Every weight of the model is in a part; only small constants shared by two parts appear twice.
    whole = {t.name: t.ByteSize() for t in onnx.load(str(exported_with_parts / "unet" / "model.onnx")).graph.initializer}
    names = [t.name for p in index["parts"] for t in onnx.load(str(exported_with_parts / "unet" / p["file"])).graph.initializer]
    assert set(names) == set(whole)
    assert all(whole[n] < 1024 for n in set(names) if names.count(n) > 1)
    parity = manifest["parity"]["unet_parts"]["onnx"]["fp32"]
    assert parity["parts"] == PARTS and parity["max_rel"] <= 1e-3
    # The whole graph with fused attention, for sessions that keep the UNet loaded, is verified too.
    assert index["whole"] == "model.fused.onnx" and (exported_with_parts / "unet" / "model.fused.onnx").is_file()
    assert parity["whole_fused"]["max_rel"] <= 1e-3
    assert "unet/model.part0.onnx" in manifest["files"]


def test_part_chain_equals_the_whole_file(exported_with_parts):
    whole = open_session(exported_with_parts / "unet" / "model.onnx", "onnxruntime")
    streamed = open_streamed_session(exported_with_parts / "unet" / "model.parts.json")
    assert streamed.part_count == PARTS
    assert [s.name for s in streamed.inputs] == [s.name for s in whole.inputs]
    for seed in (0, 1):
        feeds = _unet_feeds(seed)
        want = whole.run(_feeds_for(whole, feeds))["out_sample"]
        got = streamed.run(_feeds_for(streamed, feeds))["out_sample"]
        assert got.shape == want.shape
        assert float(np.abs(got - want).max()) <= 1e-5 * float(np.abs(want).max())


@pytest.mark.parametrize("scheduler", ["pndm", "euler_a"])
def test_low_memory_generation_streams_the_unet_and_matches_diffusers(tiny_sd_dir, exported_with_parts, scheduler):
    kwargs = dict(prompt=PROMPT, num_inference_steps=4, guidance_scale=7.5, height=32, width=32)
    expected = reference_images(reference_pipeline(tiny_sd_dir, scheduler), seed=5, **kwargs)
    pipe = leansd.load(exported_with_parts, backend="onnxruntime", low_memory=True)
    assert pipe.unet.session.open().path.name == "model.parts.json"  # streamed: the parts index
    got = pipe(**kwargs, seed=5, scheduler=scheduler, output_type="np").images
    err = float(np.abs(got - expected).max())
    assert err < 1e-4, f"{scheduler}: max-abs {err:.2e}"
    assert not pipe.unet.session.loaded  # released after the loop, like the whole-file UNet


def test_normal_mode_on_onnxruntime_uses_the_fused_attention_graph(tiny_sd_dir, exported_with_parts):
    kwargs = dict(prompt=PROMPT, num_inference_steps=4, guidance_scale=7.5, height=32, width=32)
    expected = reference_images(reference_pipeline(tiny_sd_dir, "ddim"), seed=6, **kwargs)
    pipe = leansd.load(exported_with_parts, backend="onnxruntime")
    assert pipe.unet.session.open().path.name == "model.fused.onnx"
    got = pipe(**kwargs, seed=6, scheduler="ddim", output_type="np").images
    assert float(np.abs(got - expected).max()) < 1e-4


def test_streaming_is_only_used_where_it_applies(exported_with_parts, exported_tiny_sd):
    assert leansd.load(exported_with_parts, backend="openvino", low_memory=True).unet.session.open().path.name == "model.onnx"  # ORT only
    # A small model is exported without parts by default; low-memory mode then runs the whole file.
    manifest = json.loads((exported_tiny_sd / "leansd.json").read_text())
    assert "unet_parts" not in manifest["components"]
    assert leansd.load(exported_tiny_sd, backend="onnxruntime", low_memory=True).unet.session.open().path.name == "model.onnx"


def test_a_missing_part_is_named(exported_with_parts, tmp_path):
    broken = shutil.copytree(exported_with_parts, tmp_path / "broken")
    (broken / "unet" / "model.part1.onnx").unlink()
    with pytest.raises(ModelFolderError, match=r"model\.part1\.onnx is missing.*sd-export"):
        open_streamed_session(broken / "unet" / "model.parts.json", SessionOptions())
    (broken / "unet" / "model.fused.onnx").unlink()
    with pytest.raises(ModelFolderError, match=r"model\.fused\.onnx is missing"):
        leansd.load(broken, backend="onnxruntime")
    (broken / "unet" / "model.parts.json").write_text("{not json")
    with pytest.raises(ModelFolderError, match="not a readable parts index"):
        open_streamed_session(broken / "unet" / "model.parts.json")


def test_parts_of_an_external_data_model_point_into_its_weights_file(exported_tiny_sd, tmp_path):
    # SD 1.5-size UNets keep their weights in model.onnx_data; re-save the tiny one that way.
    model = onnx.load(str(exported_tiny_sd / "unet" / "model.onnx"))
    folder = tmp_path / "unet"
    folder.mkdir()
    onnx.save_model(model, str(folder / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx_data", size_threshold=0)
    assert streaming.has_external_data(folder / "model.onnx")
    assert not streaming.has_external_data(exported_tiny_sd / "unet" / "model.onnx")
    data_size = (folder / "model.onnx_data").stat().st_size
    index = streaming.split(folder / "model.onnx", 4)
    parts = json.loads(index.read_text())["parts"]
    assert len(parts) == 4
    for part in parts:
        piece = onnx.load(str(folder / part["file"]), load_external_data=False)
        assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in piece.graph.initializer)
        assert (folder / part["file"]).stat().st_size < data_size / 4  # graph only: no weight bytes copied
    whole = open_session(folder / "model.onnx", "onnxruntime")
    streamed = open_streamed_session(index)
    feeds = _unet_feeds(3, batch=1)
    want = whole.run(_feeds_for(whole, feeds))["out_sample"]
    got = streamed.run(_feeds_for(streamed, feeds))["out_sample"]
    assert float(np.abs(got - want).max()) <= 1e-5 * float(np.abs(want).max())


@pytest.mark.parametrize("flag", ["--unet-parts", "--text-encoder-parts"])
def test_cli_rejects_one_part(flag, tiny_sd_dir, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "leansd.export.cli", str(tiny_sd_dir), str(out), flag, "1"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert f"{flag} 1" in result.stderr and "0 (no parts) or 2" in result.stderr
    assert not out.exists()
