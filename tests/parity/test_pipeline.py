"""Whole pipelines against diffusers on the same tiny weights, prompts and seeds.

leansd runs the exported ONNX / OpenVINO files; diffusers runs the PyTorch originals loaded from the saved
folder. With the same seed the images must agree within 1e-4 (max-abs, float images in [0, 1]): the measured
error is about 1e-6.
"""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

import leansd  # noqa: E402
from leansd.runtime.errors import Cancelled, InvalidInputError  # noqa: E402

pytestmark = pytest.mark.needs_torch

TOLERANCE = 1e-4  # measured errors are about 1e-6 (float rounding of the exported graphs)
PROMPT = "a red circle on a blue background"
# leansd alias -> (diffusers class name, extra config)
SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {}),
    "dpm++2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "lms": ("LMSDiscreteScheduler", {}),
    "lcm": ("LCMScheduler", {}),
}
BACKENDS = ["onnxruntime", "openvino"]


def reference_pipeline(folder, scheduler: str | None = None, img2img: bool = False):
    import diffusers

    cls = diffusers.StableDiffusionImg2ImgPipeline if img2img else diffusers.StableDiffusionPipeline
    pipe = cls.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    if scheduler is not None:
        name, extra = SCHEDULERS[scheduler]
        pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config, **extra)
    return pipe


def reference_images(pipe, seed: int, **kwargs) -> np.ndarray:
    with torch.no_grad():
        return pipe(generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **kwargs).images


@pytest.fixture(scope="module")
def pipes(exported_tiny_sd):
    return {backend: leansd.load(exported_tiny_sd, backend=backend) for backend in BACKENDS}


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_txt2img_matches_diffusers_for_every_scheduler(tiny_sd_dir, pipes, scheduler):
    kwargs = dict(prompt=PROMPT, num_inference_steps=4, guidance_scale=7.5, height=32, width=32)
    expected = reference_images(reference_pipeline(tiny_sd_dir, scheduler), seed=7, **kwargs)
    for backend, pipe in pipes.items():
        got = pipe(**kwargs, seed=7, scheduler=scheduler, output_type="np").images
        assert got.shape == expected.shape == (1, 32, 32, 3)
        err = float(np.abs(got - expected).max())
        assert err < TOLERANCE, f"{scheduler} on {backend}: max-abs {err:.2e}"


def test_model_default_scheduler_batches_and_negative_prompts(tiny_sd_dir, pipes):
    kwargs = dict(
        prompt=["a red circle", "a green square on a white background"],
        negative_prompt=["blurry", "a triangle"],
        num_images_per_prompt=2,
        num_inference_steps=3,
        guidance_scale=5.0,
        height=24,
        width=40,
    )
    expected = reference_images(reference_pipeline(tiny_sd_dir), seed=3, **kwargs)
    assert expected.shape == (4, 24, 40, 3)
    for backend, pipe in pipes.items():
        got = pipe(**kwargs, seed=3, output_type="np").images
        assert float(np.abs(got - expected).max()) < TOLERANCE, backend


def test_no_guidance_and_user_latents(tiny_sd_dir, pipes):
    latents = np.random.default_rng(0).standard_normal((1, 4, 16, 16)).astype(np.float32)
    kwargs = dict(prompt=PROMPT, num_inference_steps=3, guidance_scale=1.0, height=32, width=32)
    expected = reference_images(reference_pipeline(tiny_sd_dir, "euler"), seed=0, latents=torch.from_numpy(latents), **kwargs)
    for backend, pipe in pipes.items():
        got = pipe(**kwargs, latents=latents, scheduler="euler", output_type="np").images
        assert float(np.abs(got - expected).max()) < TOLERANCE, backend


@pytest.mark.parametrize("scheduler", ["pndm", "euler_a", "dpm++2m"])
def test_img2img_matches_diffusers(tiny_sd_dir, pipes, scheduler):
    init = np.random.default_rng(1).uniform(0, 1, (32, 32, 3)).astype(np.float32)
    kwargs = dict(prompt=PROMPT, num_inference_steps=5, guidance_scale=7.5, strength=0.6)
    expected = reference_images(reference_pipeline(tiny_sd_dir, scheduler, img2img=True), seed=11, image=init[None], **kwargs)
    for backend, pipe in pipes.items():
        got = pipe(**kwargs, image=init, seed=11, scheduler=scheduler, output_type="np").images
        assert got.shape == expected.shape
        err = float(np.abs(got - expected).max())
        assert err < TOLERANCE, f"img2img {scheduler} on {backend}: max-abs {err:.2e}"


def test_vae_factor_4_and_v_prediction(tiny_sd_vae4_vpred_dir, exported_tiny_sd_vae4_vpred):
    kwargs = dict(prompt=PROMPT, num_inference_steps=4, guidance_scale=6.0, height=32, width=48)
    for scheduler in ("ddim", "euler_a", "dpm++2m_karras"):
        expected = reference_images(reference_pipeline(tiny_sd_vae4_vpred_dir, scheduler), seed=5, **kwargs)
        assert expected.shape == (1, 32, 48, 3)
        for backend in BACKENDS:
            pipe = leansd.load(exported_tiny_sd_vae4_vpred, backend=backend)
            assert pipe.vae_scale_factor == 4
            got = pipe(**kwargs, seed=5, scheduler=scheduler, output_type="np").images
            err = float(np.abs(got - expected).max())
            assert err < TOLERANCE, f"{scheduler} on {backend}: max-abs {err:.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_low_memory_matches_diffusers_and_releases_models(tiny_sd_dir, exported_tiny_sd, backend):
    # Low-memory mode loads models on demand and runs the two guidance halves as separate UNet calls.
    kwargs = dict(prompt=["a red circle", "a blue square"], negative_prompt=["", "a triangle"], num_inference_steps=4,
                  guidance_scale=7.5, height=32, width=32)
    expected = reference_images(reference_pipeline(tiny_sd_dir, "dpm++2m"), seed=4, **kwargs)
    pipe = leansd.load(exported_tiny_sd, backend=backend, low_memory=True)
    assert pipe.models.denoiser.split_guidance and not pipe.unet.session.loaded
    batches = []
    original = pipe.unet.predict
    pipe.unet.predict = lambda x, t, inputs: batches.append(x.shape[0]) or original(x, t, inputs)
    got = pipe(**kwargs, seed=4, scheduler="dpm++2m", output_type="np").images
    assert batches == [2] * 8  # two calls of one guidance half (2 prompts) per step
    err = float(np.abs(got - expected).max())
    assert err < TOLERANCE, f"low memory on {backend}: max-abs {err:.2e}"
    assert not any(m.session.loaded for m in (*pipe.models.prompt_encoder.encoders, pipe.unet, pipe.models.vae_decoder))


@pytest.mark.parametrize("size", [(64, 48), (80, 80)])
def test_tiled_vae_decode_matches_diffusers_tiling(tiny_sd_dir, exported_tiny_sd, size):
    # The tiny VAE's native size is 32 px, so these sizes are decoded in several overlapping tiles.
    height, width = size
    kwargs = dict(prompt=PROMPT, num_inference_steps=2, guidance_scale=7.5, height=height, width=width)
    reference = reference_pipeline(tiny_sd_dir, "ddim")
    reference.vae.enable_tiling()
    expected = reference_images(reference, seed=9, **kwargs)
    untiled = reference_images(reference_pipeline(tiny_sd_dir, "ddim"), seed=9, **kwargs)
    assert float(np.abs(expected - untiled).max()) > 1e-3  # tiling changes the image, so the check below means something
    for backend in BACKENDS:
        pipe = leansd.load(exported_tiny_sd, backend=backend, vae_tiling=True)
        got = pipe(**kwargs, seed=9, scheduler="ddim", output_type="np").images
        err = float(np.abs(got - expected).max())
        assert err < TOLERANCE, f"tiled decode on {backend} at {width}x{height}: max-abs {err:.2e}"


def test_output_types_and_callback(pipes):
    pipe = pipes["onnxruntime"]
    seen = []
    # Euler makes one UNet call per step (PLMS makes one more than the steps asked for).
    out = pipe(PROMPT, num_inference_steps=3, height=32, width=32, seed=1, output_type="latent", scheduler="euler",
               callback=lambda i, n, lat, den: seen.append((i, n, lat.shape, den.shape)))
    assert out.images.shape == (1, 4, 16, 16)
    assert seen == [(i, 3, (1, 4, 16, 16), (1, 4, 16, 16)) for i in range(3)]
    pil = pipe(PROMPT, num_inference_steps=3, height=32, width=32, seed=1).images
    as_np = pipe(PROMPT, num_inference_steps=3, height=32, width=32, seed=1, output_type="np").images
    assert pil[0].size == (32, 32)
    assert np.array_equal(np.asarray(pil[0]), (as_np[0] * 255).round().astype(np.uint8))
    with pytest.raises(Cancelled, match="after step 2 of 3"):
        pipe(PROMPT, num_inference_steps=3, height=32, width=32, seed=1, scheduler="euler",
             callback=lambda i, n, lat, den: i < 1)


def test_bad_arguments_are_named(pipes):
    pipe = pipes["onnxruntime"]
    with pytest.raises(InvalidInputError, match="height 33 is not a positive multiple of 2"):
        pipe(PROMPT, height=33, width=32)
    with pytest.raises(InvalidInputError, match="strength"):
        pipe(PROMPT, image=np.zeros((32, 32, 3), np.float32), strength=1.5)
    with pytest.raises(InvalidInputError, match="latents have shape"):
        pipe(PROMPT, height=32, width=32, latents=np.zeros((1, 4, 8, 8), np.float32))
    with pytest.raises(ValueError, match="scheduler"):
        pipe(PROMPT, height=32, width=32, scheduler="no-such-sampler")
    with pytest.raises(InvalidInputError, match="negative_prompt has 2 entries"):
        pipe(PROMPT, negative_prompt=["a", "b"], height=32, width=32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ddim_eta_matches_diffusers(tiny_sd_dir, pipes, backend):
    # eta > 0 draws fresh noise every step, in the order diffusers' DDIMScheduler.step draws it.
    kwargs = dict(prompt=PROMPT, num_inference_steps=4, guidance_scale=7.5, height=32, width=32, eta=0.6)
    expected = reference_images(reference_pipeline(tiny_sd_dir, "ddim"), seed=8, **kwargs)
    got = pipes[backend](**kwargs, seed=8, scheduler="ddim", output_type="np").images
    plain = pipes[backend](**{**kwargs, "eta": 0.0}, seed=8, scheduler="ddim", output_type="np").images
    err = float(np.abs(got - expected).max())
    assert err < TOLERANCE, f"DDIM eta on {backend}: max-abs {err:.2e}"
    assert float(np.abs(got - plain).max()) > 10 * TOLERANCE  # eta changed the image by far more than the tolerance


def test_a_smaller_tile_matches_diffusers_tiling_with_that_tile(tiny_sd_dir, exported_tiny_sd):
    """Low-memory mode caps the tile at 512 pixels (SDXL's native 1024 would decode 1024x1024 whole): the tile size
    is diffusers' `tile_sample_min_size`, checked here at 16 pixels on the tiny VAE (native 32)."""
    from diffusers import AutoencoderKL

    from leansd.runtime.memory import MemoryPolicy

    assert MemoryPolicy(low_memory=True).vae_tile_size(1024) == 512 and MemoryPolicy(low_memory=True).vae_tile_size(32) == 32
    assert MemoryPolicy(low_memory=False).vae_tile_size(1024) == 1024
    vae = AutoencoderKL.from_pretrained(tiny_sd_dir, subfolder="vae").eval()
    vae.enable_tiling()
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    vae.tile_sample_min_size, vae.tile_latent_min_size = 16, 16 // scale
    latents = torch.randn(1, vae.config.latent_channels, 40 // scale, 56 // scale, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = vae.decode(latents / vae.config.scaling_factor).sample.numpy()
    for backend in BACKENDS:
        decoder = leansd.load(exported_tiny_sd, backend=backend).models.vae_decoder
        got = decoder.decode(latents.numpy(), tiled=True, tile_size=16)
        untiled = decoder.decode(latents.numpy())
        assert float(np.abs(untiled - expected).max()) > 1e-3  # 16-pixel tiles change the image
        err = float(np.abs(got - expected).max())
        assert err < TOLERANCE * 2, f"16-pixel tiles on {backend}: max-abs {err:.2e}"
