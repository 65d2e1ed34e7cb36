"""LCM-distilled models (the guidance scale is a UNet input) against diffusers' LatentConsistencyModelPipeline.

The tiny model has LCM_Dreamshaper_v7's shape: a UNet with `time_cond_proj_dim` set, an LCMScheduler, saved as a
LatentConsistencyModelPipeline. It is exported with leansd's exporter and run on both backends; images must agree
within 1e-4 (max-abs, [0, 1]) with the same seed.

The guidance embedding is the one number leansd computes differently: exactly (float64, rounded once), where
diffusers computes it in float32 with PyTorch's float32 exp, whose last bit depends on the build and the CPU. The
first test measures both against diffusers' own formula run in float64; the pipeline tests give the reference that
float64 embedding (its own method, run in float64) so that everything else is compared at the usual tolerance.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

import leansd  # noqa: E402
from leansd.runtime import guidance_embedding  # noqa: E402
from tests.parity.test_inpaint import init_image  # noqa: E402
from tests.parity.test_pipeline import BACKENDS  # noqa: E402

pytestmark = pytest.mark.needs_torch

TOLERANCE = 1e-4
PROMPT = "a red circle on a blue background"
WIDTH = 32  # the tiny UNet's time_cond_proj_dim


@pytest.fixture(scope="module")
def lcm_dir(tmp_path_factory):
    from tests.tiny_models import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-lcm", time_cond_proj_dim=WIDTH)


@pytest.fixture(scope="module")
def exported_lcm(lcm_dir, tmp_path_factory):
    from leansd.export import export_model

    return export_model(lcm_dir, tmp_path_factory.mktemp("exports") / "tiny-lcm", progress=False, unet_parts=2, deep_cache=True)


@pytest.fixture(scope="module")
def pipes(exported_lcm):
    return {backend: leansd.load(exported_lcm, backend=backend) for backend in BACKENDS}


def _float64_embedding(method):
    """diffusers' `get_guidance_scale_embedding` run in float64, returned in the dtype asked for."""
    def embed(w, embedding_dim=512, dtype=torch.float32):
        return method(w.to(torch.float64), embedding_dim=embedding_dim, dtype=torch.float64).to(dtype)
    return embed


def reference_pipeline(folder, img2img: bool = False):
    """diffusers' LatentConsistencyModel(Img2Img)Pipeline on `folder`, its guidance embedding run in float64."""
    import diffusers

    cls = diffusers.LatentConsistencyModelImg2ImgPipeline if img2img else diffusers.LatentConsistencyModelPipeline
    pipe = cls.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.get_guidance_scale_embedding = _float64_embedding(pipe.get_guidance_scale_embedding)
    return pipe


def generate(pipe, seed: int, **kwargs) -> np.ndarray:
    with torch.no_grad():
        return pipe(generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **kwargs).images


def reference(folder, img2img: bool = False, **kwargs) -> np.ndarray:
    return generate(reference_pipeline(folder, img2img), **kwargs)


@pytest.mark.parametrize("scale", [1.0, 2.0, 8.5, 15.0])
@pytest.mark.parametrize("width", [256, 32, 7])
def test_the_guidance_embedding_is_diffusers_formula_computed_exactly(scale, width):
    from diffusers import LatentConsistencyModelPipeline

    method = LatentConsistencyModelPipeline.get_guidance_scale_embedding
    w = torch.full((3,), scale - 1.0)
    exact = method(None, w.to(torch.float64), embedding_dim=width, dtype=torch.float64).numpy()
    in_float32 = method(None, w, embedding_dim=width).numpy()
    ours = guidance_embedding.embed(scale, width, 3)
    assert ours.dtype == np.float32 and ours.shape == (3, width)
    assert np.abs(ours - exact).max() <= 1e-6
    # leansd is no further from diffusers' float32 result than that result is from its own exact value
    assert np.abs(ours - in_float32).max() <= np.abs(in_float32 - exact).max() + 1e-6


def test_the_export_takes_the_guidance_input_and_recommends_lcm_defaults(exported_lcm):
    manifest = json.loads((exported_lcm / "leansd.json").read_text())
    assert manifest["io"]["unet"]["inputs"][guidance_embedding.INPUT] == {"dtype": "float32", "shape": ["batch_size", WIDTH]}
    assert manifest["defaults"] == guidance_embedding.DEFAULTS
    for backend in ("onnx", "openvino"):  # checked against PyTorch, guidance input included (export's inputs)
        fp32 = manifest["parity"]["unet"][backend]["fp32"]
        assert fp32["max_rel"] <= fp32["tolerance"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("steps, scale, seed", [(4, None, 0), (2, 1.0, 1), (6, 3.0, 2)])
def test_txt2img_matches_diffusers(lcm_dir, pipes, backend, steps, scale, seed):
    kwargs = dict(num_inference_steps=steps, height=32, width=32) | ({} if scale is None else {"guidance_scale": scale})
    expected = reference(lcm_dir, prompt=PROMPT, seed=seed, **kwargs)
    got = pipes[backend](PROMPT, seed=seed, output_type="np", **kwargs)
    assert got.images.shape == expected.shape
    assert np.abs(got.images - expected).max() <= TOLERANCE, backend


def test_the_defaults_and_two_prompts_match_diffusers(lcm_dir, pipes):
    """No steps or guidance given: the folder's defaults (4 steps, guidance 8.5), as diffusers' pipeline's; a batch of
    two prompts with two images each gets one embedding row per image."""
    prompts = [PROMPT, "a green square"]
    expected = reference(lcm_dir, prompt=prompts, num_images_per_prompt=2, seed=3, height=32, width=32)
    got = pipes["onnxruntime"](prompts, num_images_per_prompt=2, seed=3, output_type="np", height=32, width=32)
    assert got.images.shape == expected.shape == (4, 32, 32, 3)
    assert np.abs(got.images - expected).max() <= TOLERANCE
    assert got.num_inference_steps == 4 and got.guidance_scale == 8.5


def test_img2img_matches_diffusers(lcm_dir, pipes):
    image = init_image()
    expected = reference(lcm_dir, img2img=True, prompt=PROMPT, image=image[None], strength=0.6, num_inference_steps=4,
                         guidance_scale=4.0, seed=4)
    got = pipes["openvino"](PROMPT, image=image, strength=0.6, num_inference_steps=4, guidance_scale=4.0, seed=4, output_type="np")
    assert np.abs(got.images - expected).max() <= TOLERANCE


@pytest.mark.parametrize("steps, strength", [(4, 0.6), (2, 0.3), (8, 0.9), (4, 0.08)])
def test_lcm_img2img_schedule_matches_diffusers(steps, strength):
    """LCM-distilled folders run image-to-image as LatentConsistencyModelImg2ImgPipeline: all steps, from the first
    `strength` of the distillation schedule (the scheduler's own `strength` argument)."""
    from diffusers import LCMScheduler

    from leansd.runtime.schedulers import get_scheduler

    from tests.tiny_models import SD1_SCHEDULER

    config = {**{k: v for k, v in SD1_SCHEDULER.items() if k != "skip_prk_steps"}, "set_alpha_to_one": True}
    reference = LCMScheduler(**config)
    reference.set_timesteps(steps, strength=strength)
    plan = get_scheduler("lcm", {"_class_name": "LCMScheduler", **config}).plan(steps, strength, strength_in_schedule=True)
    np.testing.assert_array_equal(plan.timesteps, reference.timesteps.numpy())


def test_a_strength_too_small_for_the_steps_is_refused_by_name(pipes):
    with pytest.raises(leansd.LeanSDError, match="strength 0.05 leaves 2 of the 50 distillation timesteps.*raise strength to 0.08"):
        pipes["onnxruntime"](PROMPT, image=init_image(), strength=0.05, num_inference_steps=4, output_type="latent")


def test_low_memory_streams_the_unet_parts_and_gives_the_same_image(exported_lcm, pipes):
    streamed = leansd.load(exported_lcm, backend="onnxruntime", low_memory=True)
    try:
        got = streamed(PROMPT, seed=5, output_type="np", height=32, width=32)
    finally:
        streamed.close()
    whole = pipes["onnxruntime"](PROMPT, seed=5, output_type="np", height=32, width=32)
    assert np.abs(got.images - whole.images).max() <= 1e-5


def test_int8_is_calibrated_and_gated_through_the_guidance_input(lcm_dir, tmp_path):
    """The int8 stage records its calibration and held-out generations with leansd's pipeline, which feeds the
    embedding: the int8 UNet keeps the input, passes its gate, and a generation with it is close to fp32's."""
    from leansd.export import export_model

    out = export_model(lcm_dir, tmp_path / "int8", backends="onnx", precisions="fp32,int8", progress=False)
    manifest = json.loads((out / "leansd.json").read_text())
    assert manifest["parity"]["unet"]["onnx"]["int8"]["passed"] and manifest["parity"]["pipeline"]["onnx"]["int8"]["images"]["psnr_db"] > 30
    import onnx

    unet = onnx.load(str(out / manifest["components"]["unet"]["onnx"]["int8"]), load_external_data=False)
    assert guidance_embedding.INPUT in [i.name for i in unet.graph.input]
    fp32 = leansd.load(out, backend="onnxruntime")(PROMPT, seed=7, output_type="np").images
    int8 = leansd.load(out, backend="onnxruntime", precision="int8")(PROMPT, seed=7, output_type="np").images
    psnr = 10 * np.log10(1.0 / np.mean((fp32 - int8) ** 2))
    assert 30 < psnr < 120, psnr  # int8 ran (not the fp32 files), and stayed close


def test_token_merging_matches_diffusers_with_tomesd(tmp_path_factory):
    """The token-merged graph takes the guidance input too: leansd's merged generation is diffusers' LCM pipeline
    patched by tomesd (the ToMe authors' package), on both backends."""
    from tests.export.fixtures import _export
    from tests.parity.test_token_merging import RATIO, tomesd_reference
    from tests.tiny_models import build_tiny_sd

    source = build_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-lcm-top", top_attention=True, seed=3, time_cond_proj_dim=WIDTH)
    merged = _export(source, tmp_path_factory.mktemp("exports") / "tiny-lcm-tome", token_merging=RATIO)
    kwargs = dict(prompt=PROMPT, num_inference_steps=4, guidance_scale=6.0, height=32, width=32)
    pipe = reference_pipeline(source)
    plain = generate(pipe, 8, **kwargs)
    expected = generate(tomesd_reference(pipe), 8, **kwargs)
    assert float(np.abs(expected - plain).max()) > 10 * TOLERANCE  # merging changes the image well beyond the tolerance
    for backend in BACKENDS:
        got = leansd.load(merged, backend=backend)(**kwargs, seed=8, token_merging=True, output_type="np").images
        assert float(np.abs(got - expected).max()) <= TOLERANCE, backend


@pytest.mark.parametrize("interval", [2, 3])
def test_feature_reuse_matches_diffusers_with_deepcache(lcm_dir, pipes, interval):
    """Both deep-cache parts take the guidance input: leansd's reuse equals DeepCache's own helper on diffusers' LCM
    pipeline (every step unguided, so features are reused on all of them)."""
    from tests.parity.test_deepcache import deepcache_reference

    kwargs = dict(prompt=PROMPT, num_inference_steps=6, guidance_scale=5.0, height=32, width=32)
    pipe = reference_pipeline(lcm_dir)
    plain = generate(pipe, 9, **kwargs)
    expected = generate(deepcache_reference(pipe, interval=interval), 9, **kwargs)
    assert float(np.abs(expected - plain).max()) > 10 * TOLERANCE  # reuse changes the image well beyond the tolerance
    for backend, leansd_pipe in pipes.items():
        got = leansd_pipe(**kwargs, seed=9, deep_cache=interval, output_type="np").images
        assert float(np.abs(got - expected).max()) <= TOLERANCE, backend


def test_sd_run_uses_the_folders_lcm_defaults_and_records_them(exported_lcm, pipes, tmp_path):
    from PIL import Image

    from tests.cli.helpers import sd_run

    result = sd_run(PROMPT, "--model", str(exported_lcm), "--seed", "6", "--backend", "onnxruntime", "-o", "out.png", "-q", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    with Image.open(tmp_path / "out.png") as img:
        text, pixels = img.text["parameters"], np.asarray(img.convert("RGB"))
    assert "Steps: 4" in text and "Sampler: LCM" in text and "CFG scale: 8.5" in text
    expected = pipes["onnxruntime"](PROMPT, seed=6).images[0]
    assert np.array_equal(pixels, np.asarray(expected))


def test_static_shapes_size_the_unet_for_one_call_per_image(lcm_dir, tmp_path):
    """A static export fixes the UNet's batch at the image batch (no guidance halves) and gives diffusers' images."""
    from tests.export.fixtures import _export

    folder = _export(lcm_dir, tmp_path / "static", static_shapes={"height": 32, "width": 32, "batch": 2})
    manifest = json.loads((folder / "leansd.json").read_text())
    assert manifest["static_shapes"] == {"height": 32, "width": 32, "batch": 2, "unet_batch": 2}
    assert manifest["io"]["unet"]["inputs"][guidance_embedding.INPUT]["shape"] == [2, WIDTH]
    assert manifest["io"]["unet"]["inputs"]["sample"]["shape"][0] == 2
    prompts = [PROMPT, "a green square"]
    expected = reference(lcm_dir, prompt=prompts, num_inference_steps=3, guidance_scale=7.0, seed=10)
    for backend in BACKENDS:
        got = leansd.load(folder, backend=backend)(prompts, num_inference_steps=3, guidance_scale=7.0, seed=10, output_type="np").images
        assert np.abs(got - expected).max() <= TOLERANCE, backend
