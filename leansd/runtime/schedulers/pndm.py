"""PNDM / PLMS (Liu et al., 2022): reproduces diffusers' `PNDMScheduler`.

With `skip_prk_steps=True` (every Stable Diffusion config) this is PLMS: linear multistep on the noise
prediction, warmed up by one Heun-like step, for N + 1 UNet calls. With `skip_prk_steps=False` the
first 12 calls are pseudo Runge-Kutta steps at the four highest timesteps, then PLMS runs the rest.
The step counter diffusers keeps is the step index `i` here: a truncated img2img plan restarts it at 0,
exactly as diffusers does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

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
    spaced_timesteps,
    split_prediction,
    unscaled_model_input,
)

NAME = "PNDMScheduler"


@dataclass(frozen=True)
class Config:
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: Any = None
    skip_prk_steps: bool = False
    set_alpha_to_one: bool = False
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0

    def __post_init__(self) -> None:
        check_common(self, ("epsilon", "v_prediction"))


class State(NamedTuple):
    ets: tuple[np.ndarray, ...]  # past model outputs kept for the multistep formula
    cur_sample: np.ndarray | None  # the sample a multi-call step started from
    cur_model_output: Any  # Runge-Kutta running sum (0 when empty)


def uses_noise(eta: float = 0.0) -> bool:
    return False


def plan(config: Config, num_inference_steps: int, strength: float = 1.0) -> Plan:
    n = num_inference_steps
    spaced = spaced_timesteps(config.timestep_spacing, config.num_train_timesteps, n, config.steps_offset)
    ascending = np.round(spaced[::-1]).astype(np.int64)
    if config.skip_prk_steps:
        prk = np.zeros(0, np.int64)
        # the second-highest timestep is visited twice: once for the warm-up step, once to finish it
        plms = np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1]
    else:
        # Runge-Kutta stages at the four highest timesteps and half a step below each, then PLMS on the rest
        if n < 4:
            raise UnsupportedSchedulerOption(
                f"PNDM with Runge-Kutta warm-up (skip_prk_steps=False) needs at least 4 steps, got {n}; "
                "use more steps or the plms scheduler (skip_prk_steps=True)"
            )
        half = config.num_train_timesteps // n // 2
        pairs = np.repeat(ascending[-4:], 2) + np.tile(np.array([0, half]), 4)
        prk = np.repeat(pairs[:-1], 2)[1:-1][::-1]
        plms = ascending[:-3][::-1]
    return alpha_plan(config, np.concatenate([prk, plms]).astype(np.int64), n, strength, prk_steps=len(prk))


scale_model_input = unscaled_model_input
add_noise = alpha_add_noise


def _prev_sample(config: Config, plan: Plan, sample: np.ndarray, t: int, prev_t: int, eps: np.ndarray) -> np.ndarray:
    """Move `sample` from timestep t to prev_t along the noise estimate (PNDM's transfer formula)."""
    a_t, a_prev = alpha_at(plan, t), alpha_at(plan, prev_t)
    if config.prediction_type == "v_prediction":  # the noise estimate a v-prediction implies
        eps = a_t**0.5 * eps + (1 - a_t) ** 0.5 * sample
    denom = a_t * (1 - a_prev) ** 0.5 + (a_t * (1 - a_t) * a_prev) ** 0.5
    return (a_prev / a_t) ** 0.5 * sample - (a_prev - a_t) * eps / denom


def _step_prk(config: Config, plan: Plan, i: int, t: int, out: np.ndarray, x: np.ndarray, st: State) -> tuple[np.ndarray, State]:
    half = config.num_train_timesteps // plan.num_inference_steps // 2
    prev_t = t - (0 if i % 2 else half)
    base_t = int(plan.schedule[i // 4 * 4])  # every stage of a Runge-Kutta step starts from its first timestep
    ets, cur_sample, acc = st
    phase = i % 4
    if phase == 0:
        acc, ets, cur_sample = acc + out / 6, ets + (out,), x
    elif phase in (1, 2):
        acc = acc + out / 3
    else:
        out, acc = acc + out / 6, 0
    start = as_f64(cur_sample) if cur_sample is not None else x
    return _prev_sample(config, plan, start, base_t, prev_t, out), State(ets, cur_sample, acc)


def _step_plms(config: Config, plan: Plan, i: int, t: int, out: np.ndarray, x: np.ndarray, st: State) -> tuple[np.ndarray, State]:
    ratio = config.num_train_timesteps // plan.num_inference_steps
    ets, cur_sample, acc = st
    prev_t = t - ratio
    if i != 1:
        ets = ets[-3:] + (out,)
    else:  # second call of the warm-up: finish the step that started one ratio higher
        prev_t, t = t, t + ratio
    e = [as_f64(v) for v in ets]
    if len(e) == 1 and i == 0:
        cur_sample = f32(x)
    elif len(e) == 1 and i == 1:
        out, x, cur_sample = (out + e[-1]) / 2, as_f64(cur_sample), None
    elif len(e) == 2:
        out = (3 * e[-1] - e[-2]) / 2
    elif len(e) == 3:
        out = (23 * e[-1] - 16 * e[-2] + 5 * e[-3]) / 12
    else:
        out = (55 * e[-1] - 59 * e[-2] + 37 * e[-3] - 9 * e[-4]) / 24
    return _prev_sample(config, plan, x, t, prev_t, out), State(ets, cur_sample, acc)


def step(
    config: Config, plan: Plan, i: int, model_output: np.ndarray, sample: np.ndarray, state: Any = None, noise: np.ndarray | None = None
) -> StepResult:
    st = state if state is not None else State((), None, 0)
    t = int(plan.timesteps[i])
    out, x = as_f64(model_output), as_f64(sample)
    if i < plan.prk_steps:
        prev, st = _step_prk(config, plan, i, t, out, x, st)
    else:
        prev, st = _step_plms(config, plan, i, t, out, x, st)
    # diffusers reports no clean-sample estimate for PNDM; give the one this UNet call implies
    a_t = alpha_at(plan, t)
    denoised, _ = split_prediction(config.prediction_type, out, x, a_t**0.5, (1 - a_t) ** 0.5)
    return StepResult(f32(prev), f32(denoised), st._replace(ets=tuple(f32(e) for e in st.ets)))
