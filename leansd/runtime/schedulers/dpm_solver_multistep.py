"""DPM-Solver++ multistep (Lu et al., 2022): reproduces diffusers' `DPMSolverMultistepScheduler`.

Implements algorithm_type "dpmsolver++" (diffusers' default; "deis" configs map to it as in diffusers),
solver orders 1-3, midpoint and heun second-order variants, Karras / exponential sigmas, and the
lower-order warm-up and final steps. The state is the last `solver_order` clean-sample estimates and the
number of lower-order steps taken so far.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from .common import (
    Plan,
    StepResult,
    alphas_cumprod,
    as_f64,
    check_common,
    f32,
    make_plan,
    require,
    require_flag_off,
    sigma_schedule,
    sigma_table,
    split_prediction,
    unscaled_model_input,
)

NAME = "DPMSolverMultistepScheduler"


@dataclass(frozen=True)
class Config:
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: Any = None
    solver_order: int = 2
    prediction_type: str = "epsilon"
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    use_lu_lambdas: bool = False
    use_flow_sigmas: bool = False
    flow_shift: float = 1.0
    final_sigmas_type: str = "zero"
    lambda_min_clipped: float = -float("inf")
    variance_type: str | None = None
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False
    use_dynamic_shifting: bool = False
    time_shift_type: str = "exponential"

    def __post_init__(self) -> None:
        # diffusers silently maps the DEIS / UniPC names it inherits from compatible configs
        if self.algorithm_type == "deis":
            object.__setattr__(self, "algorithm_type", "dpmsolver++")
        if self.solver_type in ("logrho", "bh1", "bh2"):
            object.__setattr__(self, "solver_type", "midpoint")
        check_common(self, ("epsilon", "v_prediction", "sample"))
        require("algorithm_type", self.algorithm_type, ("dpmsolver++",))
        require("solver_type", self.solver_type, ("midpoint", "heun"))
        require("solver_order", self.solver_order, (1, 2, 3))
        require("final_sigmas_type", self.final_sigmas_type, ("zero", "sigma_min"))
        require("variance_type", self.variance_type, (None,))
        require_flag_off(self, "thresholding", "use_lu_lambdas", "use_flow_sigmas", "use_dynamic_shifting")


class State(NamedTuple):
    outputs: tuple[np.ndarray, ...]  # clean-sample estimates of the last steps, oldest first
    lower_order_nums: int


def _timesteps(config: Config, acp: np.ndarray, n: int) -> np.ndarray:
    """Descending integer timesteps, spaced over the training timesteps whose half log-SNR is not below lambda_min_clipped."""
    t_train = config.num_train_timesteps
    alpha, sigma = np.sqrt(acp), np.sqrt(1 - acp)
    lambdas = (np.log(alpha) - np.log(sigma)).astype(np.float32)
    last = t_train - int(np.searchsorted(lambdas[::-1], config.lambda_min_clipped))
    if config.timestep_spacing == "linspace":
        steps = np.linspace(0, last - 1, n + 1).round()[::-1][:-1]
    elif config.timestep_spacing == "leading":
        steps = (np.arange(n + 1) * (last // (n + 1)))[::-1][:-1] + config.steps_offset
    else:
        steps = np.arange(last, 0, -t_train / n).round() - 1
    return steps.astype(np.int64)


def uses_noise(eta: float = 0.0) -> bool:
    return False


def plan(config: Config, num_inference_steps: int, strength: float = 1.0) -> Plan:
    acp = alphas_cumprod(config, zero_snr_floor=True)
    table = sigma_table(acp)
    timesteps = _timesteps(config, acp, num_inference_steps)
    # Karras / exponential sigmas span the whole training table here (Euler's span its planned timesteps)
    sigmas, steps = sigma_schedule(config, timesteps, table, num_inference_steps, float(table[0]), float(table[-1]))
    if config.use_karras_sigmas and config.beta_schedule != "squaredcos_cap_v2":
        steps = steps.round()
    schedule = steps.astype(np.int64)
    return make_plan(schedule, num_inference_steps, strength, init_noise_sigma=1.0, sigmas=sigmas.astype(np.float64), alphas_cumprod=acp)


scale_model_input = unscaled_model_input


def _alpha_sigma(sigma: float) -> tuple[float, float]:
    """(alpha_t, sigma_t) of the variance-preserving process at noise level sigma."""
    alpha = 1 / (sigma**2 + 1) ** 0.5
    return alpha, sigma * alpha


def _lambda(sigma: float) -> float:
    """Half log-SNR; +inf at sigma 0 (the final step lands on the clean sample)."""
    alpha, sig = _alpha_sigma(sigma)
    return math.inf if sig == 0 else math.log(alpha) - math.log(sig)


def _update(config: Config, sig: np.ndarray, k: int, order: int, x: np.ndarray, m: list[np.ndarray]) -> np.ndarray:
    """One DPM-Solver++ update of the given order from step k to k + 1; m holds estimates, newest last."""
    alpha_t, sigma_t = _alpha_sigma(sig[k + 1])
    _, sigma_s0 = _alpha_sigma(sig[k])
    h = _lambda(sig[k + 1]) - _lambda(sig[k])
    phi = math.expm1(-h) if math.isfinite(h) else -1.0  # exp(-h) - 1
    out = (sigma_t / sigma_s0) * x - (alpha_t * phi) * m[-1]
    if order == 1:
        return out
    r0 = (_lambda(sig[k]) - _lambda(sig[k - 1])) / h
    d1_0 = (1.0 / r0) * (m[-1] - m[-2])
    if order == 2:
        if config.solver_type == "midpoint":
            return out - 0.5 * (alpha_t * phi) * d1_0
        return out + alpha_t * (phi / h + 1.0) * d1_0
    r1 = (_lambda(sig[k - 1]) - _lambda(sig[k - 2])) / h
    d1_1 = (1.0 / r1) * (m[-2] - m[-3])
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
    return out + alpha_t * (phi / h + 1.0) * d1 - alpha_t * ((phi + h) / h**2 - 0.5) * d2


def step(
    config: Config, plan: Plan, i: int, model_output: np.ndarray, sample: np.ndarray, state: Any = None, noise: np.ndarray | None = None
) -> StepResult:
    st = state if state is not None else State((), 0)
    k = plan.begin_index + i
    n = len(plan.schedule)  # diffusers counts the steps it planned, not the ones asked for
    x = as_f64(sample)
    x0, _ = split_prediction(config.prediction_type, as_f64(model_output), x, *_alpha_sigma(plan.sigmas[k]))
    outputs = (st.outputs + (f32(x0),))[-config.solver_order :]
    short = config.lower_order_final and n < 15
    final_first = k == n - 1 and (config.euler_at_final or short or config.final_sigmas_type == "zero")
    final_second = k == n - 2 and short
    if config.solver_order == 1 or st.lower_order_nums < 1 or final_first:
        order = 1
    elif config.solver_order == 2 or st.lower_order_nums < 2 or final_second:
        order = 2
    else:
        order = 3
    prev = _update(config, plan.sigmas, k, order, x, [as_f64(o) for o in outputs])
    return StepResult(f32(prev), f32(x0), State(outputs, min(st.lower_order_nums + 1, config.solver_order)))


def add_noise(config: Config, plan: Plan, original: np.ndarray, noise: np.ndarray, i: int = 0) -> np.ndarray:
    alpha, sig = _alpha_sigma(plan.sigmas[plan.begin_index + i])
    return f32(alpha * as_f64(original) + sig * as_f64(noise))

