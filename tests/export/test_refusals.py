"""sd-export refuses models it does not export (latent upscaler, instruct-pix2pix, half-SDXL folders, UNets
with class/added/guidance embeddings...) from their configs alone, before any weights load or anything is written.

The folders here hold model_index.json and configs only: no weights. Loading a module fails the test.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from leansd.export import ExportError, export_model
from leansd.export.cli import main as sd_export
from leansd.export.diffusers_folder import Source, check_folder

SD15_UNET = {
    "_class_name": "UNet2DConditionModel", "in_channels": 4, "out_channels": 4, "sample_size": 64, "cross_attention_dim": 768,
    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "attention_head_dim": 8,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "class_embed_type": None, "num_class_embeds": None, "addition_embed_type": None, "time_cond_proj_dim": None,
    "encoder_hid_dim_type": None, "attention_type": "default",
}
SD15_VAE = {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
            "block_out_channels": [128, 256, 512, 512], "scaling_factor": 0.18215, "sample_size": 512}
CLIP = {"hidden_size": 768, "vocab_size": 49408, "max_position_embeddings": 77}


def config_folder(root: Path, class_name: str = "StableDiffusionPipeline", unet: dict | None = None, vae: dict | None = None,
                  index: dict | None = None) -> Path:
    """A diffusers folder of configs only, as save_pretrained writes them for `class_name`."""
    files: dict[str, Any] = {
        "model_index.json": {
            "_class_name": class_name, "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", "PNDMScheduler"], **(index or {}),
        },
        "unet/config.json": {**SD15_UNET, **(unet or {})},
        "vae/config.json": {**SD15_VAE, **(vae or {})},
        "text_encoder/config.json": CLIP,
        "scheduler/scheduler_config.json": {"_class_name": "PNDMScheduler"},
        "tokenizer/vocab.json": {},
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(json.dumps(data))
    (root / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    return root


PIX2PIX_UNET = {"in_channels": 8}
CASES = [
    # (id, pipeline class, unet config changes, vae config changes, model_index additions, fragments of the message)
    # The x4 upscaler is exported (tests/parity/test_upscale.py); 7 channels without its noise-level embedding are not.
    ("x4-upscaler-without-noise-level", "StableDiffusionUpscalePipeline", {"in_channels": 7}, None, None,
     ["7 input channels", "x4 upscaler"]),
    ("upscaler-class-labels", "StableDiffusionPipeline", {"num_class_embeds": 1000}, None, None, ["num_class_embeds=1000"]),
    ("latent-upscaler", "StableDiffusionLatentUpscalePipeline", {"in_channels": 8}, None, None, ["StableDiffusionLatentUpscalePipeline"]),
    ("inpaint-8-latent-channels", "StableDiffusionInpaintPipeline", {"in_channels": 9}, {"latent_channels": 8}, None,
     ["9 input channels", "8 latent channels"]),
    ("instruct-pix2pix", "StableDiffusionInstructPix2PixPipeline", {"in_channels": 8}, None, None,
     ["StableDiffusionInstructPix2PixPipeline", "instruct-pix2pix"]),
    ("instruct-pix2pix-resaved", "StableDiffusionPipeline", {"in_channels": 8}, None, None, ["8 input channels", "instruct-pix2pix"]),
    ("sdxl-resaved", "StableDiffusionPipeline", None, None, {"text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]},
     ["second text encoder", "without SDXL's text_time"]),
    ("sdxl-unet", "StableDiffusionPipeline", {"addition_embed_type": "text_time"}, None, None, ["addition_embed_type=\"text_time\""]),
    ("unclip-unet", "StableDiffusionPipeline", {"class_embed_type": "projection"}, None, None, ["class_embed_type=\"projection\""]),
    ("sdxl-lcm-unet", "LatentConsistencyModelPipeline", {"addition_embed_type": "text_time", "time_cond_proj_dim": 256}, None,
     None, ["time_cond_proj_dim=256", "LCM-LoRA"]),
    ("gligen-unet", "StableDiffusionPipeline", {"attention_type": "gated"}, None, None, ["attention_type=\"gated\""]),
    ("sd3", "StableDiffusion3Pipeline", None, None, {"transformer": ["diffusers", "SD3Transformer2DModel"]}, ["transformer"]),
    ("controlnet", "StableDiffusionControlNetPipeline", None, None, {"controlnet": ["diffusers", "ControlNetModel"]}, ["ControlNet"]),
    ("ldm3d-vae", "StableDiffusionPipeline", None, {"out_channels": 4}, None, ["VAE", "out_channels=4"]),
    ("learned-variance", "StableDiffusionPipeline", {"out_channels": 8}, None, None, ["8 output channels"]),
]
IDS = [c[0] for c in CASES]
PARAMS = [c[1:] for c in CASES]


@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if any module is loaded: the refusal must come from the configs."""
    monkeypatch.setattr(Source, "load", lambda self, name: pytest.fail(f"{name} was loaded before the refusal"))


def assert_refusal(message: str, fragments: list[str]) -> None:
    assert "\n" not in message and "Traceback" not in message, message
    for fragment in [*fragments, "does not support", "text-to-image Stable Diffusion 1.x/2.x", "StableDiffusionPipeline"]:
        assert fragment in message, message


def assert_nothing_written(parent: Path, out: Path) -> None:
    assert not out.exists()
    assert not [p.name for p in parent.iterdir() if ".leansd-" in p.name], "temporary folders left behind"


@pytest.mark.parametrize("class_name, unet, vae, index, fragments", PARAMS, ids=IDS)
def test_export_model_refuses_before_writing(tmp_path, no_weights, class_name, unet, vae, index, fragments):
    source = config_folder(tmp_path / "source", class_name, unet, vae, index)
    out = tmp_path / "exports" / "model"
    with pytest.raises(ExportError) as err:
        export_model(source, out)
    assert_refusal(str(err.value), fragments)
    assert str(source) in str(err.value)
    assert_nothing_written(tmp_path, out)
    assert not (tmp_path / "exports").exists()


@pytest.mark.parametrize("class_name, unet, vae, index, fragments", PARAMS, ids=IDS)
def test_cli_refuses_with_one_line(tmp_path, capsys, no_weights, class_name, unet, vae, index, fragments):
    source = config_folder(tmp_path / "source", class_name, unet, vae, index)
    out = tmp_path / "out"
    assert sd_export([str(source), str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sd-export: error: "), err
    assert_refusal(lines[0], fragments)
    assert_nothing_written(tmp_path, out)


def test_plain_folder_passes_the_checks(tmp_path):
    check_folder(config_folder(tmp_path / "sd15"))
    check_folder(config_folder(tmp_path / "img2img", "StableDiffusionImg2ImgPipeline"))
    check_folder(config_folder(tmp_path / "sd2", unet={"cross_attention_dim": 1024, "sample_size": 96}, index={"safety_checker": [None, None]}))
    # Inpainting: 9-channel UNets (latents, mask, masked image latents), saved under either class.
    check_folder(config_folder(tmp_path / "inpaint", "StableDiffusionInpaintPipeline", {"in_channels": 9}))
    check_folder(config_folder(tmp_path / "inpaint-resaved", unet={"in_channels": 9}))


@pytest.mark.parametrize("file, content, fragment", [
    ("model_index.json", [], "JSON list"),
    ("unet/config.json", "unet", "JSON string"),
    ("unet/config.json", {**SD15_UNET, "in_channels": "4"}, "'in_channels'"),
    ("unet/config.json", {**SD15_UNET, "up_block_types": 3}, "'up_block_types'"),
    ("vae/config.json", {**SD15_VAE, "scaling_factor": "0.18215"}, "'scaling_factor'"),
    ("text_encoder/config.json", {"vocab_size": 49408}, "'hidden_size'"),
])
def test_damaged_configs_are_named(tmp_path, no_weights, file, content, fragment):
    source = config_folder(tmp_path / "source")
    (source / file).write_text(json.dumps(content))
    out = tmp_path / "out"
    with pytest.raises(ExportError) as err:
        export_model(source, out)
    message = str(err.value)
    assert "\n" not in message and file.split("/")[0] in message and fragment in message, message
    assert_nothing_written(tmp_path, out)


def test_hub_model_is_refused_before_its_weights_download(tmp_path, monkeypatch):
    """The configs of a Hub repo are fetched and checked first; an instruct-pix2pix model never downloads its weights."""
    import huggingface_hub

    repo = config_folder(tmp_path / "snapshot", "StableDiffusionInstructPix2PixPipeline", PIX2PIX_UNET)
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns, local_files_only):
        calls.append(allow_patterns)
        return str(repo)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    with pytest.raises(ExportError) as err:
        export_model("timbrooks/instruct-pix2pix", tmp_path / "out")
    assert_refusal(str(err.value), ["StableDiffusionInstructPix2PixPipeline"])
    assert calls and not any(p.endswith(".safetensors") for patterns in calls for p in patterns), calls
    assert_nothing_written(tmp_path, tmp_path / "out")


@pytest.fixture
def private_tmp(tmp_path, monkeypatch) -> Path:
    """The system temp folder, redirected to see what the single-file path leaves there."""
    import tempfile

    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@pytest.mark.parametrize("channels, task", [(8, "instruct-pix2pix"), (5, "depth")])
def test_single_file_with_extra_unet_channels_is_refused(tmp_path, private_tmp, channels, task):
    pytest.importorskip("torch")
    import torch
    from safetensors.torch import save_file

    from leansd.export.singlefile import CLIP_SD1, UNET_IN, VAE_IN

    ckpt = tmp_path / "model.safetensors"
    save_file({UNET_IN: torch.zeros(320, channels, 3, 3), VAE_IN: torch.zeros(128, 3, 3, 3), CLIP_SD1: torch.zeros(77, 768)}, str(ckpt))
    out = tmp_path / "out"
    with pytest.raises(ExportError) as err:
        export_model(ckpt, out)
    message = str(err.value)
    assert "\n" not in message and f"{channels} input channels" in message and task in message and "does not support" in message
    assert_nothing_written(tmp_path, out)
    assert list(private_tmp.iterdir()) == []


def test_single_file_config_folder_of_another_task_is_refused(tmp_path, private_tmp, no_weights):
    config = config_folder(tmp_path / "pix2pix-configs", "StableDiffusionInstructPix2PixPipeline", PIX2PIX_UNET)
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"never read")
    out = tmp_path / "out"
    with pytest.raises(ExportError) as err:
        export_model(ckpt, out, single_file_config=config)
    assert_refusal(str(err.value), ["StableDiffusionInstructPix2PixPipeline"])
    assert str(config) in str(err.value)  # the user's folder, not the temporary copy
    assert_nothing_written(tmp_path, out)
    assert list(private_tmp.iterdir()) == []
