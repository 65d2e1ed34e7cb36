"""Inpainting against diffusers' StableDiffusionInpaintPipeline on the same tiny weights, images, masks and seeds.

Two kinds of model, each exported with leansd's exporter and run on both backends:
- an inpainting UNet (9 input channels: latents, mask, masked image latents), saved as a StableDiffusionInpaintPipeline;
- an ordinary 4-channel UNet, for which diffusers puts the image back outside the mask after every step.

With the same seed the images must agree within 1e-4 (max-abs, float images in [0, 1]), as the other pipeline
tests; the measured errors are printed at the end of the module (run with -s).
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

import leansd  # noqa: E402
from leansd.runtime.errors import InvalidInputError, LeanSDWarning  # noqa: E402
from tests.parity.test_pipeline import BACKENDS, PROMPT, SCHEDULERS  # noqa: E402

pytestmark = pytest.mark.needs_torch

TOLERANCE = 1e-4
SIZE = 32  # the tiny models' default size (UNet sample size 16 x VAE factor 2), diffusers' inpainting default
MEASURED: dict[str, float] = defaultdict(float)  # "model kind / backend" -> largest max-abs error seen


def init_image(seed: int = 1, height: int = SIZE, width: int = SIZE) -> np.ndarray:
    """A smooth picture with some texture, HxWx3 in [0, 1]."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    smooth = np.stack([x, y, 1 - x * y], axis=-1)
    return np.clip(smooth + 0.1 * rng.standard_normal((height, width, 3)), 0, 1).astype(np.float32)


def square_mask(height: int = SIZE, width: int = SIZE, box: tuple[int, int, int, int] = (6, 4, 22, 26)) -> Image.Image:
    """White (repaint) inside the box (top, left, bottom, right), black elsewhere, as an "L" image."""
    mask = np.zeros((height, width), np.uint8)
    top, left, bottom, right = box
    mask[top:bottom, left:right] = 255
    return Image.fromarray(mask, "L")


def transparent_mask(image: np.ndarray, mask: Image.Image) -> Image.Image:
    """The image itself as RGBA: transparent where `mask` is white, half transparent in a ring one pixel wide around
    it (a soft brush edge), opaque elsewhere."""
    white = np.asarray(mask) >= 128
    ring = (np.roll(white, 1, 0) | np.roll(white, -1, 0) | np.roll(white, 1, 1) | np.roll(white, -1, 1)) & ~white
    alpha = np.where(white, 0, np.where(ring, 128, 255)).astype(np.uint8)
    rgb = (image * 255).round().astype(np.uint8)
    return Image.fromarray(np.dstack([rgb, alpha]), "RGBA")


def reference_pipeline(folder, scheduler: str | None):
    import diffusers

    diffusers.utils.logging.disable_progress_bar()
    pipe = diffusers.StableDiffusionInpaintPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    if scheduler is not None:
        name, extra = SCHEDULERS[scheduler]
        pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config, **extra)
    return pipe


def reference_images(folder, scheduler: str | None, seed: int, **kwargs) -> np.ndarray:
    pipe = reference_pipeline(folder, scheduler)
    for key in ("latents", "masked_image_latents"):
        if isinstance(kwargs.get(key), np.ndarray):
            kwargs[key] = torch.from_numpy(kwargs[key])
    with torch.no_grad():
        return pipe(generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **kwargs).images


def check(kind: str, pipes: dict, expected: np.ndarray, scheduler: str | None, seed: int, **kwargs) -> None:
    """Every backend's images equal diffusers' `expected` within the tolerance."""
    for backend, pipe in pipes.items():
        got = pipe(**kwargs, seed=seed, scheduler=scheduler, output_type="np").images
        assert got.shape == expected.shape
        err = float(np.abs(got - expected).max())
        MEASURED[f"{kind} / {backend}"] = max(MEASURED[f"{kind} / {backend}"], err)
        assert err < TOLERANCE, f"{kind} {scheduler} on {backend}: max-abs {err:.2e}"


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    for key, err in sorted(MEASURED.items()):
        print(f"\ninpainting parity, {key}: max-abs {err:.2e}")


@pytest.fixture(scope="module")
def inpaint_pipes(exported_tiny_sd_inpaint):
    return {backend: leansd.load(exported_tiny_sd_inpaint, backend=backend) for backend in BACKENDS}


@pytest.fixture(scope="module")
def plain_pipes(exported_tiny_sd):
    return {backend: leansd.load(exported_tiny_sd, backend=backend) for backend in BACKENDS}


@pytest.fixture(params=["inpainting UNet", "4-channel UNet"])
def model(request, tiny_sd_inpaint_dir, tiny_sd_dir):
    """(kind, diffusers folder, leansd pipelines per backend) for each kind of model."""
    if request.param == "inpainting UNet":
        return request.param, tiny_sd_inpaint_dir, request.getfixturevalue("inpaint_pipes")
    return request.param, tiny_sd_dir, request.getfixturevalue("plain_pipes")


# ---------------------------------------------------------------- parity


@pytest.mark.parametrize("scheduler, negative", [("pndm", None), ("euler_a", "blurry, a triangle"), ("dpm++2m_karras", None),
                                                 ("ddim", "a green square")])
def test_inpainting_matches_diffusers(model, scheduler, negative):
    kind, folder, pipes = model
    image, mask = init_image(), square_mask()
    kwargs = dict(prompt=PROMPT, negative_prompt=negative, num_inference_steps=4, guidance_scale=7.5, height=SIZE, width=SIZE)
    expected = reference_images(folder, scheduler, seed=7, image=image[None], mask_image=mask, **kwargs)
    check(kind, pipes, expected, scheduler, 7, image=image, mask_image=mask, **kwargs)


@pytest.mark.parametrize("scheduler, strength", [("pndm", 0.6), ("euler", 0.75), ("lms", 0.5)])
def test_strength_below_one(model, scheduler, strength):
    kind, folder, pipes = model
    image, mask = init_image(2), square_mask(box=(0, 8, 20, 32))
    kwargs = dict(prompt=PROMPT, negative_prompt="blurry", num_inference_steps=5, guidance_scale=6.0, strength=strength)
    expected = reference_images(folder, scheduler, seed=3, image=image[None], mask_image=mask, **kwargs)
    check(kind, pipes, expected, scheduler, 3, image=image, mask_image=mask, **kwargs)


def test_transparent_mask_is_the_alpha_channel(model):
    """leansd takes the RGBA picture itself as the mask (alpha < 255 = repaint); diffusers the equivalent grey mask."""
    kind, folder, pipes = model
    image, mask = init_image(3), square_mask(box=(10, 10, 30, 24))
    rgba = transparent_mask(image, mask)
    grey = Image.fromarray(np.where(np.asarray(rgba)[..., 3] < 255, 255, 0).astype(np.uint8), "L")
    assert np.asarray(grey).sum() > np.asarray(mask).sum()  # the half-transparent edge counts too
    kwargs = dict(prompt=PROMPT, num_inference_steps=4, guidance_scale=7.5)
    expected = reference_images(folder, "euler_a", seed=5, image=image[None], mask_image=grey, **kwargs)
    check(kind, pipes, expected, "euler_a", 5, image=image, mask_image=rgba, **kwargs)


def test_masked_image_latents_given(model):
    """Caller-supplied masked image latents replace the encoded masked image (and its generator draw)."""
    kind, folder, pipes = model
    latents = np.random.default_rng(4).standard_normal((1, 4, SIZE // 2, SIZE // 2)).astype(np.float32)
    image, mask = init_image(4), square_mask()
    kwargs = dict(prompt=PROMPT, negative_prompt="blurry", num_inference_steps=4, guidance_scale=7.5)
    expected = reference_images(folder, "euler_a", seed=9, image=image[None], mask_image=mask, masked_image_latents=latents, **kwargs)
    check(kind, pipes, expected, "euler_a", 9, image=image, mask_image=mask, masked_image_latents=latents, **kwargs)


def test_batches_array_masks_and_caller_latents(model):
    """Two prompts x two images each; a smaller array mask (resized with nearest neighbours); the caller's latents;
    and no guidance."""
    kind, folder, pipes = model
    image = init_image(5)
    mask = np.zeros((16, 16), np.float32)
    mask[3:12, 5:14] = 0.8
    kwargs = dict(prompt=[PROMPT, "a green square"], negative_prompt=["blurry", "a triangle"], num_images_per_prompt=2,
                  num_inference_steps=3, guidance_scale=5.0)
    expected = reference_images(folder, "dpm++2m", seed=11, image=image[None], mask_image=mask[None], **kwargs)
    assert expected.shape == (4, SIZE, SIZE, 3)
    check(kind, pipes, expected, "dpm++2m", 11, image=image, mask_image=mask, **kwargs)
    latents = np.random.default_rng(6).standard_normal((1, 4, SIZE // 2, SIZE // 2)).astype(np.float32)
    kwargs = dict(prompt=PROMPT, num_inference_steps=3, guidance_scale=1.0)
    expected = reference_images(folder, "euler_a", seed=2, image=image[None], mask_image=mask[None], latents=latents, **kwargs)
    check(kind, pipes, expected, "euler_a", 2, image=image, mask_image=mask, latents=latents, **kwargs)


def test_image_and_mask_resized_to_the_output_size(model):
    """A PIL image and a PIL mask of other sizes are resized (Lanczos) to the height and width asked for."""
    kind, folder, pipes = model
    image = Image.fromarray((init_image(6, 40, 48) * 255).round().astype(np.uint8))
    mask = square_mask(20, 28, box=(4, 6, 16, 20))
    kwargs = dict(prompt=PROMPT, num_inference_steps=3, guidance_scale=7.5, height=SIZE, width=SIZE)
    expected = reference_images(folder, "pndm", seed=13, image=image, mask_image=mask, **kwargs)
    with pytest.warns(LeanSDWarning, match="the mask is 28x20 and the output 32x32: the mask is stretched"):
        check(kind, pipes, expected, "pndm", 13, image=image, mask_image=mask, **kwargs)


# ---------------------------------------------------------------- behaviour


def test_output_takes_the_image_size_and_strength_defaults_to_one(plain_pipes):
    pipe = plain_pipes["onnxruntime"]
    out = pipe(PROMPT, image=init_image(7, 24, 40), mask_image=square_mask(24, 40), num_inference_steps=2, seed=1, output_type="np")
    assert out.images.shape == (1, 24, 40, 3) and out.settings.strength == 1.0
    img2img = pipe(PROMPT, image=init_image(7), num_inference_steps=5, seed=1, output_type="latent")
    assert img2img.settings.strength == 0.8  # image-to-image keeps diffusers' img2img default


def test_ordinary_unet_keeps_the_image_outside_the_mask(plain_pipes):
    """Outside the mask the final latents are the image's own (diffusers' blend puts them back after the last step)."""
    pipe = plain_pipes["onnxruntime"]
    image = init_image(8)
    mask = np.zeros((SIZE, SIZE), np.float32)
    mask[:, SIZE // 2 :] = 1
    a, b = (pipe(PROMPT, image=image, mask_image=mask, num_inference_steps=3, seed=s, output_type="latent").images for s in (1, 2))
    # Different seeds give different encodings of the image (it is sampled), but within the mask they differ far more.
    keep, repaint = np.abs(a - b)[..., : SIZE // 4], np.abs(a - b)[..., SIZE // 4 :]
    assert keep.mean() < 0.2 * repaint.mean()


def test_inpainting_model_needs_a_mask(inpaint_pipes):
    pipe = inpaint_pipes["onnxruntime"]
    with pytest.raises(InvalidInputError, match="is an inpainting model .*pass image and mask_image"):
        pipe(PROMPT, num_inference_steps=2)
    with pytest.raises(InvalidInputError, match="is an inpainting model"):
        pipe(PROMPT, image=init_image(), num_inference_steps=2)


@pytest.mark.parametrize("settings, message", [
    (dict(mask_image=square_mask()), "mask_image needs image"),
    (dict(image=init_image(), mask_image=square_mask(), masked_image_latents=np.zeros((1, 4, 8, 8), np.float32)),
     r"masked_image_latents have shape \(1, 4, 8, 8\); expected \(N, 4, 16, 16\)"),
    (dict(image=init_image(), masked_image_latents=np.zeros((1, 4, 16, 16), np.float32)), "masked_image_latents are for inpainting"),
    (dict(image=init_image(), mask_image=np.zeros((2, 3, 4, 5))), r"mask array has shape \(2, 3, 4, 5\)"),
    (dict(image=init_image(), mask_image=np.full((32, 32), np.nan)), "mask_image must be an array of finite real numbers"),
    (dict(image=init_image(), mask_image="/nonexistent/mask.png"), "mask image /nonexistent/mask.png does not exist"),
    (dict(image=init_image(), mask_image=square_mask(), strength=0.0), r"strength must be in \(0, 1\]"),
])
def test_bad_inpainting_inputs_are_one_line_errors(inpaint_pipes, settings, message):
    with pytest.raises(InvalidInputError, match=message) as err:
        inpaint_pipes["onnxruntime"](PROMPT, num_inference_steps=2, **settings)
    assert "\n" not in str(err.value)


def test_nearest_resize_equals_torch_interpolate():
    from leansd.runtime.image import nearest_resize

    rng = np.random.default_rng(0)
    for (h, w), (oh, ow) in [((37, 64), (64, 23)), ((50, 75), (75, 50)), ((64, 64), (8, 8)), ((13, 29), (100, 7)), ((3, 3), (999, 1000))]:
        x = rng.standard_normal((2, 1, h, w)).astype(np.float32)
        want = torch.nn.functional.interpolate(torch.from_numpy(x), size=(oh, ow)).numpy()
        assert np.array_equal(nearest_resize(x, oh, ow), want), ((h, w), (oh, ow))
