"""The tiny VAE decoder (TAESD, diffusers' `AutoencoderTiny`): exported beside the model's VAE with
`sd-export --tiny-vae`, then used by the runtime for the final images and for step previews.

Parity: whole generations against diffusers' `StableDiffusionPipeline` whose `vae` is the same
`AutoencoderTiny` (how TAESD is used with diffusers), and previews against `AutoencoderTiny.decode`.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

import leansd  # noqa: E402
from leansd.runtime.errors import InvalidInputError, ModelFolderError  # noqa: E402
from tests.parity.test_pipeline import reference_images, reference_pipeline  # noqa: E402

pytestmark = pytest.mark.needs_torch

PROMPT = "a red circle on a blue background"
BACKENDS = ["onnxruntime", "openvino"]


def build_tiny_autoencoder(path, *, blocks: int = 2, latent_channels: int = 4, seed: int = 3):
    """A small random `AutoencoderTiny` (TAESD's architecture, narrow) saved at `path`; factor 2 ** (blocks - 1)."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    model = AutoencoderTiny(
        encoder_block_out_channels=(8,) * blocks, decoder_block_out_channels=(8,) * blocks,
        num_encoder_blocks=(1,) * blocks, num_decoder_blocks=(1,) * blocks, latent_channels=latent_channels,
    )
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def taesd_dir(tmp_path_factory):
    return build_tiny_autoencoder(tmp_path_factory.mktemp("taesd") / "taesd")


@pytest.fixture(scope="module")
def exported_with_tiny_vae(tiny_sd_dir, taesd_dir, tmp_path_factory):
    from tests.export.fixtures import _export

    return _export(tiny_sd_dir, tmp_path_factory.mktemp("exports") / "tiny-sd-taesd", tiny_vae=taesd_dir)


@pytest.fixture(scope="module")
def pipes(exported_with_tiny_vae):
    return {backend: leansd.load(exported_with_tiny_vae, backend=backend, tiny_vae=True) for backend in BACKENDS}


def test_export_records_and_verifies_the_tiny_decoder(exported_with_tiny_vae):
    manifest = json.loads((exported_with_tiny_vae / "leansd.json").read_text())
    entry = manifest["components"]["vae_decoder_tiny"]
    assert set(entry) == {"onnx", "openvino"}
    for backend in ("onnx", "openvino"):
        assert (exported_with_tiny_vae / entry[backend]["fp32"]).is_file()
        assert manifest["parity"]["vae_decoder_tiny"][backend]["fp32"]["max_rel"] <= 1e-3
    config = json.loads((exported_with_tiny_vae / "vae_decoder_tiny" / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderTiny"
    assert "vae_decoder_tiny/model.onnx" in manifest["files"]


@pytest.mark.parametrize("scheduler", ["ddim", "euler_a"])
def test_generation_with_tiny_vae_matches_diffusers(tiny_sd_dir, taesd_dir, pipes, scheduler):
    from diffusers import AutoencoderTiny

    kwargs = dict(prompt=PROMPT, num_inference_steps=4, guidance_scale=7.5, height=32, width=32)
    reference = reference_pipeline(tiny_sd_dir, scheduler)
    full = reference_images(reference, seed=9, **kwargs)
    reference.vae = AutoencoderTiny.from_pretrained(taesd_dir).eval()
    expected = reference_images(reference, seed=9, **kwargs)
    assert float(np.abs(expected - full).max()) > 1e-2  # a different decoder: the check below means something
    for backend, pipe in pipes.items():
        got = pipe(**kwargs, seed=9, scheduler=scheduler, output_type="np").images
        err = float(np.abs(got - expected).max())
        assert err < 1e-4, f"{backend}, {scheduler}: max-abs {err:.2e}"
        # Per call, the model's own decoder is still there and still matches diffusers' own VAE.
        own = pipe(**kwargs, seed=9, scheduler=scheduler, output_type="np", tiny_vae=False).images
        assert float(np.abs(own - full).max()) < 1e-4


def test_previews_decode_every_step_estimate_like_autoencoder_tiny(taesd_dir, pipes):
    from diffusers import AutoencoderTiny

    tiny = AutoencoderTiny.from_pretrained(taesd_dir).eval()
    pipe = pipes["onnxruntime"]
    seen = []

    def callback(step, total, latents, denoised):
        seen.append((denoised.copy(), pipe.preview(denoised)))

    pipe(PROMPT, num_inference_steps=3, height=32, width=32, seed=2, scheduler="ddim", callback=callback)
    assert len(seen) == 3
    for denoised, preview in seen:
        with torch.no_grad():
            expected = tiny.decode(torch.from_numpy(denoised)).sample.numpy()
        expected = np.clip(expected / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
        assert preview.shape == (1, 32, 32, 3)
        assert float(np.abs(preview - expected).max()) < 1e-4
    with pytest.raises(InvalidInputError, match="preview takes latents"):
        pipe.preview(np.zeros((1, 3, 4, 4), np.float32))


@pytest.mark.slow
def test_an_openvino_int8_run_decodes_with_the_int8_files_float_precision(exported_with_tiny_vae, tmp_path):
    """The tiny decoder has fp32 files only; an int8 run computes it as the int8 files' float operations (bf16 where
    the CPU has it natively, else f32), and the image stays close to the exact run's."""
    import shutil

    from leansd.export.int8 import add_int8
    from leansd.runtime import cpu_features

    folder = shutil.copytree(exported_with_tiny_vae, tmp_path / "model")
    add_int8(folder, backend="openvino", unet_recipe="weights", progress=False)  # weights: no calibration, quick
    images = {}
    for precision in ("fp32", "int8"):
        pipe = leansd.load(folder, backend="openvino", precision=precision, tiny_vae=True)
        images[precision] = pipe(PROMPT, num_inference_steps=3, height=32, width=32, seed=5, output_type="np").images
        hint = pipe.models.tiny_vae_decoder.session.open()._config["INFERENCE_PRECISION_HINT"]
        assert hint == ("bf16" if precision == "int8" and cpu_features.openvino_bf16() else "f32"), (precision, hint)
        pipe.close()
    psnr = 20 * np.log10(1.0 / np.sqrt(np.mean((images["int8"] - images["fp32"]) ** 2)))
    assert psnr > 28, psnr


def test_folders_without_a_tiny_decoder_say_how_to_get_one(exported_tiny_sd):
    with pytest.raises(ModelFolderError, match="--tiny-vae"):
        leansd.load(exported_tiny_sd, backend="onnxruntime", tiny_vae=True)
    pipe = leansd.load(exported_tiny_sd, backend="onnxruntime")
    with pytest.raises(ModelFolderError, match="--tiny-vae"):
        pipe(PROMPT, num_inference_steps=1, height=32, width=32, tiny_vae=True)
    # Previews fall back to the model's own decoder.
    assert pipe.preview(np.zeros((1, 4, 16, 16), np.float32)).shape == (1, 32, 32, 3)


def test_incompatible_or_missing_tiny_vae_is_refused_before_anything_is_written(tiny_sd_dir, tmp_path):
    from leansd.export import ExportError, export_model

    wrong = build_tiny_autoencoder(tmp_path / "taesd-f4", blocks=3)  # factor 4; the model's VAE has factor 2
    with pytest.raises(ExportError, match="factor 4.*factor 2"):
        export_model(tiny_sd_dir, tmp_path / "out", tiny_vae=wrong, progress=False)
    with pytest.raises(ExportError, match="no such folder"):
        export_model(tiny_sd_dir, tmp_path / "out", tiny_vae=tmp_path / "missing", progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_tiny_vae_and_preview(exported_with_tiny_vae, tmp_path):
    from PIL import Image

    from leansd.runtime.cli import main

    out, preview = tmp_path / "out.png", tmp_path / "preview.png"
    code = main([PROMPT, "--model", str(exported_with_tiny_vae), "--backend", "onnxruntime", "--steps", "2", "--width", "32",
                 "--height", "32", "--seed", "4", "--tiny-vae", "--preview", str(preview), "-o", str(out), "-q"])
    assert code == 0
    assert Image.open(preview).size == (32, 32)
    image = Image.open(out)
    assert "VAE: tiny (TAESD)" in image.text["parameters"]
