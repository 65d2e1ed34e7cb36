"""Which variant a single-file checkpoint is, decided offline: the prediction type and native image size.

SD 2.x ships models whose weights have the same shapes but are trained differently: the 512 base models predict the
noise (`epsilon`), the 768 models the velocity (`v_prediction`). Shapes cannot tell them apart, so the evidence is, in
order: the user's `--prediction-type` / `--image-size`; the file's own description (Stability's model-spec metadata in a
`.safetensors` header: `modelspec.prediction_type`, `modelspec.architecture`, `modelspec.resolution`); the training step
a `.ckpt` records, for the release whose step is known (diffusers' converter keys on the same number); the task (the SD 2
inpainting and depth models are 512 epsilon models). Without any of these the export stops and asks, rather than guess.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from leansd.export.errors import ExportError

PREDICTION_TYPES = ("epsilon", "v_prediction")
# global_step -> (prediction type, size) of released SD 2 checkpoints: 512-base-ema.ckpt (SD 2.0 base).
KNOWN_STEPS = {875000: ("epsilon", 512)}
# The model-spec spelling of a prediction type.
SPEC_PREDICTION = {"epsilon": "epsilon", "eps": "epsilon", "v": "v_prediction", "v_prediction": "v_prediction"}
DEFAULT_SIZE = {"epsilon": 512, "v_prediction": 768}


@dataclass(frozen=True)
class Variant:
    """What to write into the configs; None leaves the config folder's value."""

    prediction_type: str | None
    image_size: int | None
    reason: str  # where the decision came from, for the manifest and messages


def check_options(prediction_type: str | None, image_size: int | None) -> None:
    """Refuse bad values of the user's overrides before anything is read."""
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ExportError(f"--prediction-type {prediction_type!r} is not one of {', '.join(PREDICTION_TYPES)}; "
                          "use epsilon (SD 1.x, SD 2 base 512) or v_prediction (SD 2 768-v)")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0):
        raise ExportError(f"--image-size {image_size!r} must be a positive number of pixels, such as 512 or 768")


def from_metadata(metadata: dict[str, str]) -> tuple[str | None, int | None]:
    """(prediction type, size) that a `.safetensors` header states, each None when it does not."""
    spec = SPEC_PREDICTION.get(str(metadata.get("modelspec.prediction_type", "")).strip().lower())
    architecture = str(metadata.get("modelspec.architecture", "")).lower()
    if spec is None and architecture.startswith("stable-diffusion-v2"):
        spec = "v_prediction" if architecture.endswith("-v") else "epsilon"
    size = None
    resolution = str(metadata.get("modelspec.resolution", "")).lower().split("x")
    if len(resolution) == 2 and resolution[0].strip().isdigit() and resolution[0].strip() == resolution[1].strip():
        size = int(resolution[0])
    return spec, size


def native(family: str, prediction_type: str) -> int:
    """The training size of a model family and prediction type, when nothing else says it: 512, or 768 for SD 2 v-models."""
    return DEFAULT_SIZE[prediction_type] if family == "sd2" else 512


def decide(path: Path, *, family: str, task: str, metadata: dict[str, str], global_step: int | None,
           prediction_type: str | None, image_size: int | None, config_given: bool) -> Variant:
    """The variant to export `path` as. `family` is "sd1" or "sd2", `task` "text-to-image", "inpainting", "depth" or "upscale".

    With the user's config folder (`config_given`) its scheduler and UNet configs stand unless overridden; with the
    shipped configs an SD 1.x file is an epsilon 512 model, and an SD 2.x text-to-image file needs evidence."""
    check_options(prediction_type, image_size)
    spec_prediction, spec_size = from_metadata(metadata)
    if task == "upscale":  # one released model: its configs hold its prediction type (v) and size
        return Variant(prediction_type, image_size, "--prediction-type" if prediction_type else "the x4 upscaler's configs")
    if prediction_type is not None:
        return Variant(prediction_type, image_size or (None if config_given else native(family, prediction_type)), "--prediction-type")
    if config_given:
        return Variant(None, image_size, "the config folder")
    if spec_prediction is not None:
        return Variant(spec_prediction, image_size or spec_size or native(family, spec_prediction), "the file's modelspec metadata")
    if family == "sd1":
        return Variant("epsilon", image_size or 512, "SD 1.x")
    if global_step in KNOWN_STEPS:
        known, size = KNOWN_STEPS[global_step]
        return Variant(known, image_size or size, f"global_step {global_step}")
    if task != "text-to-image":
        return Variant("epsilon", image_size or 512, f"SD 2 {task}")
    raise ExportError(
        f"'{path}' is an SD 2.x checkpoint that does not say whether it predicts noise (the 512 base models) or velocity "
        "(the 768-v models); pass --prediction-type epsilon (512 base) or --prediction-type v_prediction (768-v)"
    )
