"""The x4 upscaler against diffusers' StableDiffusionUpscalePipeline on the same tiny weights, images and seeds.

The tiny model (tests/tiny_upscaler.py) has the released upscaler's shape: a 7-channel, noise-level-conditioned
UNet, a VAE with factor 4 and scaling factor 0.08333, v-prediction with DDIM and a DDPM low-resolution scheduler.
It is exported with leansd's exporter and run on both backends; images must agree within 1e-4 (max-abs, [0, 1]).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

import leansd  # noqa: E402
from leansd.export.errors import ExportError  # noqa: E402
from leansd.runtime.errors import InvalidInputError  # noqa: E402
from tests.parity.test_pipeline import BACKENDS, SCHEDULERS  # noqa: E402

pytestmark = pytest.mark.needs_torch

TOLERANCE = 1e-4
PROMPT = "a sharp photo of a red circle"


def low_res_image(width: int = 20, height: int = 12, seed: int = 0) -> Image.Image:
    """A small textured picture; 12x20 is not a multiple of the UNet's factor, so its general path runs too."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    smooth = np.stack([x, y, 1 - x * y], axis=-1)
    array = np.clip(smooth + 0.15 * rng.standard_normal((height, width, 3)), 0, 1)
    return Image.fromarray((array * 255).round().astype(np.uint8))


@pytest.fixture(scope="module")
def upscaler_dir(tmp_path_factory):
    from tests.tiny_upscaler import build_tiny_upscaler

    return build_tiny_upscaler(tmp_path_factory.mktemp("models") / "tiny-upscaler")


@pytest.fixture(scope="module")
def exported_upscaler(upscaler_dir, tmp_path_factory):
    from leansd.export import export_model

    return export_model(upscaler_dir, tmp_path_factory.mktemp("exports") / "tiny-upscaler", progress=False)


@pytest.fixture(scope="module")
def pipes(exported_upscaler):
    return {backend: leansd.load(exported_upscaler, backend=backend) for backend in BACKENDS}


def reference(folder, seed: int, scheduler: str | None = None, **kwargs) -> np.ndarray:
    import diffusers

    pipe = diffusers.StableDiffusionUpscalePipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    if scheduler is not None:
        name, extra = SCHEDULERS[scheduler]
        pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config, **extra)
    with torch.no_grad():
        return pipe(generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **kwargs).images


CASES = {
    "defaults": {},
    "noise level, no guidance": {"noise_level": 45, "guidance_scale": 1.0},
    "batch and negative prompt": {"num_images_per_prompt": 2, "negative_prompt": "blurry"},
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_upscale_matches_diffusers(upscaler_dir, pipes, backend, case):
    kwargs = dict(prompt=PROMPT, image=low_res_image(), num_inference_steps=5, **CASES[case])
    expected = reference(upscaler_dir, 7, **kwargs)
    out = pipes[backend](seed=7, output_type="np", **kwargs)
    assert out.images.shape == expected.shape == (kwargs.get("num_images_per_prompt", 1), 48, 80, 3)
    assert np.abs(out.images - expected).max() < TOLERANCE


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scheduler", ["euler_a", "dpm++2m"])
def test_upscale_with_other_schedulers(upscaler_dir, pipes, scheduler, backend):
    kwargs = dict(prompt=PROMPT, image=low_res_image(16, 16, seed=2), num_inference_steps=4, negative_prompt="noise")
    expected = reference(upscaler_dir, 11, scheduler, **kwargs)
    out = pipes[backend](seed=11, scheduler=scheduler, output_type="np", **kwargs)
    assert np.abs(out.images - expected).max() < TOLERANCE


def test_model_defaults_and_export_record(exported_upscaler, pipes):
    """Without steps or guidance the upscaler runs diffusers' defaults (75 steps, guidance 9), recorded by the export."""
    manifest = json.loads((exported_upscaler / "leansd.json").read_text())
    assert manifest["defaults"] == {"num_inference_steps": 75, "guidance_scale": 9.0}
    assert "class_labels" in manifest["io"]["unet"]["inputs"]
    assert (exported_upscaler / "low_res_scheduler" / "scheduler_config.json").is_file()
    out = pipes["onnxruntime"](PROMPT, image=low_res_image(8, 8), seed=0, num_inference_steps=2)
    assert (out.num_inference_steps, out.guidance_scale) == (2, 9.0)
    assert out.images[0].size == (32, 32)


def test_output_size_resizes_the_input(upscaler_dir, pipes):
    """width and height set the output size: the input is resized (bicubic, as diffusers) to a quarter of it."""
    image = low_res_image(20, 12)
    resized = image.resize((16, 16), Image.BICUBIC)
    expected = reference(upscaler_dir, 5, prompt=PROMPT, image=resized, num_inference_steps=3)
    out = pipes["openvino"](PROMPT, image=image, width=64, height=64, seed=5, num_inference_steps=3, output_type="np")
    assert np.abs(out.images - expected).max() < TOLERANCE


def test_bad_upscaler_settings_are_named(pipes, exported_tiny_sd):
    pipe = pipes["onnxruntime"]
    with pytest.raises(InvalidInputError, match="pass image, the picture to upscale"):
        pipe(PROMPT)
    with pytest.raises(InvalidInputError, match="strength does not apply to the x4 upscaler"):
        pipe(PROMPT, image=low_res_image(), strength=0.5)
    with pytest.raises(InvalidInputError, match="noise_level 90 is above this upscaler's maximum 60"):
        pipe(PROMPT, image=low_res_image(), noise_level=90)
    with pytest.raises(InvalidInputError, match="is smaller than 4x4"):
        pipe(PROMPT, image=low_res_image(3, 3))
    with pytest.raises(InvalidInputError, match="noise_level is a setting of the x4 upscaler"):
        leansd.load(exported_tiny_sd, backend="onnxruntime")(PROMPT, noise_level=20)


def test_export_refuses_what_the_upscaler_cannot_do(upscaler_dir, tmp_path):
    from leansd.export import export_model

    with pytest.raises(ExportError, match="int8 is not available for the x4 upscaler"):
        export_model(upscaler_dir, tmp_path / "int8", precisions=["fp32", "int8"], progress=False)
    with pytest.raises(ExportError, match="num_class_embeds"):
        export_model(upscaler_dir, tmp_path / "deep", deep_cache=True, progress=False)
    assert not (tmp_path / "int8").exists() and not (tmp_path / "deep").exists()


def test_sd_run_upscales_the_init_image(upscaler_dir, exported_upscaler, tmp_path):
    """`sd-run --model UPSCALER --init-image small.png` writes the 4x image diffusers makes with the same seed."""
    from tests.cli.helpers import assert_clean_error, sd_run

    low_res_image(16, 12).save(tmp_path / "small.png")
    args = ("a cat", "--model", str(exported_upscaler), "--steps", "3", "--seed", "4", "--backend", "onnxruntime")
    result = sd_run(*args, "--init-image", "small.png", "--noise-level", "30", "-o", "big.png", "-q", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    written = np.asarray(Image.open(tmp_path / "big.png").convert("RGB"), dtype=np.float32) / 255
    expected = reference(upscaler_dir, 4, prompt="a cat", image=Image.open(tmp_path / "small.png"), num_inference_steps=3,
                         noise_level=30)[0]
    assert written.shape == (48, 64, 3)
    assert np.abs(written - expected).max() <= 1 / 255 + TOLERANCE  # the PNG's 8-bit rounding
    assert_clean_error(sd_run(*args, "-o", "none.png", cwd=tmp_path), "x4 upscaler", "--init-image")


# ---------------------------------------------------------------- the single-file checkpoint (x4-upscaler-ema.safetensors)

def write_upscaler_checkpoint(diffusers_dir, path) -> None:
    """The tiny upscaler in Stability's single-file layout (LDM UNet with `label_emb`, OpenCLIP text encoder)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    from tests.export.compvis import unet_to_ldm, vae_to_ldm
    from tests.tiny_sd2 import text_encoder_to_open_clip

    unet = UNet2DConditionModel.from_pretrained(diffusers_dir, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(diffusers_dir, subfolder="vae")
    text = CLIPTextModel.from_pretrained(diffusers_dir, subfolder="text_encoder")
    state = {**unet_to_ldm(unet.state_dict(), dict(unet.config)), **vae_to_ldm(vae.state_dict(), dict(vae.config)),
             **text_encoder_to_open_clip(text.state_dict())}
    save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(path))


def test_single_file_upscaler_matches_diffusers(upscaler_dir, tmp_path):
    """sd-export converts the upscaler's single file (with the model's configs, as diffusers' from_single_file takes
    them) and the export upscales as diffusers' own conversion of the same file does."""
    import diffusers

    from leansd.export.cli import main

    ckpt = tmp_path / "x4-upscaler-tiny.safetensors"
    write_upscaler_checkpoint(upscaler_dir, ckpt)
    out = tmp_path / "exported"
    assert main([str(ckpt), str(out), "--config", str(upscaler_dir), "--quiet"]) == 0
    assert (out / "low_res_scheduler" / "scheduler_config.json").is_file()
    reference_pipe = diffusers.StableDiffusionUpscalePipeline.from_single_file(str(ckpt), config=str(upscaler_dir), local_files_only=True)
    reference_pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt=PROMPT, image=low_res_image(16, 12), num_inference_steps=4, noise_level=30)
    with torch.no_grad():
        expected = reference_pipe(generator=torch.Generator("cpu").manual_seed(8), output_type="np", **kwargs).images
    for backend in BACKENDS:
        got = leansd.load(out, backend=backend)(seed=8, output_type="np", **kwargs).images
        assert np.abs(got - expected).max() < TOLERANCE, backend


def test_shipped_upscaler_configs_fit_the_checkpoint_layout(tmp_path):
    """The shipped x4 configs against the released file's layout, by shapes (a full-size model on the meta device):
    diffusers recognises the layout as its `upscale` model, and sd-export picks those configs for it by itself."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    from transformers import CLIPTextConfig, CLIPTextModel

    from leansd.export import checkpoint_variant
    from leansd.export.singlefile import X4_CONFIG, assemble_config, check_checkpoint, shipped_config
    from tests.export.compvis import unet_to_ldm, vae_to_ldm
    from tests.tiny_sd2 import text_encoder_to_open_clip

    cfg = {n: json.loads((X4_CONFIG / n / "config.json").read_text()) for n in ("unet", "vae", "text_encoder")}
    with torch.device("meta"):
        state = {**unet_to_ldm(UNet2DConditionModel.from_config(cfg["unet"]).state_dict(), cfg["unet"]),
                 **vae_to_ldm(AutoencoderKL.from_config(cfg["vae"]).state_dict(), cfg["vae"]),
                 **text_encoder_to_open_clip(CLIPTextModel(CLIPTextConfig(**{**cfg["text_encoder"], "num_hidden_layers": 24})).state_dict())}
    assert infer_diffusers_model_type(state) == "upscale"
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    path = tmp_path / "x4-upscaler-ema.safetensors"
    assert shipped_config(path, shapes) == X4_CONFIG
    config = assemble_config(None, X4_CONFIG)
    try:
        assert check_checkpoint(path, shapes, config) is False
        assert (config / "low_res_scheduler" / "scheduler_config.json").is_file()
        variant = checkpoint_variant.decide(path, family="sd2", task="upscale", metadata={}, global_step=None,
                                            prediction_type=None, image_size=None, config_given=False)
        assert (variant.prediction_type, variant.image_size) == (None, None)  # the configs' v-prediction and size stand
        assert json.loads((config / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"
    finally:
        import shutil

        shutil.rmtree(config)
