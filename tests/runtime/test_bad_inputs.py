"""Every bad argument of the Python API gets a `LeanSDError` with a one-line message naming it, before any work.

Runs on the bundled model (torch-free). A fuzz test throws random values of every setting at the pipeline and
accepts only two outcomes: an image, or a `LeanSDError`.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

import leansd
from leansd import InvalidInputError, LeanSDError, LeanSDWarning
from leansd.runtime.errors import InsufficientMemoryError
from leansd.runtime.loader import bundled_model_path

pytestmark = pytest.mark.skipif(not (bundled_model_path() / "leansd.json").is_file(), reason="no bundled model")
PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def pipe():
    return leansd.load(backend="onnxruntime", num_inference_steps=2)


BAD = [
    (dict(seed=2**64), "seed must be a whole number from 0 to 18446744073709551615"),
    (dict(seed=-5), "seed must be a whole number from 0"),
    (dict(seed=True), "seed must be a whole number"),
    (dict(seed=1.5), "seed must be a whole number"),
    (dict(num_inference_steps=2.7), "num_inference_steps must be a whole number >= 1"),
    (dict(num_inference_steps=0), "num_inference_steps must be a whole number >= 1"),
    (dict(num_images_per_prompt=True), "num_images_per_prompt must be a whole number"),
    (dict(guidance_scale=math.inf), "guidance_scale must be a finite number >= 0"),
    (dict(guidance_scale=math.nan), "guidance_scale must be a finite number >= 0"),
    (dict(guidance_scale=-1.0), "guidance_scale must be a finite number >= 0"),
    (dict(width=0), "width must be a whole number >= 1"),
    (dict(width=-64), "width must be a whole number >= 1"),
    (dict(height=33), "height 33 is not a positive multiple of"),
    (dict(prompt=None), "prompt must be a string or a non-empty list of strings"),
    (dict(prompt=123), "prompt must be a string or a non-empty list of strings"),
    (dict(prompt=[]), "prompt must be a string or a non-empty list of strings"),
    (dict(negative_prompt=5, guidance_scale=7.5), "negative_prompt must be a string"),
    (dict(scheduler=123), "scheduler must be a name"),
    (dict(scheduler="no-such"), "unknown scheduler 'no-such'"),
    (dict(scheduler="ddim", num_inference_steps=1001), "DDIM cannot take 1001 steps"),
    (dict(scheduler="pndm", num_inference_steps=1), "needs at least 4 steps"),
    (dict(scheduler="euler", eta=0.5), "eta=0.5 does not apply to EulerDiscreteScheduler"),
    (dict(eta=math.inf), "eta must be a finite number >= 0"),
    (dict(guidance_cutoff=math.nan), "guidance_cutoff must be a fraction of the steps"),
    (dict(latents=np.full((1, 4, 16, 16), np.nan, np.float32)), "latents must be an array of finite real numbers"),
    (dict(latents=np.zeros((1, 4, 16, 16), np.complex64)), "latents must be an array of finite real numbers"),
    (dict(image=np.full((64, 64, 3), np.nan, np.float32)), "image must be an array of finite real numbers"),
    (dict(image=np.zeros((64, 64, 3), np.float32), strength=math.nan), "strength must be in \\(0, 1\\]"),
    (dict(output_type="jpeg"), "output_type 'jpeg' is not one of"),
    (dict(callback=5), "callback must be callable"),
    (dict(generator=object()), "generator must be an object with randn"),
    (dict(steps=20), "unknown option\\(s\\) steps"),
]


@pytest.mark.parametrize("kwargs, message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_argument_is_named(pipe, kwargs, message):
    kwargs = {"prompt": PROMPT, **kwargs}
    with pytest.raises(LeanSDError, match=message) as err:
        pipe(**kwargs)
    assert "\n" not in str(err.value)


def test_bad_defaults_are_refused_at_load():
    with pytest.raises(InvalidInputError, match="guidance_scale must be a finite number"):
        leansd.load(backend="onnxruntime", guidance_scale=math.nan)


def test_a_size_that_cannot_fit_is_refused_before_anything_is_allocated(pipe):
    with pytest.raises(InsufficientMemoryError, match=r"needs about .* GB more memory .* GB is available; .*--low-memory") as err:
        pipe(PROMPT, width=100_000, height=100_000)
    assert "\n" not in str(err.value)
    with pytest.raises(InsufficientMemoryError):
        pipe(PROMPT, num_images_per_prompt=100_000)


def test_a_prompt_over_the_text_encoders_length_is_used_whole(pipe):
    long = "a red circle " * 40  # 120 tokens: two chunks
    cut = " ".join(long.split()[:75])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        whole, first = (pipe(p, output_type="latent", seed=1, num_inference_steps=2).images for p in (long, cut))
    assert np.abs(whole - first).max() > 1e-3


def test_a_prompt_weight_that_is_not_a_number_is_refused(pipe):
    with pytest.raises(InvalidInputError, match=r"the prompt weight in ':1\.2\.3\)' is not a number"):
        pipe("a (red:1.2.3) circle", output_type="latent")


hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies
ANY = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
                st.text(max_size=12), st.lists(st.text(max_size=8), max_size=3), st.complex_numbers())
SMALL = st.one_of(ANY, st.integers(1, 3), st.sampled_from([0.0, 0.5, 1.0, 7.5]))
SIZES = st.one_of(ANY, st.sampled_from([16, 32, 48, 64]))


@hypothesis.settings(max_examples=60, deadline=None, derandomize=True)
@hypothesis.given(
    prompt=st.one_of(ANY, st.text(max_size=30)), negative_prompt=ANY, num_inference_steps=SMALL, guidance_scale=SMALL,
    num_images_per_prompt=st.one_of(ANY, st.integers(1, 2)), height=SIZES, width=SIZES, seed=ANY, scheduler=st.one_of(
        ANY, st.sampled_from(["ddim", "pndm", "euler_a", "lms", "lcm", "dpm++2m_karras"])), eta=SMALL, strength=SMALL,
    guidance_cutoff=SMALL, deep_cache=SMALL, tiny_vae=ANY, output_type=st.one_of(ANY, st.sampled_from(["latent", "np"])),
)
def test_fuzzed_arguments_give_an_image_or_a_leansd_error(pipe, **kwargs):
    try:
        out = pipe(**kwargs)
    except LeanSDError as exc:
        assert "\n" not in str(exc) and str(exc)
        return
    assert len(out.images) >= 1


def test_sd_run_refuses_a_size_that_cannot_fit_before_writing_anything(tmp_path, capsys):
    from leansd.runtime.cli import main

    code = main(["a red circle", "--width", "100000", "--height", "100000", "-o", str(tmp_path / "x.png"), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "more memory" in err[0] and "--no-memory-check" in err[0]
    assert not list(tmp_path.iterdir())


def test_an_init_image_much_larger_than_the_model_size_is_warned_about(pipe):
    big = np.zeros((256, 256, 3), np.float32)  # the bundled model draws 64x64
    with pytest.warns(LeanSDWarning, match="the output is 256x256 because the init image is; this model draws at 64x64"):
        pipe(PROMPT, image=big, strength=0.5, output_type="latent")


def test_memory_estimate_counts_cross_attention_only_blocks_by_the_text_tokens():
    """The x4 upscaler's outer levels attend to the prompt only: their scores are pixels x 77, not pixels squared,
    so upscaling 512x512 to 2048x2048 is estimated at gigabytes, not the hundreds of GB full self-attention would take."""
    from leansd.runtime.budget import unet_elements

    config = {"block_out_channels": [256, 512, 512, 1024], "layers_per_block": 2, "attention_head_dim": 8,
              "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]}
    self_attention = unet_elements(config, 2, 512, 512, fused_attention=False)
    cross_only = unet_elements({**config, "only_cross_attention": [True, True, True, False]}, 2, 512, 512, fused_attention=False)
    assert self_attention * 4 / 2**30 > 100  # hundreds of GB: every pixel would attend to every pixel at 256x256
    assert cross_only * 4 / 2**30 < 20
    level3 = 2 * 8 * 64 * 64 * 64 * 64  # the innermost level keeps its self-attention
    assert cross_only >= 2 * level3


def test_decode_is_tiled_by_default_when_a_whole_decode_would_not_fit(monkeypatch):
    """vae_tiling=None: tiles whenever decoding whole clearly exceeds the memory available (as for the x4 upscaler's
    2048x2048 outputs), not only in low-memory mode; explicit True/False still decide."""
    import numpy as np

    import leansd
    from leansd.runtime import budget

    pipe = leansd.load(backend="onnxruntime")
    call = dict(prompt="a red circle on a blue background", seed=3, num_inference_steps=2, height=128, width=128, output_type="np")
    tiled, whole = pipe(vae_tiling=True, **call).images, pipe(vae_tiling=False, **call).images
    assert not np.array_equal(tiled, whole)  # at 128x128 the bundled model's decoder works in several tiles
    assert np.array_equal(pipe(**call).images, whole)  # plenty of memory: whole, as before
    monkeypatch.setattr(budget, "available_bytes", lambda: 1024)
    assert np.array_equal(pipe(memory_check=False, **call).images, tiled)
    assert np.array_equal(pipe(memory_check=False, vae_tiling=False, **call).images, whole)
