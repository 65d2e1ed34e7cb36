"""Static-shape export (OpenVINO only, through the CLI) and single-file CompVis checkpoints."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import needs_torch
from tests.export.reference import assert_close, inputs, run, torch_models, torch_outputs

pytestmark = [needs_torch, pytest.mark.slow]
COMPONENTS = ("text_encoder", "unet", "vae_encoder", "vae_decoder")


@pytest.fixture(scope="module")
def static_export(tiny_sd_dir, tmp_path_factory) -> Path:
    """An OpenVINO-only export at 24x40, batch 1, over an existing folder (--overwrite)."""
    from leansd.export.cli import main

    out = tmp_path_factory.mktemp("static") / "tiny-static"
    out.mkdir()
    (out / "old.txt").write_text("replaced on success")
    args = [str(tiny_sd_dir), str(out), "--backend", "openvino", "--height", "24", "--width", "40", "--batch", "1", "--overwrite", "--quiet"]
    assert main(args) == 0
    return out


def test_static_manifest_and_files(static_export):
    m = json.loads((static_export / "leansd.json").read_text())
    assert m["static_shapes"] == {"height": 24, "width": 40, "batch": 1, "unet_batch": 2}
    assert m["components"]["unet"] == {"openvino": {"fp32": "unet/openvino_model.xml"}}
    assert set(m["parity"]["unet"]) == {"openvino"}
    assert m["io"]["unet"]["inputs"]["sample"]["shape"] == [2, 4, 12, 20]
    names = {p.relative_to(static_export).as_posix() for p in static_export.rglob("*") if p.is_file()}
    assert not [n for n in names if n.endswith(".onnx") or "scratch" in n or n == "old.txt"]
    assert set(m["files"]) == names - {"leansd.json"}


def test_static_graphs_run_at_their_shape(static_export, tiny_sd_dir):
    import openvino as ov

    models = torch_models(str(tiny_sd_dir))
    expected = {"text_encoder": [1, 77], "unet": [2, 4, 12, 20], "vae_encoder": [1, 3, 24, 40], "vae_decoder": [1, 4, 12, 20]}
    for c in COMPONENTS:
        xml = static_export / c / "openvino_model.xml"
        first = ov.Core().read_model(str(xml)).inputs[0].get_partial_shape()
        assert first.is_static and [d.get_length() for d in first] == expected[c]
        batch = 2 if c == "unet" else 1
        feeds = inputs(c, models, batch=batch, height=24, width=40, seed=11, factor=2)
        got = run("openvino", xml, feeds)
        if c == "vae_encoder":
            mean, logvar = np.split(got["latent_parameters"], 2, axis=1)
            got = {"mean": mean, "logvar": logvar}
        assert_close(got, torch_outputs(c, models, feeds))


def test_static_export_refuses_a_guidance_cutoff(static_export):
    import leansd
    from leansd.runtime.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="static shapes.*guidance_cutoff"):
        leansd.load(static_export, backend="openvino", guidance_cutoff=0.5)
    pipe = leansd.load(static_export, backend="openvino")
    with pytest.raises(InvalidInputError, match="static shapes.*guidance_cutoff"):
        pipe("a red circle", num_inference_steps=2, guidance_cutoff=0.3)


def test_static_export_takes_one_chunk_of_prompt(static_export):
    """The static UNet's sequence axis is 77: a prompt or negative prompt over 75 tokens is refused, with the fix."""
    import leansd
    from leansd.runtime.errors import InvalidInputError

    pipe = leansd.load(static_export, backend="openvino")
    pipe("x " * 75, negative_prompt="blurry", num_inference_steps=1, output_type="latent")
    with pytest.raises(InvalidInputError, match="needs 2 chunks of 75 tokens.*static shapes.*re-export"):
        pipe("a red circle", negative_prompt="x " * 76, num_inference_steps=1)


# --- single-file checkpoints -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_sd_dir, tmp_path_factory) -> Path:
    """The tiny model as a pickled CompVis-layout .ckpt (read back with weights_only=True)."""
    from tests.export.compvis import write_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "tiny-sd.ckpt"
    write_checkpoint(tiny_sd_dir, path)
    return path


def test_compvis_round_trip_is_exact(tiny_sd_dir, tmp_path):
    """The test-only key mapping is the exact inverse of diffusers' single-file conversion."""
    import torch
    from diffusers import StableDiffusionPipeline

    from tests.export.compvis import write_checkpoint

    path = tmp_path / "tiny.safetensors"
    write_checkpoint(tiny_sd_dir, path)
    converted = StableDiffusionPipeline.from_single_file(str(path), config=str(tiny_sd_dir), local_files_only=True)
    models = torch_models(str(tiny_sd_dir))
    for name in ("unet", "vae", "text_encoder"):
        want, got = models[name].state_dict(), getattr(converted, name).state_dict()
        assert set(want) == set(got)
        assert all(torch.equal(want[k], got[k]) for k in want), name


def test_single_file_export_equals_folder_export(tiny_checkpoint, tiny_sd_dir, exported_tiny_sd, tmp_path):
    from leansd.export import export_model

    out = export_model(tiny_checkpoint, tmp_path / "from-ckpt", backends="onnx", single_file_config=tiny_sd_dir, progress=False)
    m = json.loads((out / "leansd.json").read_text())
    assert m["provenance"]["source_kind"] == "single_file" and m["family"] == "sd1"
    assert (out / "tokenizer" / "vocab.json").read_bytes() == (tiny_sd_dir / "tokenizer" / "vocab.json").read_bytes()
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    models = torch_models(str(tiny_sd_dir))
    for c in COMPONENTS:
        feeds = inputs(c, models, batch=2, height=32, width=32, seed=21, factor=2)
        ours = run("onnx", out / c / "model.onnx", feeds)
        folder = run("onnx", exported_tiny_sd / c / "model.onnx", feeds)
        assert_close(ours, folder, rel=1e-6)


def test_single_file_default_configs_are_sd1(tiny_checkpoint, tmp_path):
    """Without a config folder the shipped SD 1.x configs are used, and a tiny checkpoint does not fit them."""
    from leansd.export import ExportError, export_model

    with pytest.raises(ExportError, match="not an SD 1.x model|input channels"):
        export_model(tiny_checkpoint, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_single_file_rejects_other_checkpoints(tmp_path):
    import torch
    from safetensors.torch import save_file

    from leansd.export import ExportError, export_model

    save_file({"weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ExportError, match="not an SD 1.x checkpoint"):
        export_model(tmp_path / "other.safetensors", tmp_path / "out")
    save_file({"cond_stage_model.model.token_embedding.weight": torch.zeros(2, 2)}, str(tmp_path / "sd2.safetensors"))
    with pytest.raises(ExportError, match="SD 2.x"):
        export_model(tmp_path / "sd2.safetensors", tmp_path / "out")


class Payload:
    """Not a tensor: `weights_only` loading refuses it."""


def test_single_file_refuses_pickled_objects(tmp_path):
    import torch

    from leansd.export import ExportError, export_model

    torch.save({"state_dict": {"x": torch.zeros(1)}, "extra": Payload()}, str(tmp_path / "unsafe.ckpt"))
    with pytest.raises(ExportError, match="weights_only"):
        export_model(tmp_path / "unsafe.ckpt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_shipped_sd1_configs_fit_the_sd1_checkpoint_layout():
    """Full-size SD 1.x models built on the meta device (no memory) from the shipped SD 1.x configs, written in CompVis names:
    diffusers recognises the layout as SD v1, and the exporter's own checks accept it."""
    import shutil

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    from transformers import CLIPTextConfig, CLIPTextModel

    from leansd.export.components import ModelInfo
    from leansd.export.singlefile import assemble_config, check_checkpoint
    from tests.export.compvis import text_encoder_to_ldm, unet_to_ldm, vae_to_ldm

    config = assemble_config(None)
    try:
        cfg = {n: json.loads((config / n / "config.json").read_text()) for n in ("unet", "vae", "text_encoder")}
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(cfg["unet"])
            vae = AutoencoderKL.from_config(cfg["vae"])
            text = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
        state = {**unet_to_ldm(unet.state_dict(), cfg["unet"]), **vae_to_ldm(vae.state_dict(), cfg["vae"]), **text_encoder_to_ldm(text.state_dict())}
        assert infer_diffusers_model_type(state) == "v1"
        check_checkpoint(Path("sd-v1.ckpt"), {k: tuple(v.shape) for k, v in state.items()}, config)
        info = ModelInfo.from_configs(cfg["unet"], cfg["vae"], cfg["text_encoder"])
        assert (info.vae_scale_factor, info.default_size, info.cross_attention_dim, info.unet_up_factor) == (8, 512, 768, 8)
        assert (config / "tokenizer" / "vocab.json").is_file()
    finally:
        shutil.rmtree(config)


def test_a_static_batch_of_two_generates_diffusers_images(tiny_sd_dir, tmp_path):
    """The UNet runs both images (and guidance's halves) in one call, and the decoder, fixed at the batch, decodes
    them together: the images are diffusers' for the same prompts and seed. Image-to-image from one init image
    too: the encoder, also fixed at the batch, encodes it padded to two."""
    import leansd
    from leansd.export import export_model
    from tests.parity.test_pipeline import reference_images, reference_pipeline

    folder = export_model(tiny_sd_dir, tmp_path / "batch2", backends="openvino", static_shapes={"height": 24, "width": 40, "batch": 2},
                          progress=False)
    prompts = ["a red circle", "a green square"]
    kwargs = dict(num_inference_steps=3, guidance_scale=7.5, height=24, width=40)
    expected = reference_images(reference_pipeline(tiny_sd_dir), seed=4, prompt=prompts, **kwargs)
    pipe = leansd.load(folder, backend="openvino")
    got = pipe(prompts, seed=4, output_type="np", **kwargs).images
    assert got.shape == expected.shape == (2, 24, 40, 3)
    assert float(np.abs(got - expected).max()) <= 1e-4

    init = np.random.default_rng(2).uniform(0, 1, (24, 40, 3)).astype(np.float32)
    kwargs.update(strength=0.7)
    expected = reference_images(reference_pipeline(tiny_sd_dir, img2img=True), seed=6, prompt=prompts, image=init[None], **kwargs)
    got = pipe(prompts, image=init, seed=6, output_type="np", **kwargs).images
    assert got.shape == expected.shape == (2, 24, 40, 3)
    assert float(np.abs(got - expected).max()) <= 1e-4
