"""Shared scheduler pieces: config checks, the Plan and StepResult records, noise schedules, timestep spacing,
and what the two families share: the schedulers on the alphas_cumprod table (DDIM, PNDM, LCM) and those that
step in sigma (Euler, Euler ancestral, LMS; DPM-Solver builds its sigmas the same way).

Everything here is plain numpy. Schedule tables are rebuilt the way diffusers builds them in float32
(torch's float32 ``linspace`` and ``cumprod``), held as float64 so the per-step arithmetic runs in
float64; samples leave the schedulers as float32.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any, TypeVar

import numpy as np

from leansd.runtime.errors import InvalidInputError

C = TypeVar("C")

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("linspace", "leading", "trailing")


class UnsupportedSchedulerOption(InvalidInputError):
    """A scheduler config key or option holds a value leansd does not implement (or an unknown scheduler name),
    or a step count the scheduler cannot plan."""


class SchedulerConfigTypeError(UnsupportedSchedulerOption):
    """A scheduler config value has the wrong type (a string where a number belongs...): the config is damaged,
    whichever scheduler reads it."""


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


def check_common(config: Any, prediction_types: tuple[str, ...], spacings: tuple[str, ...] | None = SPACINGS) -> None:
    """Checks every Config runs first: trained_betas stored as a tuple (hashable, immutable), else a known beta
    schedule; the prediction type; the timestep spacing (unless `spacings` is None); and, for the Configs that
    have these options, no beta sigmas and not both Karras and exponential sigmas."""
    if config.trained_betas is not None:
        if not isinstance(config.trained_betas, tuple):
            object.__setattr__(config, "trained_betas", tuple(float(b) for b in np.asarray(config.trained_betas).ravel()))
    else:
        require("beta_schedule", config.beta_schedule, BETA_SCHEDULES)
    require("prediction_type", config.prediction_type, prediction_types)
    if spacings is not None:
        require("timestep_spacing", config.timestep_spacing, spacings)
    if getattr(config, "use_beta_sigmas", False):
        require_flag_off(config, "use_beta_sigmas")
    if getattr(config, "use_karras_sigmas", False) and getattr(config, "use_exponential_sigmas", False):
        raise UnsupportedSchedulerOption("use_karras_sigmas and use_exponential_sigmas cannot both be true; choose one")


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
    # squaredcos_cap_v2 (the Config checked the name): Nichol & Dhariwal's cosine alpha-bar, betas capped at 0.999
    alpha_bar = [math.cos((i / n + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(n + 1)]
    return np.array([min(1 - alpha_bar[i + 1] / alpha_bar[i], 0.999) for i in range(n)], dtype=np.float32)


def _cumprod_f32(alphas: np.ndarray) -> np.ndarray:
    # torch accumulates a float32 cumprod in double and rounds each output to float32
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def alphas_cumprod(config: Any, zero_snr_floor: bool = False) -> np.ndarray:
    """Cumulative product of alphas as float64 holding diffusers' float32 values.

    `zero_snr_floor`: the sigma-based schedulers replace a zero last entry by 2**-24 to keep sigma finite.
    """
    b = betas(config)
    rescale = getattr(config, "rescale_betas_zero_snr", False)
    if rescale:  # shift and scale sqrt(alphas_cumprod) so the last timestep has zero SNR (in float32, like diffusers)
        root = np.sqrt(_cumprod_f32(np.float32(1.0) - b))
        first, last = root[0], root[-1]
        root = (root - last) * (first / (first - last))
        bar = root * root
        b = np.float32(1.0) - np.concatenate([bar[:1], bar[1:] / bar[:-1]])
    acp = _cumprod_f32(np.float32(1.0) - b)
    if rescale and zero_snr_floor:
        acp[-1] = 2.0**-24
    return acp.astype(np.float64)


def spaced_timesteps(spacing: str, num_train: int, n: int, steps_offset: int) -> np.ndarray:
    """Descending timesteps as float64, unrounded for 'linspace' (each scheduler rounds/casts its own way)."""
    if spacing == "linspace":
        return np.linspace(0, num_train - 1, n)[::-1].copy()
    if spacing == "leading":
        return (np.arange(n) * (num_train // n))[::-1].astype(np.float64) + steps_offset
    return np.round(np.arange(num_train, 0, -num_train / n)) - 1.0


def make_plan(schedule: np.ndarray, num_inference_steps: int, strength: float, **fields: Any) -> Plan:
    """A Plan over the whole `schedule` whose timesteps start where diffusers' img2img pipeline starts for `strength`."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
    init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
    start = max(num_inference_steps - init_timestep, 0)
    return Plan(timesteps=schedule[start:], num_inference_steps=num_inference_steps, begin_index=start, schedule=schedule, **fields)


def split_prediction(
    prediction_type: str, model_output: np.ndarray, sample: np.ndarray, alpha: float, sigma: float
) -> tuple[np.ndarray, np.ndarray]:
    """(clean-sample estimate, noise estimate) from a model output, for sample = alpha * clean + sigma * noise."""
    if prediction_type == "epsilon":
        return (sample - sigma * model_output) / alpha, model_output
    if prediction_type == "sample":
        return model_output, (sample - alpha * model_output) / sigma
    return alpha * sample - sigma * model_output, alpha * model_output + sigma * sample  # v_prediction


# Schedulers that step on the alphas_cumprod table (DDIM, PNDM, LCM): integer timesteps, unit initial noise,
# the sample fed to the UNet as it is.


def alpha_plan(config: Any, schedule: np.ndarray, num_inference_steps: int, strength: float, **extra: Any) -> Plan:
    """The plan over `schedule`, with the alpha used past the last timestep."""
    acp = alphas_cumprod(config)
    final = 1.0 if config.set_alpha_to_one else float(acp[0])
    return make_plan(schedule, num_inference_steps, strength, init_noise_sigma=1.0, alphas_cumprod=acp, final_alpha_cumprod=final, **extra)


def alpha_at(plan: Plan, t: int) -> float:
    """alphas_cumprod at training timestep t; the final alpha before timestep 0."""
    return float(plan.alphas_cumprod[t]) if t >= 0 else plan.final_alpha_cumprod


def unscaled_model_input(config: Any, plan: Plan, i: int, sample: np.ndarray) -> np.ndarray:
    return sample


def alpha_add_noise(config: Any, plan: Plan, original: np.ndarray, noise: np.ndarray, i: int = 0) -> np.ndarray:
    a = alpha_at(plan, int(plan.timesteps[i]))
    return f32(a**0.5 * as_f64(original) + (1 - a) ** 0.5 * as_f64(noise))


# Schedulers that step in sigma (Euler, Euler ancestral, LMS; DPM-Solver builds its sigmas from the same pieces):
# their sample is clean + sigma * noise, and sigma_table turns the training schedule into noise levels.


def sigma_table(acp: np.ndarray) -> np.ndarray:
    """sqrt((1 - acp) / acp) per training timestep, float32 values (ascending in t)."""
    a = acp.astype(np.float32)
    ratio = (np.float32(1.0) - a) / a
    return np.sqrt(ratio.astype(np.float64)).astype(np.float32)


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma, interpolating linearly in log sigma."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    # index of the last table entry at or below each log sigma (0 when none), kept one short of the end
    low = np.clip(np.searchsorted(log_sigmas, log_sigma, side="right") - 1, 0, len(log_sigmas) - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return (1 - w) * low + w * (low + 1)


def sigma_schedule(
    config: Any, timesteps: np.ndarray, table: np.ndarray, n: int, sigma_min: float | None = None, sigma_max: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(sigmas, timesteps): the sigmas at `timesteps`, interpolated from the training `table`, plus the final sigma,
    as float32. With Karras or exponential sigmas, n new noise levels from sigma_max down to sigma_min (default: the
    interpolated ends) replace them, and the timesteps become the fractional ones those levels map back to."""
    sigmas = np.interp(timesteps, np.arange(len(table)), table)
    karras = getattr(config, "use_karras_sigmas", False)
    if karras or getattr(config, "use_exponential_sigmas", False):
        lo = sigma_min if sigma_min is not None else float(sigmas[-1])
        hi = sigma_max if sigma_max is not None else float(sigmas[0])
        if karras:  # Karras et al. (2022): evenly spaced in sigma ** (1 / rho)
            rho = 7.0
            ramp = np.linspace(0, 1, n)
            lo_root, hi_root = lo ** (1 / rho), hi ** (1 / rho)
            sigmas = (hi_root + ramp * (lo_root - hi_root)) ** rho
        else:  # evenly spaced in log sigma
            sigmas = np.exp(np.linspace(math.log(hi), math.log(lo), n))
        timesteps = sigma_to_t(sigmas, np.log(table))
    final = float(table[0]) if getattr(config, "final_sigmas_type", "zero") == "sigma_min" else 0.0
    return np.concatenate([sigmas, [final]]).astype(np.float32), timesteps


def sigma_plan(config: Any, num_inference_steps: int, strength: float = 1.0) -> Plan:
    """The plan of Euler, Euler ancestral and LMS: timesteps spaced over the training range, float32 like
    diffusers'. Options a Config lacks take diffusers' defaults."""
    n = num_inference_steps
    acp = alphas_cumprod(config, zero_snr_floor=True)
    steps = spaced_timesteps(config.timestep_spacing, config.num_train_timesteps, n, config.steps_offset)
    sigma_range = getattr(config, "sigma_min", None), getattr(config, "sigma_max", None)
    sigmas, timesteps = sigma_schedule(config, steps.astype(np.float32), sigma_table(acp), n, *sigma_range)
    if getattr(config, "timestep_type", "discrete") == "continuous" and config.prediction_type == "v_prediction":
        timesteps = np.float32(0.25) * np.log(sigmas[:-1])
    peak = sigmas.max()
    init_sigma = peak if config.timestep_spacing in ("linspace", "trailing") else np.sqrt(peak * peak + np.float32(1.0))
    sigmas64 = sigmas.astype(np.float64)
    return make_plan(timesteps.astype(np.float32), n, strength, init_noise_sigma=float(init_sigma), sigmas=sigmas64, alphas_cumprod=acp)


def sigma_scale_model_input(config: Any, plan: Plan, i: int, sample: np.ndarray) -> np.ndarray:
    sigma = plan.sigmas[plan.begin_index + i]
    return f32(as_f64(sample) / (sigma**2 + 1) ** 0.5)


def sigma_add_noise(config: Any, plan: Plan, original: np.ndarray, noise: np.ndarray, i: int = 0) -> np.ndarray:
    return f32(as_f64(original) + as_f64(noise) * plan.sigmas[plan.begin_index + i])


def sigma_denoise(prediction_type: str, model_output: np.ndarray, sample: np.ndarray, sigma: float) -> np.ndarray:
    """Clean-sample estimate from a model output at noise level sigma (sample in sigma scale)."""
    if prediction_type == "epsilon":
        return sample - sigma * model_output
    if prediction_type == "v_prediction":
        return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
    return model_output  # "sample" / "original_sample"


def config_from_dict(cls: type[C], raw: Mapping[str, Any], **overrides: Any) -> C:
    """Build a Config the way diffusers' `from_config` picks constructor arguments from a saved dict.

    Keys the class does not know are ignored. Keys listed in `_use_default_values` were defaults of the
    class that wrote the dict, so they are dropped and this class's own defaults apply instead. Each value
    taken must have the type of the field's default (`SchedulerConfigTypeError` names the key otherwise), so
    the schedulers can trust their Config.
    """
    if not isinstance(raw, Mapping):
        raise SchedulerConfigTypeError(
            f"a scheduler config must be a mapping of option names to values (a JSON object), not {shown(raw)}; "
            "pass a diffusers scheduler config"
        )
    used = raw.get("_use_default_values") or ()
    if not isinstance(used, (list, tuple)) or not all(isinstance(k, str) for k in used):
        raise SchedulerConfigTypeError(
            f"scheduler config key '_use_default_values' is {shown(used)}, expected a list of key names; "
            "correct it, or remove the key"
        )
    defaults_used = set(used)
    kwargs = {}
    for f in fields(cls):  # type: ignore[arg-type]
        if f.name in raw and f.name not in defaults_used:
            kwargs[f.name] = _checked_value(f, raw[f.name])
    kwargs.update(overrides)
    return cls(**kwargs)


# What a Config field accepts, by the type of its default (or its annotation, when the default is None).
_EXPECTED = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string",
             "betas": "a list of numbers (one beta per training timestep)"}


def _field_kind(f: Any) -> tuple[str | None, bool]:
    """(kind of value, whether None is accepted) for a Config field."""
    annotation = str(f.type)
    if f.name == "trained_betas":
        return "betas", True
    default = f.default
    if default is None:  # the annotation says what a given value must be
        kind = next((k for k in ("bool", "float", "int", "str") if k in annotation.split(" | ")), None)
        return kind, True
    # bool before int (a bool is an int); diffusers treats a null flag as off, so flags accept null
    kind = next((k for k, t in (("bool", bool), ("int", int), ("float", float), ("str", str)) if isinstance(default, t)), None)
    return kind, kind == "bool" or "None" in annotation


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _checked_value(f: Any, value: Any) -> Any:
    """`value` for Config field `f`, raising SchedulerConfigTypeError when its type is wrong (an integral float
    for an integer field is taken as that integer)."""
    kind, nullable = _field_kind(f)
    if kind is None or (value is None and nullable):
        return value
    ok = False
    if kind == "bool":
        ok = isinstance(value, (bool, np.bool_))
    elif kind == "int":
        if _is_number(value) and float(value).is_integer():
            return int(value)
    elif kind == "float":
        ok = _is_number(value)
    elif kind == "str":
        ok = isinstance(value, str)
    elif kind == "betas":
        ok = isinstance(value, (list, tuple, np.ndarray)) and len(value) > 0 and all(_is_number(b) for b in np.ravel(np.asarray(value, dtype=object)))
    if ok:
        return value
    expected = ("true, false or null" if kind == "bool" else _EXPECTED[kind] + " or null") if nullable else _EXPECTED[kind]
    fix = "remove the key to use beta_schedule" if kind == "betas" else f"remove the key for the default ({json.dumps(f.default)})"
    raise SchedulerConfigTypeError(f"scheduler config key {f.name!r} is {shown(value)}, expected {expected}; correct it, or {fix}")


def _kind(value: Any) -> str:
    """A value's JSON type name, as a user would say it."""
    if value is None:
        return "null"
    for t, name in ((bool, "boolean"), (str, "string"), (int, "number"), (float, "number"), (Mapping, "object"), (list, "list"), (tuple, "list")):
        if isinstance(value, t):
            return name
    return type(value).__name__


def shown(value: Any, limit: int = 40) -> str:
    """`value` as it would appear in the JSON file, shortened, with its type: `"many" (a string)`."""
    if value is None:
        return "null"
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    kind = _kind(value)
    return f"{text} ({'an' if kind[0] in 'aeiou' else 'a'} {kind})"


def as_f64(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def f32(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)
