"""Shared scheduler pieces: noise schedules, timestep spacing, sigma helpers, the Plan and StepResult records.

Everything here is plain numpy. Schedule tables are rebuilt the way diffusers builds them in float32
(torch's float32 ``linspace`` and ``cumprod``), held as float64 so the per-step arithmetic runs in
float64; samples leave the schedulers as float32.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any, TypeVar

import numpy as np

from leansd.runtime.errors import InvalidInputError

C = TypeVar("C")

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("leading", "trailing", "linspace")


class UnsupportedSchedulerOption(InvalidInputError):
    """A scheduler config key or option holds a value leansd does not implement (or an unknown scheduler name),
    or a step count the scheduler cannot plan."""


def require(key: str, value: Any, supported: Iterable[Any]) -> None:
    """Raise UnsupportedSchedulerOption naming the key, the value and what is supported."""
    supported = tuple(supported)
    # compare by value, but never let True pass for 1 (or the reverse)
    if not any(value is s or (value == s and isinstance(value, bool) == isinstance(s, bool)) for s in supported):
        choices = ", ".join(repr(s) for s in supported)
        raise UnsupportedSchedulerOption(f"scheduler option {key}={value!r} is not supported; supported values: {choices}")


def require_flag_off(config: Any, *keys: str) -> None:
    """Check boolean options we do not implement are off (None counts as off, as in diffusers)."""
    for key in keys:
        if getattr(config, key):
            require(key, getattr(config, key), (False,))


@dataclass(frozen=True, eq=False)
class Plan:
    """Everything a scheduler needs for one generation; the same plan serves every step."""

    timesteps: np.ndarray  # what the UNet is fed, one entry per UNet call (diffusers' values and dtype)
    init_noise_sigma: float  # scale of the initial noise for text-to-image
    num_inference_steps: int  # the step count asked for (before img2img truncation)
    begin_index: int = 0  # index of timesteps[0] in `schedule` (img2img start)
    schedule: np.ndarray | None = None  # the untruncated timesteps
    sigmas: np.ndarray | None = None  # untruncated sigmas (plus the final one) for sigma-based schedulers
    alphas_cumprod: np.ndarray | None = None  # the training schedule, float64 holding float32 values
    final_alpha_cumprod: float = 1.0
    eta: float = 0.0  # DDIM's stochasticity
    prk_steps: int = 0  # PNDM: how many Runge-Kutta warm-up calls open the schedule


@dataclass(frozen=True, eq=False)
class StepResult:
    prev_sample: np.ndarray  # the sample for the next step (float32)
    denoised: np.ndarray  # the estimate of the clean sample at this step (float32)
    state: Any  # pass back to the next step()


def torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace(start, end, steps, dtype=float32), bit for bit.

    torch fills the first half from `start` and the second half from `end`, each value a fused
    multiply-add in float32 arithmetic; float64 evaluation of the product then one rounding is exact here.
    """
    f32 = np.float32
    start32, end32 = f32(start), f32(end)
    if steps == 1:
        return np.array([start32], dtype=np.float32)
    step = f32(f32(end32 - start32) / f32(steps - 1))
    idx = np.arange(steps, dtype=np.float64)
    low = (np.float64(start32) + np.float64(step) * idx).astype(np.float32)
    high = (np.float64(end32) - np.float64(step) * (steps - 1 - idx)).astype(np.float32)
    return np.where(idx < steps // 2, low, high)


def _cosine_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)], dtype=np.float32)


def betas(config: Any) -> np.ndarray:
    """The float32 beta table of a config (trained_betas wins over beta_schedule, as in diffusers)."""
    n = config.num_train_timesteps
    if config.trained_betas is not None:
        return np.asarray(config.trained_betas, dtype=np.float32)
    if config.beta_schedule == "linear":
        return torch_linspace_f32(config.beta_start, config.beta_end, n)
    if config.beta_schedule == "scaled_linear":
        root = torch_linspace_f32(config.beta_start**0.5, config.beta_end**0.5, n)
        return root * root
    if config.beta_schedule == "squaredcos_cap_v2":
        return _cosine_betas(n)
    require("beta_schedule", config.beta_schedule, BETA_SCHEDULES)
    raise AssertionError  # unreachable


def _cumprod_f32(alphas: np.ndarray) -> np.ndarray:
    # torch accumulates a float32 cumprod in double and rounds each output to float32
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def _rescale_zero_terminal_snr(b: np.ndarray) -> np.ndarray:
    """Shift and scale sqrt(alphas_cumprod) so the last timestep has zero SNR (float32 like diffusers)."""
    root = np.sqrt(_cumprod_f32(np.float32(1.0) - b))
    first, last = root[0], root[-1]
    root = (root - last) * (first / (first - last))
    bar = root * root
    alphas = np.concatenate([bar[:1], bar[1:] / bar[:-1]])
    return (np.float32(1.0) - alphas).astype(np.float32)


def alphas_cumprod(config: Any, zero_snr_floor: bool = False) -> np.ndarray:
    """Cumulative product of alphas as float64 holding diffusers' float32 values.

    `zero_snr_floor`: the sigma-based schedulers replace a zero last entry by 2**-24 to keep sigma finite.
    """
    b = betas(config)
    rescale = getattr(config, "rescale_betas_zero_snr", False)
    if rescale:
        b = _rescale_zero_terminal_snr(b)
    acp = _cumprod_f32(np.float32(1.0) - b)
    if rescale and zero_snr_floor:
        acp[-1] = 2.0**-24
    return acp.astype(np.float64)


def sigma_table(acp: np.ndarray) -> np.ndarray:
    """sqrt((1 - acp) / acp) per training timestep, float32 values (ascending in t)."""
    a = acp.astype(np.float32)
    ratio = (np.float32(1.0) - a) / a
    return np.sqrt(ratio.astype(np.float64)).astype(np.float32)


def spaced_timesteps(spacing: str, num_train: int, n: int, steps_offset: int) -> np.ndarray:
    """Descending timesteps as float64, unrounded for 'linspace' (each scheduler rounds/casts its own way)."""
    require("timestep_spacing", spacing, SPACINGS)
    if spacing == "linspace":
        return np.linspace(0, num_train - 1, n)[::-1].copy()
    if spacing == "leading":
        return (np.arange(n) * (num_train // n))[::-1].astype(np.float64) + steps_offset
    return np.round(np.arange(num_train, 0, -num_train / n)) - 1.0


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) noise levels: evenly spaced in sigma**(1/rho)."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """Noise levels evenly spaced in log sigma."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma, interpolating linearly in log sigma."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    # index of the last table entry at or below each log sigma (0 when none), kept one short of the end
    low = np.clip(np.searchsorted(log_sigmas, log_sigma, side="right") - 1, 0, len(log_sigmas) - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return (1 - w) * low + w * (low + 1)


def img2img_start(num_inference_steps: int, strength: float, order: int = 1) -> int:
    """Index of the first schedule entry used for a given strength, as diffusers' img2img pipeline computes it."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
    init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
    return max(num_inference_steps - init_timestep, 0) * order


def alpha_plan(config: Any, schedule: np.ndarray, num_inference_steps: int, strength: float, **extra: Any) -> Plan:
    """The plan of a scheduler that steps on the alphas_cumprod table (DDIM, PNDM, LCM): integer timesteps,
    unit initial noise, truncated for img2img, and the alpha used past the last timestep."""
    acp = alphas_cumprod(config)
    start = img2img_start(num_inference_steps, strength)
    return Plan(
        timesteps=schedule[start:],
        init_noise_sigma=1.0,
        num_inference_steps=num_inference_steps,
        begin_index=start,
        schedule=schedule,
        alphas_cumprod=acp,
        final_alpha_cumprod=1.0 if config.set_alpha_to_one else float(acp[0]),
        **extra,
    )


def unscaled_model_input(config: Any, plan: Plan, i: int, sample: np.ndarray) -> np.ndarray:
    """Schedulers on the alphas_cumprod table feed the UNet the sample as it is."""
    return sample


def config_from_dict(cls: type[C], raw: Mapping[str, Any], **overrides: Any) -> C:
    """Build a Config the way diffusers' `from_config` picks constructor arguments from a saved dict.

    Keys the class does not know are ignored. Keys listed in `_use_default_values` were defaults of the
    class that wrote the dict, so they are dropped and this class's own defaults apply instead.
    """
    defaults_used = set(raw.get("_use_default_values") or ())
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    kwargs = {k: v for k, v in raw.items() if k in names and k not in defaults_used}
    kwargs.update(overrides)
    return cls(**kwargs)


def check_common(config: Any) -> None:
    """Checks every Config shares: the beta schedule, and trained_betas stored as a tuple (hashable, immutable)."""
    if config.trained_betas is not None:
        if not isinstance(config.trained_betas, tuple):
            object.__setattr__(config, "trained_betas", tuple(float(b) for b in np.asarray(config.trained_betas).ravel()))
    else:
        require("beta_schedule", config.beta_schedule, BETA_SCHEDULES)


def as_f64(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def f32(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)
