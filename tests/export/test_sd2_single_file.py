"""SD 2.x single-file checkpoints (Stability's layout: OpenCLIP text encoder, linear projections, `!` padding).

A tiny SD 2 model is written as a `.safetensors` / `.ckpt` in the original layout, exported with sd-export, and run
by leansd on both backends against diffusers' own `from_single_file` conversion of the same file, with the same
configs, seeds and prompts (images within 1e-4). The variant rules (prediction type, native size) are checked on the
full-size shipped SD 2 configs with shapes only (meta tensors).
"""
from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import needs_torch

pytestmark = needs_torch

TOLERANCE = 1e-4
PROMPT = "a red circle on a blue background"
MEASURED: dict[str, float] = defaultdict(float)  # "case / backend" -> largest max-abs image error
BACKENDS = ("onnxruntime", "openvino")


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    for key, err in sorted(MEASURED.items()):
        print(f"\nSD 2 single-file parity, {key}: max-abs {err:.2e}")


@pytest.fixture(scope="module")
def tiny_sd2_dir(tmp_path_factory) -> Path:
    from tests.tiny_sd2 import build_tiny_sd2

    return build_tiny_sd2(tmp_path_factory.mktemp("models") / "tiny-sd2-v")


@pytest.fixture(scope="module")
def sd2_safetensors(tiny_sd2_dir, tmp_path_factory) -> Path:
    from tests.tiny_sd2 import write_sd2_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "tiny-sd2-v.safetensors"
    write_sd2_checkpoint(tiny_sd2_dir, path)
    return path


@pytest.fixture(scope="module")
def sd2_export(sd2_safetensors, tiny_sd2_dir, tmp_path_factory) -> Path:
    """The v-prediction file exported through the CLI with the tiny model's configs, both backends."""
    from leansd.export.cli import main

    out = tmp_path_factory.mktemp("exports") / "tiny-sd2-v"
    assert main([str(sd2_safetensors), str(out), "--config", str(tiny_sd2_dir), "--quiet"]) == 0
    return out


def from_single_file(ckpt: Path, config: Path, inpainting: bool = False):
    """diffusers' own conversion of the file, with the same configs: the reference."""
    import diffusers

    diffusers.utils.logging.disable_progress_bar()
    cls = diffusers.StableDiffusionInpaintPipeline if inpainting else diffusers.StableDiffusionPipeline
    pipe = cls.from_single_file(str(ckpt), config=str(config), local_files_only=True, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def compare(case: str, folder: Path, reference, schedulers, backends=BACKENDS, **kwargs) -> None:
    """leansd on `folder` (each of `backends`) equals the diffusers pipeline `reference` for each (scheduler, negative prompt)."""
    import diffusers
    import torch

    import leansd
    from tests.parity.test_pipeline import SCHEDULERS

    pipes = {backend: leansd.load(folder, backend=backend) for backend in backends}
    original = reference.scheduler
    for scheduler, negative in schedulers:
        name, extra = SCHEDULERS[scheduler]
        reference.scheduler = getattr(diffusers, name).from_config(original.config, **extra)
        ref_kwargs = {**kwargs, **({"image": kwargs["image"][None]} if "mask_image" in kwargs else {})}
        with torch.no_grad():
            expected = reference(negative_prompt=negative, generator=torch.Generator("cpu").manual_seed(5), output_type="np",
                                 **ref_kwargs).images
        for backend, pipe in pipes.items():
            got = pipe(negative_prompt=negative, seed=5, scheduler=scheduler, output_type="np", **kwargs).images
            assert got.shape == expected.shape
            err = float(np.abs(got - expected).max())
            MEASURED[f"{case} / {backend}"] = max(MEASURED[f"{case} / {backend}"], err)
            assert err < TOLERANCE, f"{case}, {scheduler}, negative {negative!r}, {backend}: max-abs {err:.2e}"


# ---------------------------------------------------------------- the test-only writer

def test_stability_layout_round_trip_is_exact(tiny_sd2_dir, sd2_safetensors):
    """The test-only OpenCLIP writer is the exact inverse of diffusers' conversion (q/k/v fused, renamed)."""
    import torch
    from diffusers import StableDiffusionPipeline

    converted = from_single_file(sd2_safetensors, tiny_sd2_dir)
    original = StableDiffusionPipeline.from_pretrained(tiny_sd2_dir, safety_checker=None, requires_safety_checker=False)
    for name in ("unet", "vae", "text_encoder"):
        want, got = getattr(original, name).state_dict(), getattr(converted, name).state_dict()
        assert set(want) == set(got) and all(torch.equal(want[k], got[k]) for k in want), name
    assert converted.unet.config.use_linear_projection and converted.text_encoder.config.hidden_act == "gelu"


# ---------------------------------------------------------------- exports against diffusers

@pytest.mark.slow
def test_v_prediction_file_matches_diffusers(sd2_export, sd2_safetensors, tiny_sd2_dir):
    manifest = json.loads((sd2_export / "leansd.json").read_text())
    assert (manifest["family"], manifest["prediction_type"], manifest["provenance"]["source_kind"]) == ("sd2", "v_prediction", "single_file")
    assert json.loads((sd2_export / "tokenizer" / "special_tokens_map.json").read_text())["pad_token"] == "!"
    compare("768-v style (v_prediction)", sd2_export, from_single_file(sd2_safetensors, tiny_sd2_dir),
            [("pndm", None), ("euler_a", "blurry, a triangle"), ("dpm++2m", None)],
            prompt=PROMPT, num_inference_steps=4, guidance_scale=7.5, height=32, width=48)


@pytest.mark.slow
def test_prediction_type_and_size_options(tiny_sd2_dir, tmp_path):
    """A pickled .ckpt exported as an epsilon model at another native size: the options reach the configs, and the
    export equals diffusers' conversion with configs saying the same."""
    from leansd.export.cli import main
    from tests.tiny_sd2 import write_sd2_checkpoint

    ckpt = tmp_path / "tiny-sd2.ckpt"
    write_sd2_checkpoint(tiny_sd2_dir, ckpt, global_step=123)
    out = tmp_path / "eps"
    args = [str(ckpt), str(out), "--config", str(tiny_sd2_dir), "--prediction-type", "epsilon", "--image-size", "48", "--backend", "onnx",
            "--quiet"]
    assert main(args) == 0
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "epsilon"
    assert json.loads((out / "unet" / "config.json").read_text())["sample_size"] == 24
    assert json.loads((tiny_sd2_dir / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"
    config = shutil.copytree(tiny_sd2_dir, tmp_path / "eps-config", ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    path = config / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "prediction_type": "epsilon"}))
    import leansd

    assert leansd.load(out, backend="onnxruntime")("x", num_inference_steps=1, output_type="np").images.shape == (1, 48, 48, 3)
    compare("base style (epsilon, --prediction-type)", out, from_single_file(ckpt, config), [("ddim", "a green square"), ("lms", None)],
            backends=("onnxruntime",), prompt=PROMPT, num_inference_steps=3, guidance_scale=6.0, height=32, width=32)


@pytest.mark.slow
def test_inpainting_file_with_text_to_image_configs(tiny_sd2_dir, tmp_path):
    """A 9-channel SD 2 file (as 512-inpainting-ema) read with the text-to-image configs becomes an inpainting export that
    inpaints as diffusers' StableDiffusionInpaintPipeline.from_single_file does."""
    from leansd.export import export_model
    from tests.parity.test_inpaint import init_image, square_mask
    from tests.tiny_sd2 import build_tiny_sd2, write_sd2_checkpoint

    folder = build_tiny_sd2(tmp_path / "tiny-sd2-inpaint", inpainting=True, prediction_type="epsilon", seed=4)
    ckpt = tmp_path / "tiny-sd2-inpaint.safetensors"
    write_sd2_checkpoint(folder, ckpt)
    out = export_model(ckpt, tmp_path / "out", backends="onnx", single_file_config=tiny_sd2_dir, prediction_type="epsilon", progress=False)
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusionInpaintPipeline"
    assert json.loads((out / "unet" / "config.json").read_text())["in_channels"] == 9
    compare("inpainting (9 channels)", out, from_single_file(ckpt, folder, inpainting=True), [("pndm", None), ("euler", "blurry")],
            backends=("onnxruntime",), prompt=PROMPT, image=init_image(), mask_image=square_mask(), num_inference_steps=4, guidance_scale=7.5, height=32, width=32)


# ---------------------------------------------------------------- the shipped configs and the variant rules

@pytest.fixture(scope="module")
def full_size_sd2_shapes() -> dict:
    """Tensor shapes of a full-size SD 2 checkpoint, built on the meta device (no memory) from the shipped SD 2 configs
    with a 24th OpenCLIP layer as in the released files (diffusers drops it)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from leansd.export.singlefile import SD2_CONFIG
    from tests.export.compvis import unet_to_ldm, vae_to_ldm
    from tests.tiny_sd2 import text_encoder_to_open_clip

    cfg = {n: json.loads((SD2_CONFIG / n / "config.json").read_text()) for n in ("unet", "vae", "text_encoder")}
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg["unet"])
        vae = AutoencoderKL.from_config(cfg["vae"])
        text = CLIPTextModel(CLIPTextConfig(**{**cfg["text_encoder"], "num_hidden_layers": 24}))
        state = {**unet_to_ldm(unet.state_dict(), cfg["unet"]), **vae_to_ldm(vae.state_dict(), cfg["vae"]),
                 **text_encoder_to_open_clip(text.state_dict())}
    return state


def test_shipped_sd2_configs_fit_the_sd2_checkpoint_layout(full_size_sd2_shapes):
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    from leansd.export.components import ModelInfo
    from leansd.export.singlefile import SD2_CONFIG, assemble_config, check_checkpoint, checkpoint_family, linear_projection

    state = full_size_sd2_shapes
    assert infer_diffusers_model_type(state) == "v2"
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    config = assemble_config(None, SD2_CONFIG)
    try:
        assert checkpoint_family(Path("v2-1_768-ema-pruned.safetensors"), shapes) == "sd2"
        assert check_checkpoint(Path("v2-1_768-ema-pruned.safetensors"), shapes, config) is False
        assert linear_projection(shapes) is True
        cfg = {n: json.loads((config / n / "config.json").read_text()) for n in ("unet", "vae", "text_encoder")}
        info = ModelInfo.from_configs(cfg["unet"], cfg["vae"], cfg["text_encoder"])
        assert (info.vae_scale_factor, info.cross_attention_dim, info.text_hidden_size) == (8, 1024, 1024)
        assert json.loads((config / "tokenizer" / "special_tokens_map.json").read_text())["pad_token"] == "!"
        assert (config / "tokenizer" / "vocab.json").is_file()
    finally:
        shutil.rmtree(config)


@pytest.mark.parametrize(
    "metadata, global_step, channels, options, expected",
    [
        ({"modelspec.architecture": "stable-diffusion-v2-768-v", "modelspec.resolution": "768x768"}, None, 4, {}, ("v_prediction", 96)),
        ({"modelspec.prediction_type": "epsilon", "modelspec.resolution": "512x512"}, None, 4, {}, ("epsilon", 64)),
        ({"modelspec.architecture": "stable-diffusion-v2-512"}, None, 4, {}, ("epsilon", 64)),
        ({}, 875000, 4, {}, ("epsilon", 64)),  # 512-base-ema.ckpt
        ({}, None, 4, {"prediction_type": "v_prediction"}, ("v_prediction", 96)),
        ({}, None, 4, {"prediction_type": "epsilon", "image_size": 768}, ("epsilon", 96)),
        ({"modelspec.prediction_type": "v"}, 875000, 4, {"prediction_type": "epsilon"}, ("epsilon", 64)),  # the option wins
        ({}, None, 9, {}, ("epsilon", 64)),  # 512-inpainting-ema
        ({}, None, 5, {}, ("epsilon", 64)),  # 512-depth-ema
    ],
)
def test_variant_is_decided_from_the_file_or_the_options(full_size_sd2_shapes, monkeypatch, tmp_path, metadata, global_step,
                                                         channels, options, expected):
    """With the shipped SD 2 configs: what the export's configs say for each kind of evidence (shapes and metadata only)."""
    from leansd.export import singlefile

    shapes = {k: tuple(v.shape) for k, v in full_size_sd2_shapes.items()}
    shapes[singlefile.UNET_IN] = (320, channels, 3, 3)
    monkeypatch.setattr(singlefile, "read_checkpoint", lambda path: singlefile.Checkpoint(shapes, metadata, global_step))
    source = singlefile.single_file_source(tmp_path / "model.safetensors", **options)
    try:
        got = (source.config("scheduler")["prediction_type"], source.config("unet")["sample_size"])
        assert got == expected
        assert source.config("unet")["in_channels"] == channels and source.config("unet")["use_linear_projection"] is True
        pipeline = {4: "StableDiffusionPipeline", 9: "StableDiffusionInpaintPipeline", 5: "StableDiffusionDepth2ImgPipeline"}[channels]
        assert source.model_index()["_class_name"] == pipeline
    finally:
        source.close()


def test_undecidable_sd2_file_asks_for_the_prediction_type(full_size_sd2_shapes, monkeypatch, tmp_path):
    import tempfile

    from leansd.export import ExportError, export_model, singlefile

    shapes = {k: tuple(v.shape) for k, v in full_size_sd2_shapes.items()}
    monkeypatch.setattr(singlefile, "read_checkpoint", lambda path: singlefile.Checkpoint(shapes, {}, 140000))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    ckpt = tmp_path / "768-v-ema.ckpt"
    ckpt.write_bytes(b"never converted")
    with pytest.raises(ExportError) as err:
        export_model(ckpt, tmp_path / "out")
    message = str(err.value)
    assert "\n" not in message and "SD 2.x" in message and "--prediction-type epsilon" in message and "v_prediction" in message
    assert not (tmp_path / "out").exists() and list((tmp_path / "tmp").iterdir()) == []


def test_real_ckpt_global_step_and_safetensors_metadata_are_read(tmp_path):
    import torch
    from safetensors.torch import save_file

    from leansd.export.singlefile import read_checkpoint

    torch.save({"state_dict": {"a": torch.zeros(2, 3)}, "global_step": 875000, "epoch": 6}, str(tmp_path / "m.ckpt"))
    assert read_checkpoint(tmp_path / "m.ckpt").global_step == 875000
    save_file({"a": torch.zeros(2, 3)}, str(tmp_path / "m.safetensors"), metadata={"modelspec.prediction_type": "v"})
    found = read_checkpoint(tmp_path / "m.safetensors")
    assert found.shapes == {"a": (2, 3)} and found.metadata == {"modelspec.prediction_type": "v"} and found.global_step is None


@pytest.mark.parametrize("args, fragment", [
    (["--prediction-type", "x0"], "invalid choice"),
    (["--image-size", "0"], "must be positive"),
])
def test_bad_variant_options_are_usage_errors(args, fragment, capsys):
    from leansd.export.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["model.safetensors", "out", *args])
    assert exit_.value.code == 2 and fragment in capsys.readouterr().err


def test_variant_options_are_refused_for_folders(tiny_sd2_dir, tmp_path):
    from leansd.export import ExportError, export_model

    with pytest.raises(ExportError, match="apply to single-file checkpoints.*scheduler_config.json"):
        export_model(tiny_sd2_dir, tmp_path / "out", prediction_type="epsilon")


def test_sd2_checkpoint_with_sd1_configs_is_refused(sd2_safetensors, tiny_sd_dir, tmp_path):
    """OpenCLIP weights would convert into an OpenAI CLIP config without error and compute something else."""
    from leansd.export import ExportError, export_model

    with pytest.raises(ExportError, match="SD 2.x checkpoint but the config folder's text encoder is SD 1.x's"):
        export_model(sd2_safetensors, tmp_path / "out", single_file_config=tiny_sd_dir)
