"""Stopping classifier-free guidance early (`guidance_cutoff`) against diffusers.

diffusers does it with `SDCFGCutoffCallback(cutoff_step_ratio=r)`: after step int(steps * r) the pipeline keeps
the prompt's half of the embeddings and runs the UNet without guidance. leansd must give the same images, in
normal and low-memory mode, for batches and negative prompts, and with deep features reused on the unguided
steps (against diffusers' UNet following that schedule in PyTorch).
"""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

import leansd  # noqa: E402
from leansd.runtime.errors import InvalidInputError  # noqa: E402
from tests.parity.test_deepcache import cached_reference_pipeline  # noqa: E402
from tests.parity.test_pipeline import TOLERANCE, reference_images, reference_pipeline  # noqa: E402

pytestmark = pytest.mark.needs_torch

PROMPT = "a red circle on a blue background"
BACKENDS = ["onnxruntime", "openvino"]


def cutoff_callback(ratio: float):
    """diffusers' cutoff for any batch: its SDCFGCutoffCallback keeps only the last row of the embeddings."""

    def callback(pipe, step_index, timestep, kwargs):
        if step_index == int(pipe.num_timesteps * ratio):
            pipe._guidance_scale = 0.0
            kwargs["prompt_embeds"] = kwargs["prompt_embeds"].chunk(2)[1]
        return kwargs

    return callback


def guided_steps(steps: int, ratio: float) -> int:
    return min(steps, int(steps * ratio) + 1)


@pytest.fixture(scope="module")
def pipes(exported_tiny_sd):
    return {backend: leansd.load(exported_tiny_sd, backend=backend) for backend in BACKENDS}


@pytest.mark.parametrize("scheduler", ["pndm", "euler_a", "dpm++2m"])
@pytest.mark.parametrize("ratio", [0.0, 0.4])
def test_cutoff_matches_diffusers_callback(tiny_sd_dir, pipes, scheduler, ratio):
    from diffusers.callbacks import SDCFGCutoffCallback

    kwargs = dict(prompt=PROMPT, num_inference_steps=6, guidance_scale=7.5, height=32, width=32)
    reference = reference_pipeline(tiny_sd_dir, scheduler)
    expected = reference_images(reference, seed=9, callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=ratio), **kwargs)
    plain = reference_images(reference_pipeline(tiny_sd_dir, scheduler), seed=9, **kwargs)
    assert float(np.abs(expected - plain).max()) > 1e-3  # the cutoff changes the image, so the check below means something
    for backend, pipe in pipes.items():
        got = pipe(**kwargs, seed=9, scheduler=scheduler, guidance_cutoff=ratio, output_type="np").images
        err = float(np.abs(got - expected).max())
        assert err < TOLERANCE, f"cutoff {ratio}, {scheduler} on {backend}: max-abs {err:.2e}"


@pytest.mark.parametrize("low_memory", [False, True])
def test_cutoff_with_batches_and_negative_prompts(tiny_sd_dir, exported_tiny_sd, low_memory):
    steps, ratio = 5, 0.5
    kwargs = dict(prompt=["a red circle", "a green square"], negative_prompt=["blurry", "a triangle"], num_images_per_prompt=2,
                  num_inference_steps=steps, guidance_scale=6.0, height=32, width=32)
    expected = reference_images(reference_pipeline(tiny_sd_dir, "ddim"), seed=2, callback_on_step_end=cutoff_callback(ratio),
                                callback_on_step_end_tensor_inputs=["prompt_embeds"], **kwargs)
    pipe = leansd.load(exported_tiny_sd, backend="onnxruntime", low_memory=low_memory)
    batches = []
    original = pipe.unet.predict
    pipe.unet.predict = lambda x, t, inputs: batches.append(x.shape[0]) or original(x, t, inputs)
    got = pipe(**kwargs, seed=2, scheduler="ddim", guidance_cutoff=ratio, output_type="np").images
    err = float(np.abs(got - expected).max())
    assert err < TOLERANCE, f"low_memory={low_memory}: max-abs {err:.2e}"
    guided = guided_steps(steps, ratio)
    per_guided_step = [4, 4] if low_memory else [8]  # 4 images: two guidance halves in one call or two
    assert batches == per_guided_step * guided + [4] * (steps - guided)


@pytest.mark.parametrize("low_memory", [False, True])
def test_feature_reuse_on_the_unguided_steps_only(tiny_sd_dir, exported_tiny_sd_deepcache, low_memory):
    steps, ratio, interval = 8, 0.3, 3
    kwargs = dict(prompt=PROMPT, num_inference_steps=steps, guidance_scale=7.5, height=32, width=32)
    reference = cached_reference_pipeline(tiny_sd_dir, interval, guided_steps(steps, ratio))
    expected = reference_images(reference, seed=6, callback_on_step_end=cutoff_callback(ratio),
                                callback_on_step_end_tensor_inputs=["prompt_embeds"], **kwargs)
    no_reuse = reference_images(reference_pipeline(tiny_sd_dir), seed=6, callback_on_step_end=cutoff_callback(ratio),
                                callback_on_step_end_tensor_inputs=["prompt_embeds"], **kwargs)
    assert float(np.abs(expected - no_reuse).max()) > 1e-3
    pipe = leansd.load(exported_tiny_sd_deepcache, backend="onnxruntime", low_memory=low_memory, deep_cache=interval,
                       guidance_cutoff=ratio)
    got = pipe(**kwargs, seed=6, output_type="np").images
    err = float(np.abs(got - expected).max())
    assert err < TOLERANCE, f"low_memory={low_memory}: max-abs {err:.2e}"
    assert not pipe.unet.session.loaded  # guided steps also run through the two parts: the whole UNet is never opened


def test_cutoff_one_is_plain_guidance_and_bad_values_are_named(pipes):
    pipe = pipes["onnxruntime"]
    kwargs = dict(prompt=PROMPT, num_inference_steps=3, height=32, width=32, seed=5, output_type="np")
    np.testing.assert_array_equal(pipe(**kwargs, guidance_cutoff=1.0).images, pipe(**kwargs).images)
    for bad in (-0.1, 1.5, True, "0.5"):
        with pytest.raises(InvalidInputError, match="guidance_cutoff must be a fraction"):
            pipe(**kwargs, guidance_cutoff=bad)
