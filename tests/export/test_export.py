"""Exported tiny models: folder layout, leansd.json, graph signatures, and numerics against PyTorch."""
from __future__ import annotations

import datetime
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import needs_torch
from tests.export.reference import as_reference_names, assert_close, inputs, run, torch_models, torch_outputs

pytestmark = [needs_torch, pytest.mark.slow]

COMPONENTS = ("text_encoder", "unet", "vae_encoder", "vae_decoder")
FILES = {"onnx": "model.onnx", "openvino": "openvino_model.xml"}


def vae_factor(source: Path) -> int:
    return 2 ** (len(json.loads((source / "vae" / "config.json").read_text())["block_out_channels"]) - 1)


def test_layout(exported):
    out, _ = exported
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    expected = {"model_index.json", "leansd.json", "weight_map.json", "scheduler/scheduler_config.json"}
    expected |= {f"tokenizer/{n}" for n in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")}
    for c in COMPONENTS:
        expected |= {f"{c}/config.json", f"{c}/model.onnx", f"{c}/openvino_model.xml", f"{c}/openvino_model.bin"}
    assert files == expected
    assert not [p for p in out.parent.iterdir() if "leansd-tmp" in p.name], "a temporary folder was left behind"


def test_manifest(exported):
    out, source = exported
    m = json.loads((out / "leansd.json").read_text())
    assert m["format"] == "leansd-model" and m["format_version"] == 1 and m["family"] == "sd1"
    want_prediction = json.loads((source / "scheduler" / "scheduler_config.json").read_text())["prediction_type"]
    assert m["prediction_type"] == want_prediction
    assert m["static_shapes"] is None
    for c in COMPONENTS:
        for backend, file in FILES.items():
            assert m["components"][c][backend] == {"fp32": f"{c}/{file}"}
            parity = m["parity"][c][backend]["fp32"]
            assert set(parity) >= {"max_abs", "psnr_db", "tolerance"}
            assert parity["max_rel"] <= parity["tolerance"] == 1e-3 and parity["psnr_db"] > 80
    on_disk = {p.relative_to(out).as_posix(): p for p in out.rglob("*") if p.is_file() and p.name != "leansd.json"}
    assert set(m["files"]) == set(on_disk)
    for rel, entry in m["files"].items():
        data = on_disk[rel].read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    prov = m["provenance"]
    assert prov["source"] == str(source) and prov["source_kind"] == "folder"
    assert {"leansd_version", "torch", "diffusers", "onnxruntime", "openvino"} <= set(prov)
    datetime.datetime.fromisoformat(prov["exported_at"])


def test_optimum_style_configs(exported):
    """model_index.json as Optimum writes it; other configs and tokenizer/scheduler files copied verbatim."""
    out, source = exported
    index, original = (json.loads((d / "model_index.json").read_text()) for d in (out, source))
    assert index["_class_name"] == original["_class_name"] == "StableDiffusionPipeline"
    assert index["_name_or_path"] == str(source)
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["safety_checker"] == [None, None]
    same = {"unet/config.json": "unet/config.json", "text_encoder/config.json": "text_encoder/config.json",
            "vae_encoder/config.json": "vae/config.json", "vae_decoder/config.json": "vae/config.json",
            "scheduler/scheduler_config.json": "scheduler/scheduler_config.json", "tokenizer/vocab.json": "tokenizer/vocab.json"}
    for ours, theirs in same.items():
        assert (out / ours).read_bytes() == (source / theirs).read_bytes(), ours


def test_graph_signatures(exported_tiny_sd):
    import onnx
    import openvino as ov

    expect = {
        "text_encoder": ({"input_ids": "int64"}, ["last_hidden_state", "pooler_output", "normed_hidden_states"]),
        "unet": ({"sample": "float32", "timestep": "float32", "encoder_hidden_states": "float32"}, ["out_sample"]),
        "vae_encoder": ({"sample": "float32"}, ["latent_parameters"]),
        "vae_decoder": ({"latent_sample": "float32"}, ["sample"]),
    }
    for c, (ins, outs) in expect.items():
        model = onnx.load(str(exported_tiny_sd / c / "model.onnx"))
        got = {i.name: onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type).name for i in model.graph.input}
        assert got == ins and [o.name for o in model.graph.output] == outs
        dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
        if c == "unet":
            assert len(dims["timestep"]) == 1 and isinstance(dims["timestep"][0], str)
            assert all(isinstance(dims["sample"][a], str) for a in (0, 2, 3))
        ir = ov.Core().read_model(str(exported_tiny_sd / c / "openvino_model.xml"))
        assert [i.get_any_name() for i in ir.inputs] == list(ins) and [o.get_any_name() for o in ir.outputs] == outs
        assert 'element_type="f16"' not in (exported_tiny_sd / c / "openvino_model.xml").read_text()


@pytest.mark.parametrize("backend", ["onnx", "openvino"])
@pytest.mark.parametrize("component", COMPONENTS)
def test_matches_torch_at_export_size(exported, component, backend):
    out, source = exported
    models = torch_models(str(source))
    f = vae_factor(source)
    size = json.loads((source / "unet" / "config.json").read_text())["sample_size"] * f
    feeds = inputs(component, models, batch=2, height=size, width=size, seed=123, factor=f)
    got = as_reference_names(component, run(backend, out / component / FILES[backend], feeds))
    assert_close(got, torch_outputs(component, models, feeds))


@pytest.mark.parametrize("backend", ["onnx", "openvino"])
@pytest.mark.parametrize("latent", [(10, 14), (9, 13)], ids=["even", "odd"])
def test_dynamic_shapes_second_resolution(exported, backend, latent):
    """Other batch sizes and resolutions, including latent sizes the UNet cannot halve evenly."""
    out, source = exported
    models = torch_models(str(source))
    f = vae_factor(source)
    for component in ("unet", "vae_encoder", "vae_decoder"):
        feeds = inputs(component, models, batch=3, height=latent[0] * f, width=latent[1] * f, seed=7, factor=f)
        got = as_reference_names(component, run(backend, out / component / FILES[backend], feeds))
        assert_close(got, torch_outputs(component, models, feeds))


@pytest.mark.parametrize("backend", ["onnx", "openvino"])
def test_unet_broadcasts_a_single_timestep(exported_tiny_sd, tiny_sd_dir, backend):
    """Optimum's pipelines feed a (1,) timestep with a batch of 2 latents; the graph broadcasts it."""
    models = torch_models(str(tiny_sd_dir))
    feeds = inputs("unet", models, batch=2, height=32, width=32, seed=3, factor=2)
    feeds["timestep"] = np.array([421.5], dtype=np.float32)
    got = run(backend, exported_tiny_sd / "unet" / FILES[backend], feeds)
    assert_close(got, torch_outputs("unet", models, feeds))


def test_vae_encoder_parameters_reproduce_diffusers_sampling(exported_tiny_sd, tiny_sd_dir):
    """mean + exp(logvar / 2) * noise on the exported moments equals diffusers' latent_dist.sample(generator)."""
    import torch

    models = torch_models(str(tiny_sd_dir))
    feeds = inputs("vae_encoder", models, batch=1, height=32, width=32, seed=5, factor=2)
    moments = as_reference_names("vae_encoder", run("onnx", exported_tiny_sd / "vae_encoder" / "model.onnx", feeds))
    with torch.no_grad():
        want = models["vae"].encode(torch.from_numpy(feeds["sample"])).latent_dist.sample(torch.Generator().manual_seed(9)).numpy()
    noise = torch.randn(moments["mean"].shape, generator=torch.Generator().manual_seed(9)).numpy()
    assert_close({"z": moments["mean"] + np.exp(0.5 * moments["logvar"]) * noise}, {"z": want})


def test_large_models_get_one_external_data_file(tiny_sd_dir, tmp_path):
    """Past the threshold (2 GB for real models; 0 here) all weights go to a single model.onnx_data."""
    import onnx
    from transformers import CLIPTextModel

    from leansd.export import components as comp
    from leansd.export.onnx import export_onnx

    info = comp.ModelInfo.from_configs(*(json.loads((tiny_sd_dir / d / "config.json").read_text()) for d in ("unet", "vae", "text_encoder")))
    wrapper = comp.wrap("text_encoder", CLIPTextModel.from_pretrained(tiny_sd_dir, subfolder="text_encoder"))
    feeds = comp.make_inputs("text_encoder", info, batch=2, height=32, width=32, seed=0)
    path = tmp_path / "text_encoder" / "model.onnx"
    written = export_onnx("text_encoder", wrapper, feeds, path, external_data_threshold=0)
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx", "model.onnx_data"] == sorted(p.name for p in written)
    model = onnx.load(str(path), load_external_data=False)
    locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"model.onnx_data"}
    models = torch_models(str(tiny_sd_dir))
    assert_close(run("onnx", path, feeds), torch_outputs("text_encoder", models, feeds))


def test_relocation_streams_weight_files_into_one(tiny_sd_dir, tmp_path):
    """Over 2 GB the ONNX exporter writes one file per tensor; they are appended one by one to model.onnx_data (each
    deleted once copied), which then holds every weight exactly once, and both runtimes compute what they computed
    from the weights inline."""
    import onnx
    from onnx import numpy_helper
    from transformers import CLIPTextModel

    from leansd.export import components as comp
    from leansd.export.onnx import _relocate, export_onnx

    info = comp.ModelInfo.from_configs(*(json.loads((tiny_sd_dir / d / "config.json").read_text()) for d in ("unet", "vae", "text_encoder")))
    wrapper = comp.wrap("text_encoder", CLIPTextModel.from_pretrained(tiny_sd_dir, subfolder="text_encoder"))
    feeds = comp.make_inputs("text_encoder", info, batch=2, height=32, width=32, seed=0)
    inline = tmp_path / "inline" / "model.onnx"
    export_onnx("text_encoder", wrapper, feeds, inline)
    pieces = tmp_path / "pieces" / "model.onnx"
    pieces.parent.mkdir()
    onnx.save_model(onnx.load(str(inline)), str(pieces), save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)
    weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(inline)).graph.initializer}
    assert len(list(pieces.parent.iterdir())) == len(weights) + 1 > 10  # the exporter's layout: one file per tensor

    streamed = tmp_path / "streamed" / "model.onnx"
    written = _relocate(pieces, streamed, 0)
    assert [p.name for p in pieces.parent.iterdir()] == ["model.onnx"]  # each piece deleted once appended
    assert sorted(p.name for p in streamed.parent.iterdir()) == ["model.onnx", "model.onnx_data"] == sorted(p.name for p in written)
    graph = onnx.load(str(streamed), load_external_data=False).graph
    spans = sorted((int(e["offset"]), int(e["length"])) for e in
                   ({x.key: x.value for x in t.external_data} for t in graph.initializer) if e)
    assert all(a + n == b for (a, n), (b, _) in zip(spans, spans[1:]))  # back to back: no weight twice, no gap
    assert spans[0][0] == 0 and sum(n for _, n in spans) == (streamed.parent / "model.onnx_data").stat().st_size
    assert len(spans) == len(weights)
    loaded = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(streamed)).graph.initializer}
    assert loaded.keys() == weights.keys()
    for name, value in weights.items():
        np.testing.assert_array_equal(loaded[name], value)
    for backend in ("onnx", "openvino"):
        want, got = run(backend, inline, feeds), run(backend, streamed, feeds)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=f"{backend} {name}")
