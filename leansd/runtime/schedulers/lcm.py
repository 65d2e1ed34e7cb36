"""Latent consistency models (Luo et al., 2023): reproduces diffusers' `LCMScheduler`.

Each step maps the sample straight to a clean estimate (with the consistency-model boundary scalings),
then re-noises it to the next timestep with fresh `noise`; the last step returns the clean estimate and
uses no noise. Timesteps are a subset of the `original_inference_steps` distillation schedule.
As in diffusers, `timestep_spacing` is accepted but plays no part.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from leansd.runtime.errors import InvalidInputError

from .common import (
    Plan,
    StepResult,
    alpha_add_noise,
    alpha_at,
    alpha_plan,
    as_f64,
    check_common,
    f32,
    require_flag_off,
    split_prediction,
    unscaled_model_input,
)

NAME = "LCMScheduler"
SIGMA_DATA = 0.5


@dataclass(frozen=True)
class Config:
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    trained_betas: Any = None
    original_inference_steps: int = 50
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    prediction_type: str = "epsilon"
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    timestep_spacing: str = "leading"
    timestep_scaling: float = 10.0
    rescale_betas_zero_snr: bool = False

    def __post_init__(self) -> None:
        check_common(self, ("epsilon", "sample", "v_prediction"), spacings=None)  # spacing is unused, as in diffusers
        require_flag_off(self, "thresholding")


def uses_noise(eta: float = 0.0) -> bool:
    """Every step takes fresh noise."""
    return True


def plan(config: Config, num_inference_steps: int, strength: float = 1.0, strength_in_schedule: bool = False) -> Plan:
    """`strength_in_schedule`: image-to-image as diffusers' LatentConsistencyModelImg2ImgPipeline runs it: all `n` steps,
    picked from the first `strength` of the distillation schedule, instead of the last `strength` of the `n` steps."""
    n, original = num_inference_steps, config.original_inference_steps
    if strength_in_schedule and strength < 1.0:
        distilled = int(original * strength)
        if distilled < n:
            raise InvalidInputError(f"strength {strength} leaves {distilled} of the {original} distillation timesteps of this latent "
                                    f"consistency model, fewer than the {n} steps asked for; raise strength to {n / original:g} or lower "
                                    "the steps")
        return _plan(config, n, distilled, 1.0)
    return _plan(config, n, original, strength)


def _plan(config: Config, n: int, distilled: int, strength: float) -> Plan:
    original = config.original_inference_steps
    if original > config.num_train_timesteps:
        raise ValueError(f"original_inference_steps {original} exceeds num_train_timesteps {config.num_train_timesteps}")
    if n > config.num_train_timesteps or n > original:
        raise InvalidInputError(f"num_inference_steps {n} is more than this LCM schedule's original_inference_steps {original}; "
                                f"use at most {original} steps (LCM is made for 2 to 8)")
    k = config.num_train_timesteps // original
    origin = (np.arange(1, distilled + 1) * k - 1)[::-1]
    # n evenly spaced picks from the distillation schedule, starting at its highest timestep
    picks = np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)
    return alpha_plan(config, origin[picks].astype(np.int64), n, strength)


scale_model_input = unscaled_model_input
add_noise = alpha_add_noise


def step(
    config: Config, plan: Plan, i: int, model_output: np.ndarray, sample: np.ndarray, state: Any = None, noise: np.ndarray | None = None
) -> StepResult:
    k = plan.begin_index + i
    t = int(plan.schedule[k])
    a_t = alpha_at(plan, t)
    x = as_f64(sample)
    x0, _ = split_prediction(config.prediction_type, as_f64(model_output), x, a_t**0.5, (1 - a_t) ** 0.5)
    if config.clip_sample:
        x0 = np.clip(x0, -config.clip_sample_range, config.clip_sample_range)
    # the consistency-model boundary conditions: at t = 0 the output is the sample itself
    scaled = t * config.timestep_scaling
    c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5
    denoised = c_out * x0 + c_skip * x
    if k == plan.num_inference_steps - 1:
        return StepResult(f32(denoised), f32(denoised), None)
    if noise is None:
        raise ValueError("LCM needs a noise array at every step but the last")
    a_prev = alpha_at(plan, int(plan.schedule[k + 1]))
    prev = a_prev**0.5 * denoised + (1 - a_prev) ** 0.5 * as_f64(noise)
    return StepResult(f32(prev), f32(denoised), None)
