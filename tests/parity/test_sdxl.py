"""SDXL against diffusers' StableDiffusionXL pipelines on the same tiny weights, latents and seeds.

Tiny models with SDXL's architecture (tests/tiny_sdxl.py): the base model (two text encoders, pooled embedding
and time ids), the refiner (the second encoder only, aesthetic-score time ids), SDXL-Turbo's scheduler and a
9-channel inpainting model, each exported with leansd's exporter. Images must agree within 1e-4 (max-abs, [0, 1]);
the base-to-refiner hand-off is checked on the latents too. diffusers' own invisible watermark is turned off in the
reference (leansd marks images only when asked).
"""
from __future__ import annotations

import functools
import json

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

import leansd  # noqa: E402
from leansd.runtime.errors import InvalidInputError  # noqa: E402
from tests.parity.test_pipeline import BACKENDS  # noqa: E402

pytestmark = pytest.mark.needs_torch

TOLERANCE = 1e-4
LATENT_TOLERANCE = 1e-4  # relative to the latents' largest magnitude
SIZE = 32
PROMPT = "a red circle on a blue background"


def build_and_export(tmp_path_factory, name: str, backends: str = "all", **kwargs):
    from leansd.export import export_model
    from tests.tiny_sdxl import build_tiny_sdxl

    source = build_tiny_sdxl(tmp_path_factory.mktemp("models") / name, **kwargs)
    return source, export_model(source, tmp_path_factory.mktemp("exports") / name, backends=backends, progress=False)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_and_export(tmp_path_factory, "tiny-sdxl")


@pytest.fixture(scope="module")
def refiner(tmp_path_factory):
    return build_and_export(tmp_path_factory, "tiny-sdxl-refiner", refiner=True)


@pytest.fixture(scope="module")
def inpaint_model(tmp_path_factory):
    return build_and_export(tmp_path_factory, "tiny-sdxl-inpaint", inpainting=True)


@functools.cache
def reference(folder, kind: str = "base"):
    import diffusers

    cls = {"base": diffusers.StableDiffusionXLPipeline, "img2img": diffusers.StableDiffusionXLImg2ImgPipeline,
           "inpaint": diffusers.StableDiffusionXLInpaintPipeline}[kind]
    pipe = cls.from_pretrained(folder, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@functools.cache
def loaded(folder, backend: str) -> leansd.Pipeline:
    return leansd.load(folder, backend=backend)


def generator(seed: int):
    return torch.Generator("cpu").manual_seed(seed)


def as_array(images) -> np.ndarray:
    return images.numpy() if hasattr(images, "numpy") else np.asarray(images)


BASE_CASES = {
    "defaults (guidance 5, zeroed negative)": {},
    "negative prompt and prompt_2": {"negative_prompt": "blurry", "prompt_2": "a blue square", "negative_prompt_2": "ugly"},
    "no guidance": {"guidance_scale": 1.0},
    "batch and micro-conditioning": {"num_images_per_prompt": 2, "original_size": (64, 48), "target_size": (32, 32),
                                     "crops_coords_top_left": (4, 2)},
    "negative micro-conditioning": {"negative_original_size": (16, 16), "negative_target_size": (24, 24),
                                    "negative_crops_coords_top_left": (2, 2), "negative_prompt": ""},
    "clip skip, unguided": {"clip_skip": 1, "guidance_scale": 1.0},
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(BASE_CASES))
def test_text_to_image_matches_diffusers(base, backend, case):
    source, exported = base
    kwargs = dict(prompt=PROMPT, num_inference_steps=4, height=SIZE, width=SIZE, **BASE_CASES[case])
    expected = reference(source)(generator=generator(1), output_type="np", **kwargs).images
    got = loaded(exported, backend)(seed=1, output_type="np", **kwargs).images
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < TOLERANCE, case


@pytest.mark.parametrize("backend", BACKENDS)
def test_base_to_refiner_hand_off(base, refiner, backend):
    """denoising_end on the base returns latents the refiner finishes with denoising_start, as in diffusers' guide."""
    (base_src, base_out), (refiner_src, refiner_out) = base, refiner
    common = dict(prompt=PROMPT, num_inference_steps=8)
    expected_latents = as_array(reference(base_src)(generator=generator(2), output_type="latent", denoising_end=0.7,
                                                    height=SIZE, width=SIZE, **common).images)
    latents = loaded(base_out, backend)(seed=2, output_type="latent", denoising_end=0.7, height=SIZE, width=SIZE,
                                                     **common).images
    assert np.abs(latents - expected_latents).max() <= LATENT_TOLERANCE * np.abs(expected_latents).max()
    expected = reference(refiner_src, "img2img")(image=torch.from_numpy(expected_latents), generator=generator(3), output_type="np",
                                                 denoising_start=0.7, **common).images
    got = loaded(refiner_out, backend)(image=expected_latents, seed=3, output_type="np", denoising_start=0.7, **common).images
    assert np.abs(got - expected).max() < TOLERANCE


@pytest.mark.parametrize("backend", BACKENDS)
def test_refiner_on_an_image_matches_diffusers(refiner, backend):
    """The refiner as image-to-image: strength 0.3 and guidance 5 by default, aesthetic scores in the time ids."""
    source, exported = refiner
    image = np.random.default_rng(0).random((SIZE, SIZE, 3)).astype(np.float32)
    for kwargs in ({}, {"aesthetic_score": 7.5, "negative_aesthetic_score": 1.0, "strength": 0.6, "negative_prompt": "dark"}):
        expected = reference(source, "img2img")(PROMPT, image=image[None], num_inference_steps=5, generator=generator(4),
                                                output_type="np", **kwargs).images
        got = loaded(exported, backend)(PROMPT, image=image, num_inference_steps=5, seed=4, output_type="np",
                                                     **kwargs).images
        assert np.abs(got - expected).max() < TOLERANCE, kwargs


@pytest.mark.parametrize("backend", BACKENDS)
def test_base_image_to_image_matches_diffusers(base, backend):
    source, exported = base
    image = np.random.default_rng(1).random((SIZE, SIZE, 3)).astype(np.float32)
    expected = reference(source, "img2img")(PROMPT, image=image[None], num_inference_steps=6, generator=generator(5),
                                            output_type="np").images
    got = loaded(exported, backend)(PROMPT, image=image, num_inference_steps=6, seed=5, output_type="np").images
    assert np.abs(got - expected).max() < TOLERANCE


@pytest.fixture(scope="module")
def turbo(tmp_path_factory):
    return build_and_export(tmp_path_factory, "tiny-sdxl-turbo", turbo=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_turbo_matches_diffusers(turbo, backend):
    """SDXL-Turbo: Euler ancestral with trailing timesteps, no guidance, 1 to 4 steps."""
    source, exported = turbo
    ours, theirs = loaded(exported, backend), reference(source)
    for steps in (1, 4):
        kwargs = dict(prompt=PROMPT, num_inference_steps=steps, guidance_scale=0.0, height=SIZE, width=SIZE)
        expected = theirs(generator=generator(6), output_type="np", **kwargs).images
        assert np.abs(ours(seed=6, output_type="np", **kwargs).images - expected).max() < TOLERANCE, steps


@pytest.mark.parametrize("backend", BACKENDS)
def test_inpainting_model_matches_diffusers(inpaint_model, backend):
    source, exported = inpaint_model
    image = Image.fromarray((np.random.default_rng(2).random((SIZE, SIZE, 3)) * 255).astype(np.uint8))
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[8:24, 4:20] = 255
    for kwargs in ({}, {"strength": 0.6, "negative_prompt": "blurry"}):
        expected = reference(source, "inpaint")(PROMPT, image=image, mask_image=Image.fromarray(mask), num_inference_steps=5,
                                                generator=generator(7), output_type="np", height=SIZE, width=SIZE, **kwargs).images
        got = leansd.load(exported, backend=backend)(PROMPT, image=image, mask_image=Image.fromarray(mask), num_inference_steps=5,
                                                     seed=7, output_type="np", height=SIZE, width=SIZE, **kwargs).images
        assert np.abs(got - expected).max() < TOLERANCE, kwargs


def test_export_records_sdxl(base, refiner):
    manifest = json.loads((base[1] / "leansd.json").read_text())
    assert manifest["family"] == "sdxl"
    assert {"text_encoder", "text_encoder_2"} <= set(manifest["components"])
    assert {"text_embeds", "time_ids"} <= set(manifest["io"]["unet"]["inputs"])
    assert manifest["defaults"]["guidance_scale"] == 5.0
    assert "text_encoder" not in json.loads((refiner[1] / "leansd.json").read_text())["components"]
    assert (base[1] / "tokenizer_2" / "vocab.json").is_file() and not (refiner[1] / "tokenizer").exists()


def test_bad_sdxl_settings_are_named(base, refiner):
    pipe = leansd.load(base[1], backend="onnxruntime")
    with pytest.raises(InvalidInputError, match="denoising_start 0.8 is not before denoising_end 0.5"):
        pipe(PROMPT, image=np.zeros((1, 4, 16, 16), np.float32), denoising_start=0.8, denoising_end=0.5)
    with pytest.raises(InvalidInputError, match="denoising_start continues a generation: pass image"):
        pipe(PROMPT, denoising_start=0.5)
    with pytest.raises(InvalidInputError, match="original_size must be a pair"):
        pipe(PROMPT, original_size=(1024,))
    with pytest.raises(InvalidInputError, match="prompt_2 has 2 entries but prompt has 1"):
        pipe(PROMPT, prompt_2=["a", "b"], num_inference_steps=1)
    with pytest.raises(InvalidInputError, match="is an image-to-image model \\(a refiner\\); pass image"):
        leansd.load(refiner[1], backend="onnxruntime")(PROMPT)


def test_sd_run_with_a_refiner(base, refiner, tmp_path):
    """`sd-run --model BASE --refiner REFINER --refiner-switch 0.7` writes the image of diffusers' hand-off, and records
    the refiner as AUTOMATIC1111 does."""
    from tests.cli.helpers import sd_run

    (base_src, base_out), (refiner_src, refiner_out) = base, refiner
    result = sd_run(PROMPT, "--model", str(base_out), "--refiner", str(refiner_out), "--refiner-switch", "0.7", "--steps", "8",
                    "--seed", "2", "--W", "32", "--H", "32", "--backend", "onnxruntime", "-o", "out.png", "-q", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    common = dict(prompt=PROMPT, num_inference_steps=8)
    latents = reference(base_src)(generator=generator(2), output_type="latent", denoising_end=0.7, height=SIZE, width=SIZE,
                                  **common).images
    expected = reference(refiner_src, "img2img")(image=latents, generator=generator(2), output_type="np", denoising_start=0.7,
                                                 **common).images[0]
    written = Image.open(tmp_path / "out.png")
    assert np.abs(np.asarray(written.convert("RGB"), dtype=np.float32) / 255 - expected).max() <= 1 / 255 + TOLERANCE
    parameters = written.text["parameters"]
    assert f"Refiner: {refiner_out.name}" in parameters and "Refiner switch at: 0.7" in parameters
    assert "Denoising strength" not in parameters


# ---------------------------------------------------------------- single-file checkpoints (sd_xl_base_1.0.safetensors layout)

@pytest.mark.parametrize("kind", ["base", "refiner"])
def test_single_file_matches_diffusers(base, refiner, kind, tmp_path):
    """A tiny SDXL base / refiner written in Stability's single-file layout exports (with the model's configs, as
    diffusers' from_single_file takes them) to the images diffusers' own conversion of the file gives."""
    import diffusers

    from leansd.export.cli import main
    from tests.tiny_sdxl import write_sdxl_checkpoint

    source = (base if kind == "base" else refiner)[0]
    ckpt = tmp_path / f"tiny-sdxl-{kind}.safetensors"
    write_sdxl_checkpoint(source, ckpt)
    out = tmp_path / "exported"
    assert main([str(ckpt), str(out), "--config", str(source), "--quiet"]) == 0
    cls = diffusers.StableDiffusionXLPipeline if kind == "base" else diffusers.StableDiffusionXLImg2ImgPipeline
    pipe = cls.from_single_file(str(ckpt), config=str(source), local_files_only=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt=PROMPT, num_inference_steps=4, negative_prompt="blurry")
    if kind == "base":
        kwargs.update(height=SIZE, width=SIZE)
    else:
        kwargs["image"] = np.random.default_rng(3).random((SIZE, SIZE, 3)).astype(np.float32)
    ref_kwargs = {**kwargs, **({"image": kwargs["image"][None]} if "image" in kwargs else {})}
    with torch.no_grad():
        expected = pipe(generator=generator(9), output_type="np", **ref_kwargs).images
    for backend in BACKENDS:
        got = leansd.load(out, backend=backend)(seed=9, output_type="np", **kwargs).images
        assert np.abs(got - expected).max() < TOLERANCE, backend


@pytest.mark.parametrize("family, model_type", [("sdxl", "xl_base"), ("sdxl_refiner", "xl_refiner")])
def test_shipped_sdxl_configs_fit_the_checkpoint_layout(family, model_type, tmp_path):
    """The shipped SDXL 1.0 base and refiner configs against the released files' layout, by shapes (full-size models on
    the meta device): diffusers recognises the layout, and sd-export picks and accepts those configs by itself."""
    import shutil

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from leansd.export.singlefile import SDXL_CONFIGS, assemble_config, checkpoint_family, prepare_sdxl, shipped_config
    from tests.export.compvis import unet_to_ldm, vae_to_ldm
    from tests.tiny_sd2 import OPEN_CLIP, text_encoder_to_open_clip

    folder = SDXL_CONFIGS[family]
    cfg = {n: json.loads((folder / n / "config.json").read_text()) for n in ("unet", "vae", "text_encoder_2")}
    with torch.device("meta"):
        state = {**unet_to_ldm(UNet2DConditionModel.from_config(cfg["unet"]).state_dict(), cfg["unet"]),
                 **vae_to_ldm(AutoencoderKL.from_config(cfg["vae"]).state_dict(), cfg["vae"])}
        if family == "sdxl":
            first = CLIPTextModel(CLIPTextConfig(**json.loads((folder / "text_encoder" / "config.json").read_text())))
            state.update({"conditioner.embedders.0.transformer." + k: v for k, v in first.state_dict().items()})
        weights = CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"])).state_dict()
        projection = weights.pop("text_projection.weight")
        prefix = f"conditioner.embedders.{1 if family == 'sdxl' else 0}.model."
        state.update({prefix + k[len(OPEN_CLIP):]: v for k, v in text_encoder_to_open_clip(weights).items()})
        state[prefix + "text_projection"] = projection.T
    assert infer_diffusers_model_type(state) == model_type
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    path = tmp_path / "sd_xl.safetensors"
    assert checkpoint_family(path, shapes) == family and shipped_config(path, shapes) == folder
    config = assemble_config(None, folder)
    try:
        prepare_sdxl(path, shapes, config, None, None)
        assert (config / "tokenizer_2" / "vocab.json").is_file()
        assert json.loads((config / "tokenizer_2" / "special_tokens_map.json").read_text())["pad_token"] == "!"
    finally:
        shutil.rmtree(config)


def test_low_memory_streams_the_unet_in_parts(base, tmp_path):
    """Low-memory mode on an SDXL export cut in parts (what sd-export writes for UNets over 2 GB, forced here with
    unet_parts=2): the weights stream part by part and the image is diffusers'."""
    from leansd.export import export_model

    source = base[0]
    out = export_model(source, tmp_path / "parts", backends="onnx", unet_parts=2, progress=False)
    kwargs = dict(prompt=PROMPT, num_inference_steps=4, height=SIZE, width=SIZE, negative_prompt="blurry")
    expected = reference(source)(generator=generator(11), output_type="np", **kwargs).images
    pipe = leansd.load(out, low_memory=True)
    assert pipe.models.denoiser.streamed_bytes > 0  # the parts are in use, not the whole graph
    got = pipe(seed=11, output_type="np", **kwargs).images
    assert np.abs(got - expected).max() < TOLERANCE
