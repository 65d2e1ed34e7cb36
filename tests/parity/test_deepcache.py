"""Feature reuse across steps (DeepCache): the split UNet against diffusers' UNet, and whole generations
against diffusers' pipeline cached by the DeepCache package (the paper authors' code, independent of leansd's).

1. `unet_deep(x)` returns `UNet(x)` and the features from which `unet_shallow` gives `UNet(x)` again, in
   PyTorch, for the tiny test UNet and for an SD 1.5-shaped one (two layers per block, attention in the first
   block), at sizes that are and are not multiples of the upsampling factor: the cut loses nothing.
2. The cut is DeepCache's: `unet_shallow` on features of one call gives DeepCache's reuse step on the next.
3. The exported parts run by leansd, with deep features refreshed every N steps, give the images diffusers
   gives when DeepCache caches its UNet on the same schedule (full UNet at steps 0, N, 2N..., cached between).
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


@pytest.mark.parametrize("which", ["tiny", "sd15_shaped"])
@pytest.mark.parametrize("side", [16, 13])
def test_shallow_part_is_deepcaches_reuse_step(tiny_sd_dir, which, side):
    """The cut is where DeepCache cuts: features from one call, shallow layers on another input give DeepCache's
    reuse step (the generation tests cover the tiny UNet's one-layer blocks only)."""
    from types import SimpleNamespace

    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet").eval() if which == "tiny" else sd15_shaped_unet()
    g = torch.Generator().manual_seed(side)
    first, second = (torch.randn(2, unet.config.in_channels, side, side, generator=g) for _ in range(2))
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    t1, t2 = torch.tensor([981.0, 961.0]), torch.tensor([901.0, 881.0])
    with torch.no_grad():
        _, features = deepcache.wrap_deep(unet)(first, t1, context)
        got = deepcache.wrap_shallow(unet)(second, t2, context, features)
        whole = unet(second, t2, context).sample
        reference = deepcache_reference(SimpleNamespace(unet=copy.deepcopy(unet)), interval=2).unet
        reference(first, t1, context)
        expected = reference(second, t2, context).sample
    scale = float(expected.abs().max())
    assert float((expected - whole).abs().max()) > 1e-2 * scale  # the reuse step is not the whole UNet
    err = float((got - expected).abs().max())
    assert err <= 1e-5 * scale, err


def test_unsupported_unet_is_refused():
    from leansd.export.errors import ExportError

    with pytest.raises(ExportError, match="--deep-cache supports SD 1.x/2.x and SDXL UNets; this one has addition_embed_type"):
        deepcache.check_supported({"block_out_channels": [32, 64], "layers_per_block": 1, "addition_embed_type": "image"})
    deepcache.check_supported({"block_out_channels": [32, 64], "layers_per_block": 1, "addition_embed_type": "text_time"})  # SDXL


# The reference cache is the DeepCache authors' own (PyPI `DeepCache`, requirements/dev.txt), not leansd's split:
# `DeepCacheSDHelper` patches diffusers' UNet module by module, replaying cached block outputs on reuse steps.
# Its branch 1 (cache_layer_id 1 of cache_block_id 0) recomputes conv_in, the first layer of the first down block
# and the last two layers of the last up block: leansd's cut (branch 0 would recompute the last up layer only).
DEEPCACHE_BRANCH = 1


def deepcache_reference(pipe, interval: int, guided_steps: int = 0):
    """Patch `pipe.unet` (`pipe` needs only a `unet`) with DeepCache: whole at calls 0, N, 2N..., reuse between.

    The first `guided_steps` calls run whole every time (leansd reuses features on unguided steps only when
    guidance stops early); when the batch halves at the cutoff, the prompt's half of the cache is kept.
    """
    helper_cls = pytest.importorskip("DeepCache").DeepCacheSDHelper

    class Helper(helper_cls):
        """DeepCache's helper, stepping by UNet calls (as leansd does) instead of looking the timestep up in
        `scheduler.timesteps` (PNDM's PLMS list repeats one timestep), and running guided calls whole."""

        def reset_states(self):
            super().reset_states()
            self.calls = 0

        def wrap_unet_forward(self):
            self.function_dict["unet_forward"] = forward = self.pipe.unet.forward

            def counted(sample, *args, **kwargs):
                self.cur_timestep, self.calls = self.calls, self.calls + 1
                if any(_batch(cached) != sample.shape[0] for cached in self.cached_output.values()):
                    self.cached_output = {key: _prompt_half(cached) for key, cached in self.cached_output.items()}
                return forward(sample, *args, **kwargs)

            self.pipe.unet.forward = counted

        def is_skip_step(self, block_i, layer_i, blocktype="down"):
            # The parent's first call fixes the schedule's origin (start_timestep): it must see call 0.
            skip = super().is_skip_step(block_i, layer_i, blocktype)
            return skip and self.cur_timestep >= guided_steps

    helper = Helper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=DEEPCACHE_BRANCH)
    helper.enable()
    return pipe


def cached_reference_pipeline(folder, interval: int, guided_steps: int = 0):
    """diffusers' pipeline with its UNet cached by DeepCache on leansd's schedule (see `deepcache_reference`)."""
    return deepcache_reference(reference_pipeline(folder), interval, guided_steps)


def _batch(cached) -> int:
    return cached.shape[0] if isinstance(cached, torch.Tensor) else _batch(cached[0])


def _prompt_half(cached):
    """A cached block output (a tensor, or tuples of them) cut to the guided batch's second (prompt) half."""
    if isinstance(cached, torch.Tensor):
        return cached.chunk(2)[1]
    if type(cached) in (tuple, list):
        return type(cached)(_prompt_half(c) for c in cached)
    raise TypeError(f"unexpected cached output {type(cached).__name__}")


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
    assert float(np.abs(expected - plain).max()) > 1e-2  # the cache changes the result 100 times the tolerance
    for backend, pipe in pipes.items():
        got = pipe(**kwargs, seed=11, scheduler=scheduler, deep_cache=interval, output_type="np").images
        err = float(np.abs(got - expected).max())
        assert err < 1e-4, f"{backend}, every {interval} steps, {scheduler}: max-abs {err:.2e}"


@pytest.mark.parametrize("interval", [3, 4])
def test_first_unguided_step_reuses_the_prompts_half(tiny_sd_dir, pipes, interval):
    """Guidance stops after step 1 of 8, so step 2 reuses features cached on the guided batch: its prompt half."""
    from diffusers.callbacks import SDCFGCutoffCallback

    steps, ratio = 8, 0.2  # guided steps 0 and 1 (int(8 * 0.2) + 1), each refreshing the cache
    kwargs = dict(prompt=PROMPT, num_inference_steps=steps, guidance_scale=7.5, height=32, width=32)
    cutoff = dict(callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=ratio))
    reference = cached_reference_pipeline(tiny_sd_dir, interval, guided_steps=int(steps * ratio) + 1)
    reference.scheduler = reference_pipeline(tiny_sd_dir, "dpm++2m").scheduler
    expected = reference_images(reference, seed=4, **cutoff, **kwargs)
    plain = reference_images(reference_pipeline(tiny_sd_dir, "dpm++2m"), seed=4, **cutoff, **kwargs)
    assert float(np.abs(expected - plain).max()) > 3e-3  # the cache changes the result 30 times the tolerance
    for backend, pipe in pipes.items():
        got = pipe(**kwargs, seed=4, scheduler="dpm++2m", deep_cache=interval, guidance_cutoff=ratio, output_type="np").images
        err = float(np.abs(got - expected).max())
        assert err < 1e-4, f"{backend}, every {interval} steps: max-abs {err:.2e}"


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
