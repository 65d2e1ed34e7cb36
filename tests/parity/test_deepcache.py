"""Feature reuse across steps (DeepCache): the split UNet against diffusers' UNet, and whole generations
against diffusers' pipeline running the same caching schedule in PyTorch.

1. `unet_deep(x)` returns `UNet(x)` and the features from which `unet_shallow` gives `UNet(x)` again, in
   PyTorch, for the tiny test UNet and for an SD 1.5-shaped one (two layers per block, attention in the first
   block), at sizes that are and are not multiples of the upsampling factor: the cut loses nothing.
2. The exported parts run by leansd, with deep features refreshed every N steps, give the images diffusers
   gives when its UNet follows the same schedule (full UNet at steps 0, N, 2N..., cached features between).
"""
from __future__ import annotations

import copy
import shutil
import json

import numpy as np
import pytest

pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

import leansd  # noqa: E402
from leansd.export import deepcache  # noqa: E402
from leansd.runtime.errors import InvalidInputError, ModelFolderError  # noqa: E402
from tests.parity.test_pipeline import reference_images, reference_pipeline  # noqa: E402

pytestmark = pytest.mark.needs_torch

PROMPT = "a red circle on a blue background"
BACKENDS = ["onnxruntime", "openvino"]


def sd15_shaped_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, block_out_channels=(32, 64, 64), layers_per_block=2, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=4, norm_num_groups=8,
    ).eval()


@pytest.mark.parametrize("which", ["tiny", "sd15_shaped"])
@pytest.mark.parametrize("side", [16, 13])
def test_shallow_of_deep_equals_the_unet(tiny_sd_dir, which, side):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet").eval() if which == "tiny" else sd15_shaped_unet()
    g = torch.Generator().manual_seed(side)
    x = torch.randn(2, unet.config.in_channels, side, side, generator=g)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    for t in (torch.tensor([981.0]), torch.tensor([3.5, 500.0])):
        with torch.no_grad():
            expected = unet(x, t, context).sample
            whole, features = deepcache.wrap_deep(unet)(x, t, context)
            got = deepcache.wrap_shallow(unet)(x, t, context, features)
        assert features.shape[1] == deepcache.feature_channels(dict(unet.config))
        torch.testing.assert_close(whole, expected, rtol=0, atol=0)  # the deep part is the UNet itself
        err = float((got - expected).abs().max())
        assert err <= 1e-5 * float(expected.abs().max()), err


def test_unsupported_unet_is_refused():
    from leansd.export.errors import ExportError

    with pytest.raises(ExportError, match="--deep-cache supports SD 1.x/2.x"):
        deepcache.check_supported({"block_out_channels": [32, 64], "layers_per_block": 1, "addition_embed_type": "text_time"})


def cached_reference_pipeline(folder, interval: int, guided_steps: int = 0):
    """diffusers' pipeline whose UNet computes deep features every `interval` calls and reuses them between.

    The first `guided_steps` calls refresh them every time (leansd reuses features on unguided steps only when
    guidance stops early); when the batch halves at the cutoff, the prompt's half of the features is kept.
    """
    pipe = reference_pipeline(folder)
    twin = copy.deepcopy(pipe.unet)  # the split modules call this copy, so patching pipe.unet cannot recurse
    deep, shallow = deepcache.wrap_deep(twin), deepcache.wrap_shallow(twin)
    state = {"calls": 0, "features": None}

    def forward(sample, timestep, encoder_hidden_states, *args, return_dict=True, **kwargs):
        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1)
        step, features = state["calls"], state["features"]
        state["calls"] += 1
        if features is not None and features.shape[0] != sample.shape[0]:
            features = features.chunk(2)[1]
        if step < guided_steps or step % interval == 0 or features is None:
            out, features = deep(sample, t, encoder_hidden_states)  # a refresh is the whole UNet
        else:
            out = shallow(sample, t, encoder_hidden_states, features)
        state["features"] = features
        return (out,) if not return_dict else type("Out", (), {"sample": out})()

    pipe.unet.forward = forward
    return pipe


@pytest.fixture(scope="module")
def pipes(exported_tiny_sd_deepcache):
    return {backend: leansd.load(exported_tiny_sd_deepcache, backend=backend) for backend in BACKENDS}


def test_export_records_the_parts(exported_tiny_sd_deepcache):
    manifest = json.loads((exported_tiny_sd_deepcache / "leansd.json").read_text())
    for part in deepcache.PARTS:
        assert set(manifest["components"][part]) == {"onnx", "openvino"}
        for backend in ("onnx", "openvino"):
            assert (exported_tiny_sd_deepcache / manifest["components"][part][backend]["fp32"]).is_file()
            assert manifest["parity"][part][backend]["fp32"]["max_rel"] <= 1e-3
    assert manifest["io"]["unet_shallow"]["inputs"]["deep_features"]["shape"][1] > 0


@pytest.mark.parametrize("scheduler", ["ddim", "dpm++2m", "euler_a"])
@pytest.mark.parametrize("interval", [2, 3])
def test_generation_with_feature_reuse_matches_diffusers(tiny_sd_dir, pipes, scheduler, interval):
    kwargs = dict(prompt=PROMPT, num_inference_steps=6, guidance_scale=7.5, height=32, width=32)
    reference = cached_reference_pipeline(tiny_sd_dir, interval)
    reference.scheduler = reference_pipeline(tiny_sd_dir, scheduler).scheduler
    expected = reference_images(reference, seed=11, **kwargs)
    plain = reference_images(reference_pipeline(tiny_sd_dir, scheduler), seed=11, **kwargs)
    assert float(np.abs(expected - plain).max()) > 1e-3  # the cache changes the result, so the check below means something
    for backend, pipe in pipes.items():
        got = pipe(**kwargs, seed=11, scheduler=scheduler, deep_cache=interval, output_type="np").images
        err = float(np.abs(got - expected).max())
        assert err < 1e-2, f"{backend}, every {interval} steps, {scheduler}: max-abs {err:.2e}"


def test_interval_one_is_the_plain_unet(pipes):
    kwargs = dict(prompt=PROMPT, num_inference_steps=3, height=32, width=32, seed=5, output_type="np")
    pipe = pipes["onnxruntime"]
    np.testing.assert_array_equal(pipe(**kwargs, deep_cache=1).images, pipe(**kwargs).images)


def test_bad_intervals_and_folders_without_parts(pipes, exported_tiny_sd):
    for bad in (0, -2, 2.5, True):
        with pytest.raises(InvalidInputError, match="deep_cache must be a whole number"):
            pipes["onnxruntime"](PROMPT, num_inference_steps=2, height=32, width=32, deep_cache=bad)
    with pytest.raises(ModelFolderError, match="sd-export --deep-cache"):
        leansd.load(exported_tiny_sd, backend="onnxruntime", deep_cache=3)
    plain = leansd.load(exported_tiny_sd, backend="onnxruntime")
    with pytest.raises(ModelFolderError, match="sd-export --deep-cache"):
        plain(PROMPT, num_inference_steps=2, height=32, width=32, deep_cache=2)


def test_onnx_parts_use_fused_attention(exported_tiny_sd_deepcache):
    import onnx

    manifest = json.loads((exported_tiny_sd_deepcache / "leansd.json").read_text())
    for part in deepcache.PARTS:
        ops = [n.op_type for n in onnx.load(str(exported_tiny_sd_deepcache / part / "model.onnx")).graph.node]
        fused = manifest["parity"][part]["onnx"]["fp32"]["fused_attention"]
        assert ops.count("MultiHeadAttention") == fused["blocks"] and "Softmax" not in ops
        if fused["blocks"]:
            assert fused["max_rel"] <= 1e-3  # checked against PyTorch again after the rewrite


def test_a_features_only_deep_part_asks_for_a_re_export(exported_tiny_sd_deepcache, tmp_path):
    """Exports before the deep part returned the UNet's prediction too: a one-line error, not a KeyError."""
    import onnx

    folder = tmp_path / "old"
    shutil.copytree(exported_tiny_sd_deepcache, folder)
    path = folder / "unet_deep" / "model.onnx"
    model = onnx.load(str(path))
    kept = [o for o in model.graph.output if o.name != "out_sample"]
    del model.graph.output[:]
    model.graph.output.extend(kept)
    onnx.save(model, str(path))
    pipe = leansd.load(folder, backend="onnxruntime", deep_cache=2)
    with pytest.raises(ModelFolderError, match="older sd-export.*re-export the model with sd-export --deep-cache"):
        pipe(PROMPT, num_inference_steps=2, height=32, width=32)
