"""One loaded pipeline serving several threads at once (a server's situation), in normal and low-memory mode.

Four generations with different seeds and settings run concurrently on one pipeline; each must equal the same
generation run alone. A barrier in the step callback holds all four in the middle of their loops together, so
their stages overlap (in low-memory mode: models opened and released while other threads still use them).
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("diffusers")

import leansd  # noqa: E402
from leansd import Cancelled, LeanSDError  # noqa: E402

pytestmark = pytest.mark.needs_torch

JOBS = [
    dict(prompt="a red circle on a blue background", seed=1, scheduler="euler_a"),
    dict(prompt=["a green square", "a yellow triangle"], seed=2, scheduler="ddim", eta=0.3, negative_prompt="blurry"),
    dict(prompt="a blue circle", seed=3, scheduler="dpm++2m", deep_cache=2, guidance_cutoff=0.5),
    dict(prompt="a red square", seed=4, scheduler="lms", image=np.linspace(0, 1, 32 * 32 * 3, dtype=np.float32).reshape(32, 32, 3),
         strength=0.7, guidance_scale=1.0),
]
COMMON = dict(num_inference_steps=4, height=32, width=32, output_type="np")


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("low_memory", [False, True])
def test_concurrent_generations_equal_single_threaded_ones(exported_tiny_sd_deepcache, backend, low_memory):
    pipe = leansd.load(exported_tiny_sd_deepcache, backend=backend, low_memory=low_memory)
    alone = [pipe(**COMMON, **job).images for job in JOBS]
    barrier = threading.Barrier(len(JOBS), timeout=60)

    def wait_for_the_others(step, total, latents, denoised):
        if step == 1:
            barrier.wait()

    with ThreadPoolExecutor(len(JOBS)) as pool:
        together = list(pool.map(lambda job: pipe(**COMMON, **job, callback=wait_for_the_others).images, JOBS))
    for job, a, b in zip(JOBS, alone, together):
        np.testing.assert_array_equal(a, b, err_msg=f"seed {job['seed']} on {backend}, low_memory={low_memory}")
    # The jobs really differ (otherwise equality above would prove less).
    assert len({a.tobytes() for a in alone}) == len(JOBS)
    if low_memory:  # every model was released once the last generation left its stage
        assert not any(s.loaded for s in pipe.models.sessions())


def test_a_call_leaves_the_pipeline_unchanged_and_errors_are_leansd_errors(exported_tiny_sd):
    pipe = leansd.load(exported_tiny_sd, backend="onnxruntime", scheduler="euler", num_inference_steps=3)
    before = dict(vars(pipe))
    out = pipe("a cat", height=32, width=32, seed=5, guidance_cutoff=0.5)
    assert out.settings.scheduler == "euler" and out.settings.guidance_cutoff == 0.5 and out.num_inference_steps == 3
    assert vars(pipe) == before and pipe.defaults.guidance_cutoff == 1.0
    with pytest.raises(Cancelled):
        pipe("a cat", height=32, width=32, callback=lambda *args: False)
    bad = [dict(scheduler="ddim", num_inference_steps=1001), dict(scheduler="euler", eta=0.5), dict(num_inference_steps=2.5),
           dict(seed=None, num_images_per_prompt=True), dict(nonsense=1), dict(prompt=None), dict(prompt=123), dict(eta=-1.0)]
    for kwargs in bad:
        kwargs = {"prompt": "a cat", **kwargs}
        with pytest.raises(LeanSDError):
            pipe(height=32, width=32, **kwargs)
