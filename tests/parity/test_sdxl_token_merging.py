"""Token merging (ToMe) on SDXL against diffusers' StableDiffusionXLPipeline patched by `tomesd` (the ToMe authors'
package, `use_rand=False` as leansd), at SDXL's finest attention level: the second (`max_downsample=2`), since
SDXL's first level has no attention.

1. In PyTorch, `token_merging.applied` changes an SDXL-shaped UNet (three levels, attention at the lower two, the
   added text-time conditioning) exactly as `tomesd.apply_patch(max_downsample=2)` does.
2. The exported token-merged graphs, run by leansd, give diffusers' images with `tomesd` applied, on both
   backends, alone and with feature reuse.
"""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest

pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")
pytest.importorskip("tomesd")

import leansd  # noqa: E402
from leansd.export import token_merging  # noqa: E402
from tests.parity.test_sdxl_deepcache import sdxl_reference_images  # noqa: E402
from tests.parity.test_token_merging import RATIO, tomesd_reference  # noqa: E402

pytestmark = pytest.mark.needs_torch

PROMPT = "a red circle on a blue background"
BACKENDS = ["onnxruntime", "openvino"]


def sdxl_shaped_unet():
    """SDXL's block layout in miniature: no attention at the latent's resolution, 2 and 3 transformer layers below."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(16, 32, 32), layers_per_block=2, sample_size=16, cross_attention_dim=24, norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4, 4),
        transformer_layers_per_block=(1, 2, 3), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=4, projection_class_embeddings_input_dim=6 * 4 + 8,
    ).eval()


@pytest.mark.parametrize("size", [(16, 16), (24, 20)])
def test_applied_merging_is_tomesds_on_sdxls_layout(size):
    unet = sdxl_shaped_unet()
    reference = tomesd_reference(copy.deepcopy(unet), max_downsample=2)
    g = torch.Generator().manual_seed(size[1])
    x = torch.randn(2, 4, *size, generator=g)
    t, context = torch.tensor([981.0, 20.0]), torch.randn(2, 7, 24, generator=g)
    added = {"text_embeds": torch.randn(2, 8, generator=g), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    with torch.no_grad():
        expected = reference(x, t, context, added_cond_kwargs=added).sample
        plain = unet(x, t, context, added_cond_kwargs=added).sample
        with token_merging.applied(unet, RATIO) as wrapped:
            got = unet(x, t, context, added_cond_kwargs=added).sample
    assert wrapped == 2 * 2 + 3 * 2  # the second level only: 2 down layers of 2 blocks, 3 up layers of 2 blocks
    scale = float(expected.abs().max())
    assert float((expected - plain).abs().max()) > 1e-2 * scale  # merging changes the output
    assert float((got - expected).abs().max()) <= 1e-5 * scale


@pytest.fixture(scope="module")
def sdxl_merged(tmp_path_factory):
    from leansd.export import export_model
    from tests.tiny_sdxl import build_tiny_sdxl

    source = build_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl", seed=4)
    exported = export_model(source, tmp_path_factory.mktemp("exports") / "tiny-sdxl-tome", deep_cache=True,
                            token_merging=RATIO, progress=False)
    return source, exported


def test_sdxl_export_records_the_merged_graphs(sdxl_merged):
    manifest = json.loads((sdxl_merged[1] / "leansd.json").read_text())
    assert manifest["token_merging"]["ratio"] == RATIO
    for merged in ("unet_tome", "unet_deep_tome", "unet_shallow_tome"):
        assert {"text_embeds", "time_ids"} <= set(manifest["io"][merged]["inputs"])
        for backend in ("onnx", "openvino"):
            assert manifest["parity"][merged][backend]["fp32"]["max_rel"] <= 1e-3


def _tomesd_at_sdxls_level(pipe) -> None:
    tomesd_reference(pipe, max_downsample=2)


@pytest.mark.parametrize("deep_cache", [1, 3])
def test_sdxl_generation_with_token_merging_matches_diffusers_with_tomesd(sdxl_merged, deep_cache):
    source, exported = sdxl_merged
    kwargs = dict(prompt=PROMPT, num_inference_steps=6, guidance_scale=5.0, height=64, width=64)
    expected = sdxl_reference_images(source, deep_cache, _tomesd_at_sdxls_level, **kwargs)
    assert float(np.abs(expected - sdxl_reference_images(source, deep_cache, **kwargs)).max()) > 1e-2
    for backend in BACKENDS:
        pipe = leansd.load(exported, backend=backend)
        got = pipe(**kwargs, seed=7, token_merging=True, deep_cache=deep_cache, output_type="np").images
        err = float(np.abs(np.asarray(got) - expected).max())
        assert err < 1e-4, f"{backend}, deep cache {deep_cache}: max-abs {err:.2e}"
