"""Pure-numpy schedulers that reproduce diffusers' step for step, selected by class name or alias.

    sched = get_scheduler("euler_a", scheduler_config_dict)
    plan = sched.plan(num_inference_steps=25)
    latents = noise * plan.init_noise_sigma
    state = None
    for i, t in enumerate(plan.timesteps):
        eps = unet(sched.scale_model_input(plan, i, latents), t)
        result = sched.step(plan, i, eps, latents, state, noise=next_noise() if sched.uses_noise else None)
        latents, state = result.prev_sample, result.state
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any

import numpy as np

from . import ddim, dpm_solver_multistep, euler, euler_ancestral, lcm, lms, pndm
from .common import Plan, StepResult, UnsupportedSchedulerOption, config_from_dict

__all__ = ["SCHEDULER_ALIASES", "Plan", "Scheduler", "StepResult", "UnsupportedSchedulerOption", "get_scheduler", "scheduler_names"]

_MODULES: dict[str, ModuleType] = {m.NAME: m for m in (ddim, pndm, euler, euler_ancestral, dpm_solver_multistep, lms, lcm)}

SCHEDULER_ALIASES: dict[str, str] = {
    "ddim": ddim.NAME,
    "pndm": pndm.NAME,
    "plms": pndm.NAME,
    "euler": euler.NAME,
    "euler_a": euler_ancestral.NAME,
    "dpm++2m": dpm_solver_multistep.NAME,
    "dpm++2m_karras": dpm_solver_multistep.NAME,
    "lms": lms.NAME,
    "lcm": lcm.NAME,
}

# What an alias promises beyond its class: these override the config's own values.
_ALIAS_OVERRIDES: dict[str, dict[str, Any]] = {
    "plms": {"skip_prk_steps": True},
    "dpm++2m": {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
    "dpm++2m_karras": {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True, "use_exponential_sigmas": False},
}


@dataclass(frozen=True)
class Scheduler:
    """One scheduler algorithm bound to its config; every method is a pure function of its arguments."""

    name: str  # diffusers class name
    config: Any  # the algorithm module's Config
    eta: float = 0.0  # fresh noise per step, for the schedulers whose plan() takes it (DDIM)

    @property
    def _module(self) -> ModuleType:
        return _MODULES[self.name]

    @property
    def uses_noise(self) -> bool:
        """step() wants a fresh noise array (drawn like diffusers' randn_tensor) every step."""
        return self._module.uses_noise(self.eta)

    def plan(self, num_inference_steps: int, strength: float = 1.0, start: float | None = None, end: float | None = None,
             strength_in_schedule: bool = False) -> Plan:
        """The steps of a generation: from `strength` (image-to-image), or between the fractions `start` and `end` of
        the training schedule (diffusers' SDXL `denoising_start` / `denoising_end`: a base model stops where a
        refiner takes over; `start` replaces the strength's starting point). `strength_in_schedule`: LCM's own
        image-to-image schedule, for LCM-distilled models (`lcm.plan`; other schedulers have none)."""
        extra = {"eta": self.eta} if self.eta else {}
        if strength_in_schedule and self.name == "LCMScheduler":
            extra["strength_in_schedule"] = True
        plan = self._module.plan(self.config, num_inference_steps, strength, **extra)
        if start is None and end is None:
            return plan
        schedule = plan.schedule if plan.schedule is not None else plan.timesteps
        begin, n = plan.begin_index, self.config.num_train_timesteps
        if start is not None:  # the steps whose timestep is below the start's cutoff
            begin = len(schedule) - int((schedule < int(round(n * (1 - start)))).sum())
        kept = schedule[begin:]
        if end is not None:  # ... and at or above the end's
            kept = kept[: int((kept >= int(round(n * (1 - end)))).sum())]
        return replace(plan, timesteps=kept, begin_index=begin)

    def scale_model_input(self, plan: Plan, i: int, sample: np.ndarray) -> np.ndarray:
        return self._module.scale_model_input(self.config, plan, i, sample)

    def step(
        self, plan: Plan, i: int, model_output: np.ndarray, sample: np.ndarray, state: Any = None, noise: np.ndarray | None = None
    ) -> StepResult:
        if not 0 <= i < len(plan.timesteps):
            raise IndexError(f"step index {i} is outside the plan's {len(plan.timesteps)} steps")
        return self._module.step(self.config, plan, i, model_output, sample, state, noise)

    def add_noise(self, plan: Plan, original: np.ndarray, noise: np.ndarray, i: int = 0) -> np.ndarray:
        """Noise clean latents to the noise level of step `i`: the plan's first timestep starts img2img; later ones
        are where inpainting with an ordinary UNet puts the image back outside the mask (diffusers' `add_noise`
        after `i` steps, at `timesteps[i]`)."""
        if not 0 <= i < len(plan.timesteps):
            raise ValueError(f"step {i} is outside the plan's {len(plan.timesteps)} steps, so there is no timestep to noise to")
        return self._module.add_noise(self.config, plan, original, noise, i)


def scheduler_names() -> list[str]:
    """Every accepted name: aliases, then diffusers class names."""
    return sorted(SCHEDULER_ALIASES) + sorted(_MODULES)


def get_scheduler(name: str | None, config: Mapping[str, Any], eta: float = 0.0) -> Scheduler:
    """The scheduler `name` (alias or diffusers class name; None: the config's own class) built from a
    diffusers scheduler config dict, picking keys the way diffusers' `from_config` does."""
    if name is None:
        name = config.get("_class_name")
        if name is None:
            raise UnsupportedSchedulerOption("the scheduler config has no _class_name; name a scheduler: " + ", ".join(scheduler_names()))
    class_name = name if name in _MODULES else SCHEDULER_ALIASES.get(name.lower())
    if class_name is None:
        raise UnsupportedSchedulerOption(f"unknown scheduler {name!r}; choose one of: " + ", ".join(scheduler_names()))
    module = _MODULES[class_name]
    if eta and "eta" not in inspect.signature(module.plan).parameters:
        raise UnsupportedSchedulerOption(f"eta={eta!r} does not apply to {class_name}; leave eta at 0 or use the ddim scheduler")
    cfg = config_from_dict(module.Config, config, **_ALIAS_OVERRIDES.get(name.lower(), {}))
    return Scheduler(name=class_name, config=cfg, eta=float(eta))
