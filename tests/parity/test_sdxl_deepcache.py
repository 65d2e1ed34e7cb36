"""Feature reuse (DeepCache) on SDXL: the cut with SDXL's added conditioning, and whole generations against diffusers'
StableDiffusionXLPipeline whose UNet is cached by the DeepCache authors' package on the same schedule.

1. In PyTorch, `unet_deep` returns the UNet's output and features from which `unet_shallow` gives it again, with
   `text_embeds` and `time_ids` entering both parts' time embedding as they enter the UNet's.
2. The exported parts, run by leansd with features refreshed every N steps, give diffusers' cached images.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

import leansd  # noqa: E402
from leansd.export import deepcache  # noqa: E402
from tests.parity.test_deepcache import deepcache_reference  # noqa: E402

pytestmark = pytest.mark.needs_torch

PROMPT = "a red circle on a blue background"
BACKENDS = ["onnxruntime", "openvino"]


@pytest.fixture(scope="module")
def sdxl_deepcache(tmp_path_factory):
    from leansd.export import export_model
    from tests.tiny_sdxl import build_tiny_sdxl

    source = build_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl")
    return source, export_model(source, tmp_path_factory.mktemp("exports") / "tiny-sdxl-dc", deep_cache=True, progress=False)


def test_shallow_of_deep_equals_the_sdxl_unet(sdxl_deepcache):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(sdxl_deepcache[0], subfolder="unet").eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    text_embeds = torch.randn(2, pooled, generator=g)
    time_ids = torch.tensor([[32.0, 32, 0, 0, 32, 32], [64.0, 48, 4, 2, 32, 32]])
    t = torch.tensor([981.0, 500.0])
    with torch.no_grad():
        expected = unet(x, t, context, added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}).sample
        whole, features = deepcache.wrap_deep(unet)(x, t, context, text_embeds, time_ids)
        got = deepcache.wrap_shallow(unet)(x, t, context, features, text_embeds, time_ids)
        other = deepcache.wrap_shallow(unet)(x, t, context, features, text_embeds, time_ids.flip(0))
    torch.testing.assert_close(whole, expected, rtol=0, atol=0)
    assert float((got - expected).abs().max()) <= 1e-5 * float(expected.abs().max())
    assert float((other - expected).abs().max()) > 1e-3  # the shallow part does read the added conditioning


def test_export_records_the_sdxl_parts(sdxl_deepcache):
    manifest = json.loads((sdxl_deepcache[1] / "leansd.json").read_text())
    for part in deepcache.PARTS:
        assert {"text_embeds", "time_ids"} <= set(manifest["io"][part]["inputs"])
        for backend in ("onnx", "openvino"):
            assert manifest["parity"][part][backend]["fp32"]["max_rel"] <= 1e-3


def sdxl_reference_images(source, deep_cache: int = 1, patch=None, **kwargs) -> np.ndarray:
    """diffusers' SDXL images for seed 7: `patch(pipe)` applied first (e.g. tomesd), then DeepCache every
    `deep_cache` UNet calls when above 1."""
    import diffusers

    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(source, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    if patch is not None:
        patch(pipe)
    if deep_cache > 1:
        deepcache_reference(pipe, deep_cache)
    return np.asarray(pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(7), output_type="np").images)


@pytest.mark.parametrize("interval", [2, 3])
def test_sdxl_generation_with_feature_reuse_matches_diffusers(sdxl_deepcache, interval):
    source, exported = sdxl_deepcache
    kwargs = dict(prompt=PROMPT, num_inference_steps=6, guidance_scale=5.0, height=32, width=32)
    expected, plain = sdxl_reference_images(source, interval, **kwargs), sdxl_reference_images(source, **kwargs)
    assert float(np.abs(expected - plain).max()) > 1e-3  # the cache changes the image well beyond the tolerance
    for backend in BACKENDS:
        got = leansd.load(exported, backend=backend)(**kwargs, seed=7, deep_cache=interval, output_type="np").images
        err = float(np.abs(np.asarray(got) - expected).max())
        assert err < 1e-4, f"{backend}, every {interval} steps: max-abs {err:.2e}"
