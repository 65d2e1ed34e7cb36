"""Euler ancestral: reproduces diffusers' `EulerAncestralDiscreteScheduler`.

Each step takes an Euler step down to sigma_down, then adds fresh `noise` scaled by sigma_up, so that
the noise level lands on the next sigma. diffusers draws that noise with `randn_tensor` inside the
step; pass the same draw as `noise`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .common import Plan, StepResult, as_f64, check_common, f32, sigma_add_noise, sigma_denoise, sigma_plan, sigma_scale_model_input

NAME = "EulerAncestralDiscreteScheduler"


@dataclass(frozen=True)
class Config:
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: Any = None
    prediction_type: str = "epsilon"
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False

    def __post_init__(self) -> None:
        check_common(self, ("epsilon", "v_prediction"))


def uses_noise(eta: float = 0.0) -> bool:
    """Every step takes fresh noise."""
    return True


plan = sigma_plan
scale_model_input = sigma_scale_model_input
add_noise = sigma_add_noise


def step(
    config: Config, plan: Plan, i: int, model_output: np.ndarray, sample: np.ndarray, state: Any = None, noise: np.ndarray | None = None
) -> StepResult:
    if noise is None:
        raise ValueError("Euler ancestral needs a noise array at every step")
    k = plan.begin_index + i
    sigma, sigma_next = plan.sigmas[k], plan.sigmas[k + 1]
    x = as_f64(sample)
    x0 = sigma_denoise(config.prediction_type, as_f64(model_output), x, sigma)
    sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
    sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
    derivative = (x - x0) / sigma
    prev = x + derivative * (sigma_down - sigma) + as_f64(noise) * sigma_up
    return StepResult(f32(prev), f32(x0), None)
