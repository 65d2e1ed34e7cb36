"""Broken copies of the bundled model: every damaged config gets a one-line `ModelFolderError` naming the file and
the key, from `leansd.load` and from `sd-run` (exit status 2), never a traceback.

Each case copies the bundled model (its small files; the model files are linked) and damages one JSON file.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import leansd
from leansd.runtime.bundle import ModelBundle
from leansd.runtime.cli import main as sd_run
from leansd.runtime.errors import LeanSDError, ModelFolderError
from leansd.runtime.loader import bundled_model_path
from leansd.runtime.schedulers import UnsupportedSchedulerOption, get_scheduler

MANIFEST = "leansd.json"
SCHEDULER = "scheduler/scheduler_config.json"
UNET = "unet/config.json"
VAE = "vae_decoder/config.json"
TOKENIZER = "tokenizer/tokenizer_config.json"
INDEX = "model_index.json"


def broken_copy(tmp_path: Path, file: str, change: Callable[[Any], Any] | str) -> Path:
    """A copy of the bundled model with `file` replaced by change(its JSON), or by `change` itself when it is text."""
    root = tmp_path / "model"

    def link_models(src: str, dst: str) -> None:
        if src.endswith(".onnx"):
            os.symlink(src, dst)  # the model files are never opened in these cases
        else:
            shutil.copy2(src, dst)

    shutil.copytree(bundled_model_path(), root, copy_function=link_models)
    path = root / file
    text = change if isinstance(change, str) else json.dumps(change(json.loads(path.read_text(encoding="utf-8"))))
    path.write_text(text, encoding="utf-8")
    return root


def with_key(key: str, value: Any) -> Callable[[dict], dict]:
    """Set a key; a dotted key sets a nested one ('defaults.guidance_scale')."""

    def change(data: dict) -> dict:
        *parents, last = key.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
        return data

    return change


def replaced(value: Any) -> Callable[[Any], Any]:
    return lambda _: value


CASES = [
    # (id, file, change, fragments the message must hold besides the file name)
    ("manifest-list", MANIFEST, replaced([]), ["not a JSON object"]),
    ("manifest-string", MANIFEST, replaced("leansd-model"), ["not a JSON object"]),
    ("format-version-string", MANIFEST, with_key("format_version", "x"), ["'format_version'", '"x"', "integer"]),
    ("components-list", MANIFEST, with_key("components", ["unet"]), ["'components'", "JSON object"]),
    ("component-entry-number", MANIFEST, with_key("components.unet", 5), ["'components.unet'"]),
    ("component-backend-list", MANIFEST, with_key("components.unet.onnx", ["unet/model.onnx"]), ["'components.unet.onnx'"]),
    ("component-path-number", MANIFEST, with_key("components.unet.onnx.fp32", 3), ["'components.unet.onnx.fp32'", "file path"]),
    ("static-shapes-list", MANIFEST, with_key("static_shapes", [512, 512]), ["'static_shapes'"]),
    ("static-height-string", MANIFEST, with_key("static_shapes", {"height": "512", "width": 512}), ["'static_shapes.height'"]),
    ("defaults-list", MANIFEST, with_key("defaults", [20]), ["'defaults'"]),
    ("defaults-steps-string", MANIFEST, with_key("defaults.num_inference_steps", "many"), ["'defaults.num_inference_steps'"]),
    ("defaults-guidance-null", MANIFEST, with_key("defaults.guidance_scale", None), ["'defaults.guidance_scale'", "null"]),
    ("defaults-height-float", MANIFEST, with_key("defaults.height", 51.2), ["'defaults.height'"]),
    ("scheduler-list", SCHEDULER, lambda d: [d], ["not a JSON object"]),
    ("scheduler-timesteps-string", SCHEDULER, with_key("num_train_timesteps", "many"), ["'num_train_timesteps'", '"many"', "integer"]),
    ("scheduler-beta-start-string", SCHEDULER, with_key("beta_start", "a"), ["'beta_start'", "number"]),
    ("scheduler-spacing-number", SCHEDULER, with_key("timestep_spacing", 5), ["'timestep_spacing'", "string"]),
    ("scheduler-prediction-null", SCHEDULER, with_key("prediction_type", None), ["'prediction_type'", "null"]),
    ("scheduler-class-number", SCHEDULER, with_key("_class_name", 5), ["'_class_name'"]),
    ("scheduler-betas-strings", SCHEDULER, with_key("trained_betas", ["a", "b"]), ["'trained_betas'"]),
    # a key only other schedulers read: it would break `scheduler="dpm++2m_karras"` later, so it is reported now
    ("scheduler-other-key", SCHEDULER, with_key("use_karras_sigmas", "yes"), ["'use_karras_sigmas'"]),
    ("scheduler-defaults-list", SCHEDULER, with_key("_use_default_values", 3), ["'_use_default_values'"]),
    ("unet-list", UNET, replaced([4]), ["not a JSON object"]),
    ("unet-in-channels-string", UNET, with_key("in_channels", "4"), ["'in_channels'"]),
    ("unet-sample-size-string", UNET, with_key("sample_size", "big"), ["'sample_size'"]),
    ("unet-time-cond-string", UNET, with_key("time_cond_proj_dim", "x"), ["'time_cond_proj_dim'"]),
    ("vae-list", VAE, replaced([]), ["not a JSON object"]),
    ("vae-block-channels-number", VAE, with_key("block_out_channels", 4), ["'block_out_channels'"]),
    ("vae-scaling-string", VAE, with_key("scaling_factor", "0.18"), ["'scaling_factor'"]),
    ("vae-scaling-zero", VAE, with_key("scaling_factor", 0), ["'scaling_factor'"]),
    ("vae-latent-channels-null", VAE, with_key("latent_channels", None), ["'latent_channels'"]),
    ("vae-sample-size-list-of-strings", VAE, with_key("sample_size", ["a"]), ["'sample_size'"]),
    ("vae-shift-string", VAE, with_key("shift_factor", "0"), ["'shift_factor'"]),
    ("tokenizer-config-list", TOKENIZER, replaced(["<|endoftext|>"]), ["not an object"]),
    ("tokenizer-config-invalid", TOKENIZER, "{broken", ["not valid JSON"]),
    ("special-tokens-map-string", "tokenizer/special_tokens_map.json", replaced("<|endoftext|>"), ["not an object"]),
    ("model-index-invalid", INDEX, "{not json", ["not valid JSON"]),
    ("model-index-list", INDEX, replaced([]), ["not a JSON object"]),
    ("model-index-class-number", INDEX, with_key("_class_name", 3), ["'_class_name'"]),
]


def assert_names_problem(message: str, file: str, fragments: list[str]) -> None:
    assert "\n" not in message, message
    assert file in message.replace(os.sep, "/"), message
    for fragment in fragments:
        assert fragment in message, message
    assert "sd-export" in message or "correct it" in message, message  # the fix


@pytest.mark.parametrize("file, change, fragments", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_load_names_file_and_key(tmp_path, file, change, fragments):
    root = broken_copy(tmp_path, file, change)
    with pytest.raises(ModelFolderError) as err:
        leansd.load(root)
    assert_names_problem(str(err.value), file, fragments)


@pytest.mark.parametrize("file, change, fragments", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_sd_run_exits_2_with_one_line(tmp_path, capsys, file, change, fragments):
    root = broken_copy(tmp_path, file, change)
    out = tmp_path / "out.png"
    assert sd_run(["a cat", "--model", str(root), "-o", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sd-run: error: "), err
    assert "Traceback" not in err
    assert_names_problem(lines[0], file, fragments)
    assert not out.exists()


def test_bundled_model_passes_and_keeps_its_configs():
    bundle = ModelBundle.open(bundled_model_path())
    assert bundle.pipeline_class == "StableDiffusionPipeline"
    assert bundle.scheduler_config["_class_name"] == "DDIMScheduler" and bundle.unet_config["in_channels"] == 4


@pytest.mark.parametrize("change", [with_key("_class_name", "UniPCMultistepScheduler"), with_key("thresholding", True)],
                         ids=["unknown-class", "unsupported-option"])
def test_scheduler_that_leansd_lacks_still_loads(tmp_path, change):
    """Well-typed options some scheduler does not implement are reported when it is used: another one may run."""
    root = broken_copy(tmp_path, SCHEDULER, change)
    pipe = leansd.load(root)
    with pytest.raises(UnsupportedSchedulerOption):
        pipe("a cat", num_inference_steps=1, output_type="latent")
    assert pipe("a cat", num_inference_steps=1, output_type="latent", scheduler="euler").images.shape[0] == 1


def test_tolerated_values_still_load(tmp_path):
    """A wrong-typed model_max_length falls back to CLIP's 77; an integral float count is that integer."""
    root = broken_copy(tmp_path, TOKENIZER, with_key("model_max_length", "77"))
    assert leansd.load(root).models.prompt_encoder is not None
    root = broken_copy(tmp_path / "b", SCHEDULER, with_key("num_train_timesteps", 1000.0))
    assert ModelBundle.open(root).scheduler_config["num_train_timesteps"] == 1000.0


@pytest.mark.parametrize("extra, key", [
    ({"num_train_timesteps": "many"}, "num_train_timesteps"), ({"beta_start": "a"}, "beta_start"),
    ({"timestep_spacing": 5}, "timestep_spacing"), ({"prediction_type": None}, "prediction_type"),
    ({"steps_offset": 1.5}, "steps_offset"), ({"clip_sample": "no"}, "clip_sample"), ({"trained_betas": 0.1}, "trained_betas"),
    ({"num_train_timesteps": True}, "num_train_timesteps"),
])
def test_config_from_dict_checks_value_types(extra, key):
    with pytest.raises(UnsupportedSchedulerOption, match=f"'{key}'") as err:
        get_scheduler("ddim", {"_class_name": "DDIMScheduler", **extra})
    assert isinstance(err.value, LeanSDError) and "\n" not in str(err.value)


def test_config_from_dict_accepts_what_diffusers_writes():
    """ints for floats, null for a null default or a flag, lists for trained_betas, integral floats for ints."""
    config = get_scheduler("euler", {"beta_start": 0, "sigma_min": None, "use_karras_sigmas": None,
                                     "trained_betas": [0.001] * 10, "num_train_timesteps": 10.0}).config
    assert config.num_train_timesteps == 10 and isinstance(config.num_train_timesteps, int)
    assert config.trained_betas == (0.001,) * 10
    with pytest.raises(UnsupportedSchedulerOption, match="JSON object"):
        get_scheduler("euler", [1, 2])  # type: ignore[arg-type]
