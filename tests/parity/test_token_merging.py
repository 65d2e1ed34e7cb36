"""Token merging (ToMe): leansd's token-merged UNet graphs against diffusers patched by `tomesd`, the ToMe
authors' own package (PyPI `tomesd`, requirements/dev.txt), with `use_rand=False` (leansd's fixed choice).

1. In PyTorch, `token_merging.applied` changes a UNet exactly as `tomesd.apply_patch` does, at sizes whose grid
   the 2x2 cells do and do not tile.
2. The exported graphs (`sd-export --token-merging`), the whole UNet and its deep-cache parts, run by leansd,
   give diffusers' images with `tomesd` applied, on both backends, alone and with feature reuse (DeepCache's
   own helper on top of `tomesd`).
"""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest

pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")
tomesd = pytest.importorskip("tomesd")

import leansd  # noqa: E402
from leansd.export import token_merging  # noqa: E402
from leansd.export.errors import ExportError  # noqa: E402
from leansd.runtime.errors import ModelFolderError  # noqa: E402
from leansd.runtime.manifest import TOKEN_MERGED  # noqa: E402
from tests.parity.test_deepcache import deepcache_reference, sd15_shaped_unet  # noqa: E402
from tests.parity.test_pipeline import reference_images, reference_pipeline  # noqa: E402

pytestmark = pytest.mark.needs_torch

PROMPT = "a red circle on a blue background"
BACKENDS = ["onnxruntime", "openvino"]
RATIO = 0.5


def tomesd_reference(model, ratio: float = RATIO, max_downsample: int = 1):
    """`model` (a pipeline or a UNet) patched by tomesd: self-attention only, no random choice."""
    return tomesd.apply_patch(model, ratio=ratio, max_downsample=max_downsample, sx=2, sy=2, use_rand=False, merge_attn=True,
                              merge_crossattn=False, merge_mlp=False)


@pytest.mark.parametrize("which", ["sd15_shaped", "tiny"])
@pytest.mark.parametrize("size", [(16, 16), (12, 10), (14, 6)])
def test_applied_merging_is_tomesds(tiny_sd_dir, which, size):
    """SD 1.5's layout merges at the latent's resolution (tomesd's max_downsample 1); the tiny test UNet, with no
    attention there, one level down (max_downsample 2), as in the bundled model."""
    from diffusers import UNet2DConditionModel

    unet = sd15_shaped_unet() if which == "sd15_shaped" else UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet").eval()
    reference = tomesd_reference(copy.deepcopy(unet), max_downsample=1 if which == "sd15_shaped" else 2)
    g = torch.Generator().manual_seed(size[0])
    x = torch.randn(2, 4, *size, generator=g)
    t, context = torch.tensor([500.0, 20.0]), torch.randn(2, 7, 32, generator=g)
    with torch.no_grad():
        expected = reference(x, t, context).sample
        plain = unet(x, t, context).sample
        with token_merging.applied(unet, RATIO) as wrapped:
            got = unet(x, t, context).sample
        again = unet(x, t, context).sample  # the patch is undone on exit
    assert wrapped == (5 if which == "sd15_shaped" else 4)  # a down block's layers + its up block's (+ the middle's in "tiny")
    scale = float(expected.abs().max())
    assert float((expected - plain).abs().max()) > 1e-2 * scale  # merging changes the output
    assert float((got - expected).abs().max()) <= 1e-5 * scale
    torch.testing.assert_close(again, plain, rtol=0, atol=0)


def test_unsupported_unets_and_ratios_are_refused(tiny_sd_dir):
    config = json.loads((tiny_sd_dir / "unet" / "config.json").read_text())
    with pytest.raises(ExportError, match="--token-merging needs a UNet with self-attention in its down and up blocks"):
        token_merging.check_supported({**config, "down_block_types": ["DownBlock2D"] * 2})
    for other in ({"num_class_embeds": 1000}, {"class_embed_type": "timestep"}, {"addition_embed_type": "image"}):
        with pytest.raises(ExportError, match="--token-merging supports SD 1.x/2.x and SDXL text-to-image UNets; this one"):
            token_merging.check_supported({**config, **other})
    token_merging.check_supported({**config, "addition_embed_type": "text_time"})  # SDXL's (tests/parity/test_sdxl_token_merging.py)
    for bad in (0, 1, 1.5, -0.2):
        with pytest.raises(ExportError, match=f"--token-merging {bad}: give the fraction of tokens to merge"):
            token_merging.check_ratio(bad)


@pytest.fixture(scope="module")
def top_attention_dir(tmp_path_factory):
    from tests.tiny_models import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd-top", top_attention=True, seed=3)


@pytest.fixture(scope="module")
def merged_export(top_attention_dir, tmp_path_factory):
    from tests.export.fixtures import _export

    return _export(top_attention_dir, tmp_path_factory.mktemp("exports") / "tiny-sd-tome", deep_cache=True, token_merging=RATIO)


@pytest.fixture(scope="module")
def pipes(merged_export):
    return {backend: leansd.load(merged_export, backend=backend) for backend in BACKENDS}


def test_export_writes_and_checks_the_merged_graphs(merged_export):
    manifest = json.loads((merged_export / "leansd.json").read_text())
    assert manifest["token_merging"]["ratio"] == RATIO
    for plain, merged in TOKEN_MERGED.items():
        for backend in ("onnx", "openvino"):
            assert (merged_export / manifest["components"][merged][backend]["fp32"]).is_file()
            assert manifest["parity"][merged][backend]["fp32"]["max_rel"] <= 1e-3
        assert manifest["io"][merged] == manifest["io"][plain]


@pytest.mark.parametrize("scheduler", ["ddim", "euler_a"])
def test_generation_with_token_merging_matches_diffusers_with_tomesd(top_attention_dir, pipes, scheduler):
    kwargs = dict(prompt=PROMPT, num_inference_steps=4, guidance_scale=7.5, height=32, width=32)
    expected = reference_images(tomesd_reference(reference_pipeline(top_attention_dir, scheduler)), seed=7, **kwargs)
    plain = reference_images(reference_pipeline(top_attention_dir, scheduler), seed=7, **kwargs)
    assert float(np.abs(expected - plain).max()) > 1e-2  # merging changes the image 100 times the tolerance
    for backend, pipe in pipes.items():
        got = pipe(**kwargs, seed=7, scheduler=scheduler, token_merging=True, output_type="np").images
        err = float(np.abs(got - expected).max())
        assert err < 1e-4, f"{backend}, {scheduler}: max-abs {err:.2e}"
        exact = pipe(**kwargs, seed=7, scheduler=scheduler, output_type="np").images
        assert float(np.abs(exact - plain).max()) < 1e-4  # the plain graphs stay exact beside the merged ones


def test_token_merging_with_feature_reuse_matches_diffusers(top_attention_dir, pipes):
    kwargs = dict(prompt=PROMPT, num_inference_steps=6, guidance_scale=7.5, height=32, width=32)
    reference = deepcache_reference(tomesd_reference(reference_pipeline(top_attention_dir, "dpm++2m")), interval=3)
    expected = reference_images(reference, seed=2, **kwargs)
    for backend, pipe in pipes.items():
        got = pipe(**kwargs, seed=2, scheduler="dpm++2m", token_merging=True, deep_cache=3, output_type="np").images
        err = float(np.abs(got - expected).max())
        assert err < 1e-4, f"{backend}: max-abs {err:.2e}"


def test_token_merging_needs_the_merged_graphs(exported_tiny_sd, pipes):
    pipe = leansd.load(exported_tiny_sd, backend="onnxruntime")
    with pytest.raises(ModelFolderError, match="token-merged UNet for onnxruntime; export it with sd-export --token-merging"):
        pipe(PROMPT, num_inference_steps=2, height=32, width=32, token_merging=True)


def test_sd_run_token_merging_writes_the_merged_image_and_says_so(merged_export, pipes, tmp_path):
    from PIL import Image

    from tests.cli.a1111_infotext import parse_generation_parameters
    from tests.cli.helpers import sd_run

    args = ["a blue square", "--model", str(merged_export), "--backend", "openvino", "--steps", "3", "--width", "32",
            "--height", "32", "--seed", "9"]
    result = sd_run(*args, "--token-merging", "-o", "merged.png", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    written = Image.open(tmp_path / "merged.png")
    assert parse_generation_parameters(written.text["parameters"])["Token merging ratio"] == str(RATIO)
    expected = pipes["openvino"]("a blue square", num_inference_steps=3, width=32, height=32, seed=9, token_merging=True).images[0]
    assert np.array_equal(np.asarray(written.convert("RGB")), np.asarray(expected))


def test_sd_run_refuses_token_merging_on_a_folder_without_it(exported_tiny_sd, tmp_path):
    from tests.cli.helpers import assert_clean_error, sd_run

    result = sd_run("a cat", "--model", str(exported_tiny_sd), "--steps", "2", "--width", "32", "--height", "32", "--token-merging",
                    cwd=tmp_path)
    assert_clean_error(result, "token-merged UNet", "sd-export --token-merging")
    assert not list(tmp_path.iterdir())  # nothing written


def test_close_releases_the_merged_graphs(merged_export):
    pipe = leansd.load(merged_export, backend="onnxruntime", token_merging=True)
    pipe(PROMPT, num_inference_steps=2, height=32, width=32)
    merged = pipe.models.denoiser.merged
    assert merged.unet.session.loaded and not pipe.models.denoiser.unet.session.loaded  # only the graphs it runs are opened
    pipe.close()
    assert not merged.unet.session.loaded
