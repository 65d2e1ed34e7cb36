"""AUTOMATIC1111's sampler names and leansd's schedulers, matched case-insensitively."""
from __future__ import annotations

from dataclasses import dataclass

from leansd.server.errors import RequestError


@dataclass(frozen=True)
class Sampler:
    name: str  # AUTOMATIC1111's display name
    scheduler: str  # leansd's scheduler alias (leansd.runtime.schedulers.SCHEDULER_ALIASES)
    aliases: tuple[str, ...]  # A1111's own aliases (k-diffusion names) and leansd's


SAMPLERS = (
    Sampler("Euler a", "euler_a", ("k_euler_a", "k_euler_ancestral", "euler_a", "euler_ancestral", "EulerAncestralDiscreteScheduler")),
    Sampler("Euler", "euler", ("k_euler", "euler", "EulerDiscreteScheduler")),
    Sampler("LMS", "lms", ("k_lms", "lms", "LMSDiscreteScheduler")),
    Sampler("DPM++ 2M", "dpm++2m", ("k_dpmpp_2m", "dpmpp_2m", "dpm++2m", "DPMSolverMultistepScheduler")),
    Sampler("DPM++ 2M Karras", "dpm++2m_karras", ("k_dpmpp_2m_ka", "dpmpp_2m_karras", "dpm++2m_karras")),
    Sampler("DDIM", "ddim", ("ddim", "DDIMScheduler")),
    Sampler("PLMS", "plms", ("plms", "pndm", "PNDMScheduler")),
    Sampler("LCM", "lcm", ("lcm", "LCMScheduler")),
)
# AUTOMATIC1111's schedule types (>= 1.9). "automatic" keeps the sampler's own; Karras exists for DPM++ 2M.
SCHEDULES = {"automatic": "Automatic", "karras": "Karras"}
_BY_NAME = {key.lower(): s for s in SAMPLERS for key in (s.name, *s.aliases)}


def find_sampler(name: str, field: str) -> Sampler:
    sampler = _BY_NAME.get(name.strip().lower())
    if sampler is None:
        raise RequestError(f"unknown sampler {name!r:.60}; choose one of: {', '.join(s.name for s in SAMPLERS)}", field)
    return sampler


def resolve(sampler_name: str | None, schedule: str | None = None, field: str = "sampler_name",
            schedule_field: str = "scheduler") -> Sampler | None:
    """The sampler a request names, with AUTOMATIC1111's separate schedule type applied ("DPM++ 2M" + "Karras");
    None when it names none (the model's own scheduler)."""
    sampler = find_sampler(sampler_name, field) if sampler_name else None
    kind = (schedule or "automatic").strip().lower()
    if kind not in SCHEDULES:
        raise RequestError(f"unknown scheduler {schedule!r:.60}; choose one of: {', '.join(SCHEDULES.values())}", schedule_field)
    if kind == "karras" and (sampler is None or sampler.scheduler not in ("dpm++2m", "dpm++2m_karras")):
        raise RequestError("the Karras schedule is available with the DPM++ 2M sampler only; use sampler DPM++ 2M "
                           "or scheduler Automatic", schedule_field)
    if kind == "karras":
        return _BY_NAME["dpm++ 2m karras"]
    return sampler


def listing() -> list[dict]:
    """GET /sdapi/v1/samplers (and the job API's list)."""
    return [{"name": s.name, "aliases": list(s.aliases), "options": {}} for s in SAMPLERS]
