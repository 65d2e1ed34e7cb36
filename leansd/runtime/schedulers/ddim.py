"""DDIM (Song et al., 2020): reproduces diffusers' `DDIMScheduler`.

Deterministic with eta=0; with eta>0 each step adds `noise` scaled by the DDIM variance.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .common import (
    Plan,
    StepResult,
    UnsupportedSchedulerOption,
    alpha_add_noise,
    alpha_at,
    alpha_plan,
    as_f64,
    check_common,
    f32,
    require_flag_off,
    spaced_timesteps,
    split_prediction,
    unscaled_model_input,
)

NAME = "DDIMScheduler"


@dataclass(frozen=True)
class Config:
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: Any = None
    clip_sample: bool = True
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    prediction_type: str = "epsilon"
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    clip_sample_range: float = 1.0
    sample_max_value: float = 1.0
    timestep_spacing: str = "leading"
    rescale_betas_zero_snr: bool = False

    def __post_init__(self) -> None:
        check_common(self, ("epsilon", "sample", "v_prediction"))
        require_flag_off(self, "thresholding")


def uses_noise(eta: float = 0.0) -> bool:
    """With eta > 0 every step adds fresh noise."""
    return eta > 0


def plan(config: Config, num_inference_steps: int, strength: float = 1.0, eta: float = 0.0) -> Plan:
    if num_inference_steps > config.num_train_timesteps:
        raise UnsupportedSchedulerOption(f"DDIM cannot take {num_inference_steps} steps: at most num_train_timesteps ({config.num_train_timesteps}); use fewer steps")
    steps = spaced_timesteps(config.timestep_spacing, config.num_train_timesteps, num_inference_steps, config.steps_offset)
    return alpha_plan(config, np.round(steps).astype(np.int64), num_inference_steps, strength, eta=float(eta))


scale_model_input = unscaled_model_input
add_noise = alpha_add_noise


def step(
    config: Config, plan: Plan, i: int, model_output: np.ndarray, sample: np.ndarray, state: Any = None, noise: np.ndarray | None = None
) -> StepResult:
    t = int(plan.timesteps[i])
    prev_t = t - config.num_train_timesteps // plan.num_inference_steps  # diffusers' step back, whatever the spacing
    a_t, a_prev = alpha_at(plan, t), alpha_at(plan, prev_t)
    x = as_f64(sample)
    x0, eps = split_prediction(config.prediction_type, as_f64(model_output), x, a_t**0.5, (1 - a_t) ** 0.5)
    if config.clip_sample:
        x0 = np.clip(x0, -config.clip_sample_range, config.clip_sample_range)
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = plan.eta * variance**0.5
    prev = a_prev**0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * eps
    if plan.eta > 0:
        if noise is None:
            raise ValueError("DDIM with eta > 0 needs a noise array at every step")
        prev = prev + std * as_f64(noise)
    return StepResult(f32(prev), f32(x0), None)
