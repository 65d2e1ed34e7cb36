"""The safety checker against diffusers' `StableDiffusionSafetyChecker` on a tiny random checker.

A tiny SD folder gets a checker (CLIP vision tower, 32x32 input) and a feature extractor; its concept thresholds are set
from the similarities of the very images the test generates, so that one image is flagged by a concept, one only through
diffusers' 0.01 adjustment after a special-care hit, and the others pass. leansd (both backends) must flag the same
images and return the same pictures (black where flagged) as diffusers' pipeline loaded from the same folder.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

import leansd  # noqa: E402
from leansd.runtime.errors import InvalidInputError, LeanSDWarning, ModelFolderError  # noqa: E402
from leansd.runtime.safety import FeatureExtractor  # noqa: E402
from tests.parity.test_pipeline import BACKENDS  # noqa: E402

pytestmark = [pytest.mark.needs_torch, pytest.mark.slow]

PROMPT = "a red circle on a blue background"
CALL = dict(prompt=PROMPT, num_images_per_prompt=4, num_inference_steps=3, guidance_scale=7.5, height=32, width=48)
SEED = 11
TOLERANCE = 1e-4


def tiny_checker():
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 20, "num_attention_heads": 2, "num_hidden_layers": 1, "vocab_size": 99},
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    checker = StableDiffusionSafetyChecker(config).eval()
    with torch.no_grad():  # the class starts its embeddings at ones: all concepts alike
        checker.concept_embeds.copy_(torch.randn(17, 16))
        checker.special_care_embeds.copy_(torch.randn(3, 16))
    return checker


def similarities(checker, extractor, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(special care, concept) cosine similarities of float images in [0, 1], as diffusers' checker computes them."""
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance

    clip_input = extractor(VaeImageProcessor.numpy_to_pil(images), return_tensors="pt").pixel_values
    with torch.no_grad():
        embeds = checker.visual_projection(checker.vision_model(clip_input)[1])
        return cosine_distance(embeds, checker.special_care_embeds).numpy(), cosine_distance(embeds, checker.concept_embeds).numpy()


def design_thresholds(checker, special: np.ndarray, concepts: np.ndarray) -> tuple[int, int]:
    """Thresholds that flag image `a` by a concept, image `b` only thanks to a special-care hit, and no other; returns (a, b)."""
    n = concepts.shape[0]
    never = concepts.max(axis=0) + 0.2
    for k in range(concepts.shape[1]):
        a = int(np.argmax(concepts[:, k]))
        rest = np.delete(concepts[:, k], a)
        if concepts[a, k] - rest.max() < 0.03:
            continue
        others = [i for i in range(n) if i != a]
        b = max(others, key=lambda i: special[i, 0])
        if special[b, 0] - max(special[i, 0] for i in others if i != b) < 0.02:
            continue
        for c in (j for j in range(concepts.shape[1]) if j != k):
            if all(concepts[b, c] - concepts[i, c] > 0.02 for i in others if i != b):
                thresholds = never.copy()
                thresholds[k] = concepts[a, k] - 0.01  # a: score +0.01
                thresholds[c] = concepts[b, c] + 0.005  # b: -0.005 alone, +0.005 with the adjustment
                special_thresholds = np.full(3, 2.0)
                special_thresholds[0] = special[b, 0] - 0.01  # b is the only other image with a special-care hit
                with torch.no_grad():
                    checker.concept_embeds_weights.copy_(torch.from_numpy(thresholds.astype(np.float32)))
                    checker.special_care_embeds_weights.copy_(torch.from_numpy(special_thresholds.astype(np.float32)))
                return a, b
    raise AssertionError("no concept separates the test images; change the seed")


@pytest.fixture(scope="module")
def checker_folder(tiny_sd_dir, tmp_path_factory) -> tuple[Path, int, int]:
    """(a copy of the tiny SD folder with a safety checker and feature extractor, image flagged by a concept, image flagged
    through the special-care adjustment)."""
    import diffusers
    from transformers import CLIPImageProcessor

    folder = tmp_path_factory.mktemp("models") / "tiny-sd-safety"
    shutil.copytree(tiny_sd_dir, folder)
    extractor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        images = pipe(**CALL, generator=torch.Generator("cpu").manual_seed(SEED), output_type="np").images
    checker = tiny_checker()
    a, b = design_thresholds(checker, *similarities(checker, extractor, images))
    checker.save_pretrained(folder / "safety_checker")
    extractor.save_pretrained(folder / "feature_extractor")
    index = json.loads((folder / "model_index.json").read_text())
    index.update(safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"], feature_extractor=["transformers", "CLIPImageProcessor"],
                 requires_safety_checker=True)
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder, a, b


@pytest.fixture(scope="module")
def exported(checker_folder, tmp_path_factory) -> Path:
    from tests.export.fixtures import _export

    return _export(checker_folder[0], tmp_path_factory.mktemp("exports") / "tiny-sd-safety")


def reference(folder: Path, with_checker: bool = True, **kwargs):
    import diffusers

    extra = {} if with_checker else {"safety_checker": None, "requires_safety_checker": False}
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, **extra)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(**{**CALL, **kwargs}, generator=torch.Generator("cpu").manual_seed(SEED), output_type="np")


def test_export_writes_the_checker_and_its_preprocessing(exported):
    manifest = json.loads((exported / "leansd.json").read_text())
    assert manifest["components"]["safety_checker"] == {"onnx": {"fp32": "safety_checker/model.onnx"},
                                                       "openvino": {"fp32": "safety_checker/openvino_model.xml"}}
    assert all(manifest["parity"]["safety_checker"][b]["fp32"]["max_rel"] <= 1e-3 for b in ("onnx", "openvino"))
    concepts = json.loads((exported / "safety_checker" / "concepts.json").read_text())
    assert len(concepts["concept_thresholds"]) == 17 and len(concepts["special_care_thresholds"]) == 3
    assert (exported / "feature_extractor" / "preprocessor_config.json").is_file()
    assert json.loads((exported / "model_index.json").read_text())["safety_checker"] == [None, None]  # Optimum loaders skip it


@pytest.mark.parametrize("backend", BACKENDS)
def test_flags_and_black_images_match_diffusers(checker_folder, exported, backend):
    folder, a, b = checker_folder
    want = reference(folder)
    assert [i for i, f in enumerate(want.nsfw_content_detected) if f] == sorted([a, b])  # the designed cases happened
    with pytest.warns(LeanSDWarning, match="safety checker flagged"):
        got = leansd.load(exported, backend=backend)(**CALL, seed=SEED, output_type="np")
    assert got.nsfw_content_detected == want.nsfw_content_detected
    assert float(np.abs(got.images - want.images).max()) < TOLERANCE
    assert not got.images[a].any() and not got.images[b].any() and got.images[[i for i in range(4) if i not in (a, b)]].any()


def test_negative_prompt_and_pil_output(checker_folder, exported):
    folder, _, _ = checker_folder
    want = reference(folder, negative_prompt="a green square")
    got = leansd.load(exported, backend="onnxruntime")(**CALL, negative_prompt="a green square", seed=SEED)
    assert got.nsfw_content_detected == want.nsfw_content_detected
    pixels = np.stack([np.asarray(im, np.float32) / 255 for im in got.images])
    assert float(np.abs(pixels - want.images).max()) <= 1 / 255 + 1e-6


def test_off_by_setting_and_for_latents(checker_folder, exported):
    folder, a, _ = checker_folder
    pipe = leansd.load(exported, backend="onnxruntime", safety_checker=False)
    got = pipe(**CALL, seed=SEED, output_type="np")
    want = reference(folder, with_checker=False)
    assert got.nsfw_content_detected is None and want.nsfw_content_detected is None
    assert float(np.abs(got.images - want.images).max()) < TOLERANCE and got.images[a].any()
    on = pipe(**CALL, seed=SEED, output_type="latent", safety_checker=True)
    assert on.nsfw_content_detected is None  # diffusers skips the checker for latents too


def test_required_checker_and_bad_setting(exported_tiny_sd, exported):
    with pytest.raises(ModelFolderError, match="no safety checker.*safety_checker=False"):
        leansd.load(exported_tiny_sd, backend="onnxruntime", safety_checker=True)
    assert leansd.load(exported_tiny_sd, backend="onnxruntime")("x", num_inference_steps=1, output_type="np").nsfw_content_detected is None
    with pytest.raises(InvalidInputError, match="safety_checker must be True, False or None"):
        leansd.load(exported, backend="onnxruntime", safety_checker="yes")


def test_sd_run_writes_black_images_and_warns_unless_told_not_to(checker_folder, exported, tmp_path, capsys):
    from leansd.runtime.cli import main

    _, a, _ = checker_folder
    args = [PROMPT, "--model", str(exported), "--backend", "onnxruntime", "-n", "4", "--steps", "3", "--height", "32", "--width", "48",
            "--seed", str(SEED), "-q"]
    assert main([*args, "-o", str(tmp_path / "on")]) == 0
    assert "safety checker flagged" in capsys.readouterr().err
    assert main([*args, "-o", str(tmp_path / "off"), "--no-safety-checker"]) == 0
    assert "safety checker" not in capsys.readouterr().err
    from PIL import Image

    on, off = (np.asarray(Image.open(tmp_path / kind / f"leansd-{SEED}-{a + 1}.png")) for kind in ("on", "off"))
    assert not on.any() and off.any()


# ---------------------------------------------------------------- the feature extractor alone

@pytest.mark.parametrize("config", [
    {},  # CLIPImageProcessor's defaults: shortest edge 224, centre crop 224 (SD's checker)
    {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}},
    {"size": {"height": 40, "width": 24}, "crop_size": {"height": 30, "width": 30}, "resample": 2},  # crop wider than the image
    {"do_center_crop": False, "size": {"shortest_edge": 20}, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.5, 1.0]},
])
def test_feature_extractor_equals_clip_image_processor(config, tmp_path):
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(**config)
    processor.save_pretrained(tmp_path)
    ours = FeatureExtractor.from_file(tmp_path / "preprocessor_config.json")
    rng = np.random.default_rng(0)
    for height, width in ((64, 96), (97, 31), (512, 512), (24, 24)):
        pixels = rng.integers(0, 256, size=(2, height, width, 3), dtype=np.uint8)
        from PIL import Image

        want = processor([Image.fromarray(p) for p in pixels], return_tensors="np").pixel_values
        got = ours(pixels)
        assert got.shape == want.shape and got.dtype == np.float32
        assert float(np.abs(got - want).max()) <= 1e-6, (config, height, width)
