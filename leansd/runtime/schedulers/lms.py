"""Linear multistep (order 4) in sigma: reproduces diffusers' `LMSDiscreteScheduler`.

The coefficients integrate Lagrange basis polynomials over [sigma_i, sigma_i+1]. diffusers calls
scipy's adaptive quadrature; the integrands are polynomials of degree < 4, so a fixed Gauss-Legendre
rule with 4 nodes (exact up to degree 7) gives the same numbers without scipy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .common import Plan, StepResult, as_f64, check_common, f32, sigma_add_noise, sigma_denoise, sigma_plan, sigma_scale_model_input

NAME = "LMSDiscreteScheduler"
ORDER = 4  # diffusers' default `order` argument of step(), which pipelines never change
_NODES, _WEIGHTS = np.polynomial.legendre.leggauss(4)


@dataclass(frozen=True)
class Config:
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: Any = None
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    prediction_type: str = "epsilon"
    timestep_spacing: str = "linspace"
    steps_offset: int = 0

    def __post_init__(self) -> None:
        check_common(self, ("epsilon", "v_prediction", "sample"))


def uses_noise(eta: float = 0.0) -> bool:
    return False


plan = sigma_plan
scale_model_input = sigma_scale_model_input
add_noise = sigma_add_noise


def lms_coefficient(sigmas: np.ndarray, k: int, order: int, j: int) -> float:
    """Integral over [sigma_k, sigma_k+1] of the Lagrange basis polynomial of node sigma_(k-j)."""
    a, b = sigmas[k], sigmas[k + 1]
    tau = (b - a) / 2 * _NODES + (a + b) / 2
    basis = np.ones_like(tau)
    for m in range(order):
        if m != j:
            basis *= (tau - sigmas[k - m]) / (sigmas[k - j] - sigmas[k - m])
    return float((b - a) / 2 * np.dot(_WEIGHTS, basis))


def step(
    config: Config, plan: Plan, i: int, model_output: np.ndarray, sample: np.ndarray, state: Any = None, noise: np.ndarray | None = None
) -> StepResult:
    k = plan.begin_index + i
    sigma = plan.sigmas[k]
    x = as_f64(sample)
    x0 = sigma_denoise(config.prediction_type, as_f64(model_output), x, sigma)
    derivatives = (tuple(state or ()) + (f32((x - x0) / sigma),))[-ORDER:]
    # the order follows the global step index, so an img2img start may pair a 4th-order coefficient
    # with the single derivative it has: diffusers does exactly that
    order = min(k + 1, ORDER)
    prev = x.copy()
    for j, d in zip(range(order), reversed(derivatives), strict=False):
        prev += lms_coefficient(plan.sigmas, k, order, j) * as_f64(d)
    return StepResult(f32(prev), f32(x0), derivatives)
