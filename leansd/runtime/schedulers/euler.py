"""Euler (Karras et al., 2022, Algorithm 2 without churn): reproduces diffusers' `EulerDiscreteScheduler`.

Each step follows the derivative (sample - denoised) / sigma from one noise level to the next. The plan
(timesteps spaced over the training range; sigmas interpolated from the training schedule, or Karras /
exponential noise levels) is common.sigma_plan, shared with Euler ancestral and LMS.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .common import (
    Plan,
    StepResult,
    as_f64,
    check_common,
    f32,
    require,
    sigma_add_noise,
    sigma_denoise,
    sigma_plan,
    sigma_scale_model_input,
)

NAME = "EulerDiscreteScheduler"


@dataclass(frozen=True)
class Config:
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: Any = None
    prediction_type: str = "epsilon"
    interpolation_type: str = "linear"
    use_karras_sigmas: bool | None = False
    use_exponential_sigmas: bool | None = False
    use_beta_sigmas: bool | None = False
    sigma_min: float | None = None
    sigma_max: float | None = None
    timestep_spacing: str = "linspace"
    timestep_type: str = "discrete"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False
    final_sigmas_type: str = "zero"

    def __post_init__(self) -> None:
        check_common(self, ("epsilon", "v_prediction", "sample", "original_sample"))
        require("interpolation_type", self.interpolation_type, ("linear",))
        require("timestep_type", self.timestep_type, ("discrete", "continuous"))
        require("final_sigmas_type", self.final_sigmas_type, ("zero", "sigma_min"))


def uses_noise(eta: float = 0.0) -> bool:
    return False


plan = sigma_plan
scale_model_input = sigma_scale_model_input
add_noise = sigma_add_noise


def step(
    config: Config, plan: Plan, i: int, model_output: np.ndarray, sample: np.ndarray, state: Any = None, noise: np.ndarray | None = None
) -> StepResult:
    k = plan.begin_index + i
    sigma, sigma_next = plan.sigmas[k], plan.sigmas[k + 1]
    x = as_f64(sample)
    x0 = sigma_denoise(config.prediction_type, as_f64(model_output), x, sigma)
    derivative = (x - x0) / sigma
    return StepResult(f32(x + derivative * (sigma_next - sigma)), f32(x0), None)
