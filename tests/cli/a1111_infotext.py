"""AUTOMATIC1111's infotext reader, rule for rule, to check that sd-run's `parameters` chunk reads back as written.

Follows `parse_generation_parameters` (modules/infotext_utils.py, A1111 1.9/1.10): the last line holds the
`Key: value` fields when it has at least 3 of them; before it, lines are stripped, and from the first one starting
with "Negative prompt:" on they are the negative prompt; values in double quotes are JSON. And
`get_sampler_and_scheduler` (modules/sd_samplers.py): a known schedule at the end of the sampler name is split off.
"""
from __future__ import annotations

import json
import re

RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
RE_IMAGESIZE = re.compile(r"^(\d+)x(\d+)$")
# sd_schedulers.schedulers labels, A1111 1.10.
SCHEDULE_LABELS = ["Automatic", "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform", "KL Optimal",
                   "Align Your Steps", "Simple", "Normal", "DDIM", "Beta"]
# sd_samplers names A1111 1.10 knows (k-diffusion, timesteps and LCM samplers).
SAMPLER_NAMES = ["DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 2S a", "DPM++ 3M SDE", "Euler a",
                 "Euler", "LMS", "Heun", "DPM2", "DPM2 a", "DPM fast", "DPM adaptive", "Restart", "DDIM", "DDIM CFG++",
                 "PLMS", "UniPC", "LCM"]


def unquote(text: str) -> str:
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except Exception:  # noqa: BLE001  (as A1111)
        return text


def parse_generation_parameters(x: str) -> dict:
    res: dict = {}
    prompt = ""
    negative_prompt = ""
    done_with_prompt = False
    *lines, lastline = x.strip().split("\n")
    if len(RE_PARAM.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative_prompt += ("" if negative_prompt == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    res["Prompt"] = prompt
    res["Negative prompt"] = negative_prompt
    for k, v in RE_PARAM.findall(lastline):
        try:
            if v[0] == '"' and v[-1] == '"':
                v = unquote(v)
            m = RE_IMAGESIZE.match(v)
            if m is not None:
                res[f"{k}-1"] = m.group(1)
                res[f"{k}-2"] = m.group(2)
            res[k] = v  # A1111 keeps only Size-1/Size-2; the whole value too is handier here
        except Exception:  # noqa: BLE001  (as A1111)
            res.setdefault("errors", []).append(f"{k}: {v}")
    return res


def sampler_and_schedule(sampler_name: str, schedule: str | None = None) -> tuple[str | None, str]:
    """(sampler, schedule) as A1111 >= 1.9 reads them; sampler None where A1111 would not know it."""
    found = schedule or "Automatic"
    name = sampler_name
    for label in SCHEDULE_LABELS:  # every schedule in turn, as A1111 does (its break leaves the aliases loop only)
        if name.endswith(" " + label):
            found, name = label, name[: -(len(label) + 1)]
    return (name if name in SAMPLER_NAMES else None), found
