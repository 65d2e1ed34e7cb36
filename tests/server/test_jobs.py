"""Job internals that HTTP cannot pin down: how often previews are decoded."""
from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="needs the server extra")

from leansd.server.jobs import PREVIEW_SHARE, Job  # noqa: E402


class SlowPreviews:
    """A pipeline whose preview decode takes `seconds` (a full VAE on a large image)."""

    def __init__(self, seconds: float):
        self.seconds, self.calls = seconds, 0

    def preview(self, latents):
        self.calls += 1
        time.sleep(self.seconds)
        return np.full((1, 8, 8, 3), latents.mean(), dtype=np.float32)


def job_with(pipe) -> Job:
    spec = SimpleNamespace(count=1, resolved_steps=lambda: 10, model=SimpleNamespace(pipe=pipe))
    return Job(spec, "test")


def test_previews_take_a_bounded_share_of_the_time():
    pipe = SlowPreviews(0.05)
    job = job_with(pipe)
    assert job.preview() is None  # before the first step
    job.progress(0, 1, 10, np.zeros((1, 4, 2, 2)))
    first = job.preview()
    made_first = time.monotonic()
    assert pipe.calls == 1 and first[0] == job.version
    assert job.preview() == first and pipe.calls == 1  # the same step: decoded once
    job.progress(0, 2, 10, np.ones((1, 4, 2, 2)))
    assert job.preview() == first and pipe.calls == 1  # too soon after a 0.05 s decode: the last one again
    while (second := job.preview()) == first:  # a new one once the wait is over
        assert time.monotonic() - made_first < 10
        time.sleep(0.005)
    # The decode took at least 0.05 s, so the next waited at least that / PREVIEW_SHARE - that.
    assert time.monotonic() - made_first >= 0.05 * (1 / PREVIEW_SHARE - 1) - 0.02
    assert pipe.calls == 2 and second[0] == job.version and second[1] != first[1]


def test_cheap_previews_follow_every_step():
    pipe = SlowPreviews(0.0)
    job = job_with(pipe)
    for step in range(1, 6):
        job.progress(0, step, 10, np.full((1, 4, 2, 2), step / 10))
        assert job.preview()[0] == job.version
        time.sleep(0.1)  # a step far longer than decoding an 8x8 preview
    assert pipe.calls == 5
