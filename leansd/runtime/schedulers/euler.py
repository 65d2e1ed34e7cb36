"""Euler (Karras et al., 2022, Algorithm 2 without churn): reproduces diffusers' `EulerDiscreteScheduler`.

Also home of the sigma plan shared by the Euler-ancestral and LMS schedulers: timesteps spaced over the
training range, sigmas interpolated from the training schedule (or Karras / exponential noise levels).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .common import (
    Plan,
    StepResult,
    UnsupportedSchedulerOption,
    alphas_cumprod,
    as_f64,
    check_common,
    exponential_sigmas,
    f32,
    img2img_start,
    karras_sigmas,
    require,
    require_flag_off,
    sigma_table,
    sigma_to_t,
    spaced_timesteps,
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
        check_common(self)
        require("prediction_type", self.prediction_type, ("epsilon", "v_prediction", "sample", "original_sample"))
        require("interpolation_type", self.interpolation_type, ("linear",))
        require("timestep_spacing", self.timestep_spacing, ("linspace", "leading", "trailing"))
        require("timestep_type", self.timestep_type, ("discrete", "continuous"))
        require("final_sigmas_type", self.final_sigmas_type, ("zero", "sigma_min"))
        check_sigma_flags(self)


def check_sigma_flags(config: Any) -> None:
    require_flag_off(config, "use_beta_sigmas")
    if config.use_karras_sigmas and config.use_exponential_sigmas:
        raise UnsupportedSchedulerOption("use_karras_sigmas and use_exponential_sigmas cannot both be true; choose one")


def sigma_plan(
    config: Any,
    num_inference_steps: int,
    strength: float,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    final_sigma_min: bool = False,
    zero_snr_floor: bool = True,
) -> Plan:
    """The plan of the discrete-sigma schedulers (Euler, Euler ancestral, LMS)."""
    n = num_inference_steps
    acp = alphas_cumprod(config, zero_snr_floor=zero_snr_floor)
    table = sigma_table(acp)
    log_table = np.log(table)
    steps = spaced_timesteps(config.timestep_spacing, config.num_train_timesteps, n, config.steps_offset)
    timesteps: np.ndarray = steps.astype(np.float32)
    sigmas = np.interp(timesteps, np.arange(len(table)), table)
    lo = sigma_min if sigma_min is not None else float(sigmas[-1])
    hi = sigma_max if sigma_max is not None else float(sigmas[0])
    if getattr(config, "use_karras_sigmas", False):
        sigmas = karras_sigmas(lo, hi, n)
        timesteps = sigma_to_t(sigmas, log_table)
    elif getattr(config, "use_exponential_sigmas", False):
        sigmas = exponential_sigmas(lo, hi, n)
        timesteps = sigma_to_t(sigmas, log_table)
    last = float(table[0]) if final_sigma_min else 0.0
    sigmas32 = np.concatenate([sigmas, [last]]).astype(np.float32)
    if getattr(config, "timestep_type", "discrete") == "continuous" and config.prediction_type == "v_prediction":
        timesteps = np.float32(0.25) * np.log(sigmas32[:-1])
    schedule = timesteps.astype(np.float32)
    peak = sigmas32.max()
    init_sigma = peak if config.timestep_spacing in ("linspace", "trailing") else np.sqrt(peak * peak + np.float32(1.0))
    start = img2img_start(n, strength)
    return Plan(
        timesteps=schedule[start:],
        init_noise_sigma=float(init_sigma),
        num_inference_steps=n,
        begin_index=start,
        schedule=schedule,
        sigmas=sigmas32.astype(np.float64),
        alphas_cumprod=acp,
    )


def uses_noise(eta: float = 0.0) -> bool:
    return False


def plan(config: Config, num_inference_steps: int, strength: float = 1.0) -> Plan:
    return sigma_plan(
        config, num_inference_steps, strength, config.sigma_min, config.sigma_max, config.final_sigmas_type == "sigma_min"
    )


def scale_model_input(config: Any, plan: Plan, i: int, sample: np.ndarray) -> np.ndarray:
    sigma = plan.sigmas[plan.begin_index + i]
    return f32(as_f64(sample) / (sigma**2 + 1) ** 0.5)


def denoise(prediction_type: str, model_output: np.ndarray, sample: np.ndarray, sigma: float) -> np.ndarray:
    """Clean-sample estimate from a model output at noise level sigma (sample in sigma scale)."""
    if prediction_type == "epsilon":
        return sample - sigma * model_output
    if prediction_type == "v_prediction":
        return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
    return model_output  # "sample" / "original_sample"


def step(
    config: Config,
    plan: Plan,
    i: int,
    model_output: np.ndarray,
    sample: np.ndarray,
    state: Any = None,
    noise: np.ndarray | None = None,
) -> StepResult:
    k = plan.begin_index + i
    sigma, sigma_next = plan.sigmas[k], plan.sigmas[k + 1]
    x = as_f64(sample)
    x0 = denoise(config.prediction_type, as_f64(model_output), x, sigma)
    derivative = (x - x0) / sigma
    return StepResult(f32(x + derivative * (sigma_next - sigma)), f32(x0), None)


def add_noise(config: Any, plan: Plan, original: np.ndarray, noise: np.ndarray) -> np.ndarray:
    return f32(as_f64(original) + as_f64(noise) * plan.sigmas[plan.begin_index])
