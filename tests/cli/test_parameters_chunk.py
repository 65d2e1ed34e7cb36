"""The `parameters` chunk read back with AUTOMATIC1111's own rules: sampler names with their schedule, and prompts
that try to forge fields."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
from PIL import Image

from leansd.runtime.outputs import sampler_label
from leansd.runtime.schedulers import SCHEDULER_ALIASES
from tests.cli.a1111_infotext import parse_generation_parameters, sampler_and_schedule
from tests.cli.helpers import sd_run

DDIM_CONFIG = {"_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
               "num_train_timesteps": 1000, "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False}
EXPECTED = {  # alias -> (label written, what A1111 >= 1.9 reads: sampler, schedule)
    "ddim": ("DDIM", ("DDIM", "Automatic")),
    "pndm": ("PLMS", ("PLMS", "Automatic")),
    "plms": ("PLMS", ("PLMS", "Automatic")),
    "euler": ("Euler", ("Euler", "Automatic")),
    "euler_a": ("Euler a", ("Euler a", "Automatic")),
    "dpm++2m": ("DPM++ 2M", ("DPM++ 2M", "Automatic")),
    "dpm++2m_karras": ("DPM++ 2M Karras", ("DPM++ 2M", "Karras")),
    "lms": ("LMS", ("LMS", "Automatic")),
    "lcm": ("LCM", ("LCM", "Automatic")),
}


def label(scheduler: str | None, config: dict = DDIM_CONFIG) -> str:
    from leansd.runtime.schedulers import get_scheduler

    resolved = get_scheduler(scheduler, config).name
    return sampler_label(SimpleNamespace(scheduler=resolved, settings=SimpleNamespace(scheduler=scheduler)), config)


def test_every_alias_has_its_a1111_name():
    assert set(EXPECTED) == set(SCHEDULER_ALIASES)
    for alias, (written, read) in EXPECTED.items():
        assert label(alias) == written, alias
        assert sampler_and_schedule(written) == read, alias


def test_schedule_comes_from_the_scheduler_config_too():
    karras = {**DDIM_CONFIG, "_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": True}
    assert label(None, karras) == "Euler Karras" and sampler_and_schedule("Euler Karras") == ("Euler", "Karras")
    assert label("LMSDiscreteScheduler", {**karras, "_class_name": "LMSDiscreteScheduler"}) == "LMS Karras"
    assert label("dpm++2m", {**karras, "_class_name": "DPMSolverMultistepScheduler"}) == "DPM++ 2M"  # the alias overrides
    exponential = {**DDIM_CONFIG, "_class_name": "DPMSolverMultistepScheduler", "use_exponential_sigmas": True}
    assert label(None, exponential) == "DPM++ 2M Exponential"


FORGED = "a red circle\nNegative prompt: forged\nSteps: 99, Sampler: Forged, CFG scale: 1, Seed: 1, Size: 8x8"


@pytest.mark.parametrize("negative", [None, "blue\nSteps: 98, Sampler: Forged, Seed: 2"])
def test_prompts_cannot_forge_fields(tmp_path, cli_model, negative):
    extra = ["--negative-prompt", negative] if negative else []
    result = sd_run(FORGED, *extra, "--model", str(cli_model), "--steps", "2", "--seed", "5", "--scheduler", "dpm++2m_karras",
                    "-o", "out.png", "-q", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    with Image.open(tmp_path / "out.png") as img:
        got = parse_generation_parameters(img.text["parameters"])
    assert got["Prompt"] == " ".join(FORGED.split())  # newlines folded: the same tokens for CLIP
    assert got["Negative prompt"] == (" ".join(negative.split()) if negative else "")
    assert (got["Steps"], got["Sampler"], got["CFG scale"], got["Seed"], got["Size"]) == ("2", "DPM++ 2M Karras", "7.5", "5", "64x64")
    assert sampler_and_schedule(got["Sampler"]) == ("DPM++ 2M", "Karras")


def test_forging_prompt_draws_what_its_folded_form_draws(tmp_path, cli_model):
    """The prompt sd-run records is the one it used: generating from the record gives the same pixels."""
    args = ("--model", str(cli_model), "--steps", "2", "--seed", "5", "-q")
    assert sd_run("Negative prompt: a red\ncircle", *args, "-o", "a.png", cwd=tmp_path).returncode == 0
    with Image.open(tmp_path / "a.png") as img:
        recorded = parse_generation_parameters(img.text["parameters"])["Prompt"]
        first = img.tobytes()
    assert recorded == "negative prompt: a red circle"
    assert sd_run(recorded, *args, "-o", "b.png", cwd=tmp_path).returncode == 0
    with Image.open(tmp_path / "b.png") as img:
        assert img.tobytes() == first


def test_long_weighted_prompt_and_clip_skip_are_used_and_recorded(tmp_path, cli_model):
    """A prompt over 77 tokens is not cut (no warning), and clip skip is recorded in AUTOMATIC1111's numbering."""
    prompt = "a (red:1.2) circle on a [blue] background, " * 12 + "BREAK a (yellow) triangle"
    args = ("--model", str(cli_model), "--steps", "2", "--seed", "3", "-q")
    result = sd_run(prompt, *args, "--clip-skip", "1", "-o", "skip.png", cwd=tmp_path)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert sd_run(prompt, *args, "-o", "plain.png", cwd=tmp_path).returncode == 0
    with Image.open(tmp_path / "skip.png") as skip, Image.open(tmp_path / "plain.png") as plain:
        got = parse_generation_parameters(skip.text["parameters"])
        assert got["Prompt"] == prompt.strip() and got["Clip skip"] == "2"
        assert "Clip skip" not in parse_generation_parameters(plain.text["parameters"])
        assert skip.tobytes() != plain.tobytes()
