"""The denoising loop: the one place where steps happen."""
from __future__ import annotations

import numpy as np

from leansd.runtime.conditioning import Conditioning
from leansd.runtime.denoiser import DenoiserRun
from leansd.runtime.errors import Cancelled
from leansd.runtime.rng import NoiseSource
from leansd.runtime.schedulers import Plan, Scheduler
from leansd.runtime.settings import StepCallback
from leansd.runtime.tasks import AfterStep


def denoise(
    denoiser: DenoiserRun, scheduler: Scheduler, plan: Plan, latents: np.ndarray, cond: Conditioning,
    noise: NoiseSource, callback: StepCallback | None = None, after_step: AfterStep | None = None,
) -> np.ndarray:
    """Run every step of `plan` from `latents`: scale -> denoise (with guidance) -> scheduler step -> the task's
    `after_step` (if it has one) -> callback.

    A callback returning False stops the loop with `Cancelled`.
    """
    total = len(plan.timesteps)
    state = None
    for i, t in enumerate(plan.timesteps):
        model_input = scheduler.scale_model_input(plan, i, latents).astype(np.float32, copy=False)
        output = denoiser.predict(model_input, t, cond, i)
        step_noise = noise.randn(latents.shape) if scheduler.uses_noise else None
        result = scheduler.step(plan, i, output, latents, state, step_noise)
        latents, state = result.prev_sample.astype(np.float32, copy=False), result.state
        if after_step is not None:
            latents = after_step(i, latents)
        if callback is not None and callback(i, total, latents, result.denoised) is False:
            raise Cancelled(f"generation cancelled by the step callback after step {i + 1} of {total}")
    return latents
