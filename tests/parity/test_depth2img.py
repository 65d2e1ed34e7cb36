"""Depth-to-image against diffusers' StableDiffusionDepth2ImgPipeline on a tiny SD 2 depth model (5-channel UNet and a
tiny DPT depth estimator), with the caller's depth map and with the estimator's, exported from its folder (and the UNet
from a single-file checkpoint), both backends. Images must agree within 1e-4 (max-abs on [0, 1]); errors printed (-s).
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

import leansd  # noqa: E402
from leansd.runtime.depth import depth_condition, load_depth_map  # noqa: E402
from leansd.runtime.errors import InvalidInputError  # noqa: E402
from tests.parity.test_inpaint import init_image  # noqa: E402
from tests.parity.test_pipeline import BACKENDS, PROMPT, SCHEDULERS  # noqa: E402

pytestmark = [pytest.mark.needs_torch, pytest.mark.slow]
TOLERANCE = 1e-4
MEASURED: dict[str, float] = defaultdict(float)


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    for key, err in sorted(MEASURED.items()):
        print(f"\ndepth-to-image parity, {key}: max-abs {err:.2e}")


def depth_map(height: int = 40, width: int = 60, seed: int = 0) -> np.ndarray:
    """A plausible depth map (a tilted plane and a bump), 1 x H x W, of another size than the image."""
    y, x = np.mgrid[0:height, 0:width] / np.float32(max(height, width))
    bump = np.exp(-((x - 0.6) ** 2 + (y - 0.4) ** 2) * 20)
    rng = np.random.default_rng(seed)
    return (3 * y + 2 * bump + 0.05 * rng.standard_normal((height, width)))[None].astype(np.float32)


@pytest.fixture(scope="module")
def depth_dir(tmp_path_factory) -> Path:
    from tests.tiny_sd2 import build_tiny_sd2

    return build_tiny_sd2(tmp_path_factory.mktemp("models") / "tiny-sd2-depth", depth=True, estimator=True, prediction_type="epsilon", seed=5)


@pytest.fixture(scope="module")
def exported_depth(depth_dir, tmp_path_factory) -> Path:
    from tests.export.fixtures import _export

    return _export(depth_dir, tmp_path_factory.mktemp("exports") / "tiny-sd2-depth")


def as_pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray((image * 255).round().astype(np.uint8))


@pytest.fixture(scope="module")
def pipes(exported_depth) -> dict:
    return {backend: leansd.load(exported_depth, backend=backend) for backend in BACKENDS}


def reference(folder: Path, scheduler: str, seed: int, depth: np.ndarray | None, image: Image.Image, **kwargs) -> np.ndarray:
    import diffusers

    pipe = diffusers.StableDiffusionDepth2ImgPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    name, extra = SCHEDULERS[scheduler]
    pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config, **extra)
    with torch.no_grad():
        return pipe(image=image, depth_map=None if depth is None else torch.from_numpy(depth), generator=torch.Generator("cpu").manual_seed(seed), output_type="np",
                    **kwargs).images


def test_depth_condition_equals_torch_bicubic_and_scaling():
    for (h, w), (out_h, out_w) in (((40, 60), (16, 24)), ((7, 5), (16, 12)), ((64, 64), (8, 8)), ((33, 17), (33, 17))):
        depth = np.random.default_rng(h).standard_normal((2, h, w)).astype(np.float32)
        want = torch.nn.functional.interpolate(torch.from_numpy(depth)[:, None], size=(out_h, out_w), mode="bicubic", align_corners=False)
        low, high = torch.amin(want, dim=[1, 2, 3], keepdim=True), torch.amax(want, dim=[1, 2, 3], keepdim=True)
        want = (2.0 * (want - low) / (high - low) - 1.0).numpy()
        got = depth_condition(depth, out_h, out_w)
        assert got.shape == want.shape == (2, 1, out_h, out_w) and got.dtype == np.float32
        assert float(np.abs(got - want).max()) < 1e-5, ((h, w), (out_h, out_w))


def test_depth_map_files(tmp_path):
    depth = (depth_map()[0] * 10000).astype(np.uint16)
    Image.fromarray(depth).save(tmp_path / "d16.png")
    np.save(tmp_path / "d.npy", depth.astype(np.float32))
    assert np.array_equal(load_depth_map(tmp_path / "d16.png"), depth[None].astype(np.float32))  # 16 bits kept
    assert np.array_equal(load_depth_map(str(tmp_path / "d.npy")), depth[None].astype(np.float32))
    Image.fromarray((depth >> 8).astype(np.uint8)).convert("RGB").save(tmp_path / "d8.png")
    assert np.array_equal(load_depth_map(tmp_path / "d8.png"), (depth >> 8)[None].astype(np.float32))
    with pytest.raises(InvalidInputError, match="flat"):
        depth_condition(np.ones((1, 8, 8), np.float32), 4, 4)
    with pytest.raises(InvalidInputError, match="HxW or NxHxW"):
        load_depth_map(np.zeros((1, 1, 4, 4)))


@pytest.mark.parametrize("scheduler, negative, strength, given", [("pndm", None, 0.8, True), ("euler_a", "blurry, a triangle", 0.6, True),
                                                                 ("dpm++2m", None, 1.0, False), ("euler", "a green square", 0.7, False)])
def test_depth2img_matches_diffusers(depth_dir, pipes, scheduler, negative, strength, given):
    """With the caller's depth map (`given`) and with the one the exported DPT estimates from the image."""
    image, depth = as_pil(init_image(4, 32, 48)), depth_map() if given else None
    kwargs = dict(prompt=PROMPT, negative_prompt=negative, num_inference_steps=4, guidance_scale=7.5, strength=strength, num_images_per_prompt=2)
    expected = reference(depth_dir, scheduler, 9, depth, image, **kwargs)
    for backend, pipe in pipes.items():
        got = pipe(**kwargs, image=image, depth_map=depth, seed=9, scheduler=scheduler, output_type="np").images
        assert got.shape == expected.shape == (2, 32, 48, 3)
        err = float(np.abs(got - expected).max())
        case = f"{'given' if given else 'estimated'} depth / {backend}"
        MEASURED[case] = max(MEASURED[case], err)
        assert err < TOLERANCE, f"{scheduler} on {backend}: max-abs {err:.2e}"


def test_estimated_depth_map_is_dpt_s(exported_depth, depth_dir, pipes):
    """The depth map the output reports is the exported estimator's, equal to PyTorch's DPT on the feature extractor's input."""
    from transformers import DPTForDepthEstimation, DPTImageProcessor

    image = as_pil(init_image(4, 32, 48))
    pixels = DPTImageProcessor.from_pretrained(depth_dir / "feature_extractor")(images=[image], return_tensors="pt").pixel_values
    with torch.no_grad():
        want = DPTForDepthEstimation.from_pretrained(depth_dir / "depth_estimator")(pixel_values=pixels).predicted_depth.numpy()
    for pipe in pipes.values():
        got = pipe(PROMPT, image=image, num_inference_steps=2, output_type="latent").depth_map
        assert got.shape == want.shape and float(np.abs(got - want).max()) <= 1e-4 * float(np.abs(want).max())


def test_depth_model_needs_image_and_a_depth_map_without_estimator(exported_depth, exported_tiny_sd, tmp_path):
    import shutil

    pipe = leansd.load(exported_depth, backend="onnxruntime")
    with pytest.raises(InvalidInputError, match="depth-to-image model.*pass image"):
        pipe(PROMPT, num_inference_steps=2)
    bare = shutil.copytree(exported_depth, tmp_path / "no-estimator")
    manifest = json.loads((bare / "leansd.json").read_text())
    del manifest["components"]["depth_estimator"]
    (bare / "leansd.json").write_text(json.dumps(manifest))
    with pytest.raises(InvalidInputError, match="depth-to-image model.*depth_map.*no depth estimator"):
        leansd.load(bare, backend="onnxruntime")(PROMPT, image=init_image(4, 32, 48), num_inference_steps=2)
    with pytest.raises(InvalidInputError, match="depth_map is for depth-to-image models"):
        leansd.load(exported_tiny_sd, backend="onnxruntime")(PROMPT, image=init_image(), depth_map=depth_map(), num_inference_steps=2)
    with pytest.raises(InvalidInputError, match="depth_map needs image"):
        pipe(PROMPT, depth_map=depth_map())


def test_sd_run_saves_the_estimated_depth_map(exported_depth, tmp_path):
    from leansd.runtime.cli import main

    image = init_image(4, 32, 48)
    Image.fromarray((image * 255).round().astype(np.uint8)).save(tmp_path / "in.png")
    args = [PROMPT, "--model", str(exported_depth), "--init-image", str(tmp_path / "in.png"), "--steps", "2", "-q", "-o", str(tmp_path / "o.png")]
    assert main([*args, "--save-depth-map", str(tmp_path / "depth.png")]) == 0
    saved = np.asarray(Image.open(tmp_path / "depth.png")).astype(np.float64)
    used = leansd.load(exported_depth, backend="onnxruntime")(PROMPT, image=Image.open(tmp_path / "in.png"), num_inference_steps=2,
                                                              output_type="latent").depth_map[0]
    assert saved.shape == used.shape and saved.min() == 0 and saved.max() == 65535
    assert np.abs(saved / 65535 - (used - used.min()) / (used.max() - used.min())).max() < 1e-4
    before = (tmp_path / "depth.png").read_bytes()
    other = [a if a != str(tmp_path / "o.png") else str(tmp_path / "o2.png") for a in args]
    assert main([*other, "--save-depth-map", str(tmp_path / "depth.png")]) == 2  # refused before any work: it exists
    assert (tmp_path / "depth.png").read_bytes() == before and not (tmp_path / "o2.png").exists()


def test_sd_run_depth_map(exported_depth, tmp_path):
    from leansd.runtime.cli import main

    image, depth = init_image(4, 32, 48), depth_map()
    Image.fromarray((image * 255).round().astype(np.uint8)).save(tmp_path / "in.png")
    np.save(tmp_path / "depth.npy", depth[0])
    assert main([PROMPT, "--model", str(exported_depth), "--backend", "onnxruntime", "--init-image", str(tmp_path / "in.png"),
                 "--depth-map", str(tmp_path / "depth.npy"), "--steps", "3", "--seed", "2", "-q", "-o", str(tmp_path / "out.png")]) == 0
    want = leansd.load(exported_depth, backend="onnxruntime")(PROMPT, image=Image.open(tmp_path / "in.png"), depth_map=depth,
                                                              num_inference_steps=3, seed=2).images[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out.png")), np.asarray(want))


def test_hybrid_dpt_exports_on_both_backends(tmp_path):
    """SD 2 depth's estimator is a DPT-Hybrid (BiT + ViT): a tiny one traces and matches PyTorch on both backends."""
    from leansd.export import verify
    from leansd.export.depth_estimator import wrap
    from leansd.export.onnx import export_onnx
    from leansd.export.openvino import convert_openvino
    from tests.tiny_sd2 import tiny_hybrid_dpt

    graph = wrap(tiny_hybrid_dpt())
    rng = np.random.default_rng(3)
    export_onnx("depth_estimator", graph, {"pixel_values": rng.uniform(-1, 1, (1, 3, 64, 64)).astype(np.float32)}, tmp_path / "model.onnx")
    convert_openvino(tmp_path / "model.onnx", tmp_path / "openvino_model.xml")
    feeds = {"pixel_values": rng.uniform(-1, 1, (2, 3, 64, 64)).astype(np.float32)}
    with torch.no_grad():
        want = {"predicted_depth": graph(torch.from_numpy(feeds["pixel_values"])).numpy()}
    for run, path in ((verify.run_onnxruntime, tmp_path / "model.onnx"), (verify.run_openvino, tmp_path / "openvino_model.xml")):
        assert verify.measure(want, run(path, feeds), 1e-4).passed, path.name


def test_single_file_depth_checkpoint(depth_dir, exported_depth, tmp_path):
    """SD 2's 512-depth file layout (5-channel UNet) read with the text-to-image configs becomes a depth export equal to the
    folder's (the UNet on the same inputs)."""
    from leansd.export import export_model
    from tests.export.reference import run
    from tests.tiny_sd2 import build_tiny_sd2, write_sd2_checkpoint

    ckpt = tmp_path / "tiny-sd2-depth.safetensors"
    write_sd2_checkpoint(depth_dir, ckpt)
    configs = build_tiny_sd2(tmp_path / "t2i-configs", prediction_type="epsilon")
    out = export_model(ckpt, tmp_path / "out", backends="onnx", single_file_config=configs, progress=False)
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusionDepth2ImgPipeline"
    assert json.loads((out / "unet" / "config.json").read_text())["in_channels"] == 5
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((2, 5, 16, 24)).astype(np.float32), "timestep": np.array([500.0, 20.0], np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 77, 32)).astype(np.float32)}
    ours, folder = (run("onnx", f / "unet" / "model.onnx", feeds)["out_sample"] for f in (out, exported_depth))
    assert float(np.abs(ours - folder).max()) <= 1e-6 * float(np.abs(folder).max())
