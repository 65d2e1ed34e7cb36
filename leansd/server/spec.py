"""A generation request in one form, whichever API it came through, checked before it is queued.

Each API turns its own fields into a `JobSpec` and a `FieldNames` (its names for leansd's settings), so a
refusal names the field the client sent: `cfg_scale` for AUTOMATIC1111, `guidance_scale` for the job API.
"""
from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from leansd.runtime.errors import InsufficientMemoryError, LeanSDError
from leansd.server.config import Limits
from leansd.server.errors import RequestError
from leansd.server.registry import ServedModel

MAX_SEED = 2**64 - 1
SETTINGS = ("prompt", "negative_prompt", "num_inference_steps", "guidance_scale", "seed", "height", "width",
            "scheduler", "image", "mask_image", "strength", "count")


@dataclass(frozen=True)
class FieldNames:
    """An API's names for leansd's settings (keys of SETTINGS)."""

    names: dict[str, str]

    def __getitem__(self, setting: str) -> str:
        return self.names.get(setting, setting)

    def of_message(self, message: str) -> str | None:
        """The field a runtime message is about: the setting it starts with (they name it first)."""
        head = message.split(" ", 1)[0].rstrip(":,")
        for setting in SETTINGS:
            if head == setting or head == "init" and setting == "image" or head == "mask" and setting == "mask_image":
                return self[setting]
        return None


@dataclass
class JobSpec:
    """What to generate: `count` images, image i with seed + i, each with the same settings otherwise."""

    model: ServedModel
    prompt: str
    negative_prompt: str | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None  # None or -1: random (resolved by `checked`)
    width: int | None = None
    height: int | None = None
    sampler: str | None = None  # leansd scheduler alias
    sampler_label: str | None = None  # the display name it was asked by
    count: int = 1
    init_image: Image.Image | None = None
    mask: Image.Image | None = None
    strength: float | None = None
    fields: FieldNames = field(default_factory=lambda: FieldNames({}))
    clip_skip: int = 0  # diffusers' numbering (AUTOMATIC1111's CLIP_stop_at_last_layers - 1)

    def call_settings(self, i: int) -> dict[str, Any]:
        """Keyword arguments of the pipeline call for image i."""
        return {
            "prompt": self.prompt, "negative_prompt": self.negative_prompt or None, "num_inference_steps": self.steps,
            "guidance_scale": self.guidance_scale, "seed": self.seed + i, "width": self.width, "height": self.height,
            "scheduler": self.sampler, "image": self.init_image, "mask_image": self.mask, "strength": self.strength,
            "clip_skip": self.clip_skip,
        }

    def summary(self) -> dict[str, Any]:
        """The normalized settings as JSON (images reduced to whether they were given)."""
        height, width = self.size()
        return {
            "model": self.model.name, "prompt": self.prompt, "negative_prompt": self.negative_prompt or "",
            "steps": self.resolved_steps(), "guidance_scale": self.resolved_guidance(), "seed": self.seed,
            "width": width, "height": height, "sampler": self.sampler_label or self.model.sampler_label, "batch_size": self.count,
            "init_image": self.init_image is not None, "mask": self.mask is not None, "strength": self.strength,
        }

    def resolved_steps(self) -> int:
        return int(self.steps or self.model.pipe.defaults.num_inference_steps
                   or self.model.pipe.bundle.defaults().get("num_inference_steps", 50))

    def resolved_guidance(self) -> float:
        g = self.guidance_scale if self.guidance_scale is not None else self.model.pipe.defaults.guidance_scale
        return float(g if g is not None else self.model.pipe.bundle.defaults().get("guidance_scale", 7.5))

    def size(self) -> tuple[int, int]:
        """(height, width) of the output: as asked, else the init image's (rounded down), else the model's."""
        if self.height is not None and self.width is not None:
            return self.height, self.width
        if self.init_image is not None and self.height is None and self.width is None:
            f = self.model.pipe.vae_scale_factor
            return self.init_image.height // f * f, self.init_image.width // f * f
        default_h, default_w = self.model.default_size
        return self.height or default_h, self.width or default_w

    def checked(self, limits: Limits, check_memory: bool = True) -> "JobSpec":
        """Check the limits and everything the model can tell before any work; resolve a random seed.
        check_memory: also refuse what clearly cannot fit in the memory free now (off while other jobs run,
        since their memory is given back before this one starts; the pipeline checks again when it does)."""
        f = self.fields
        if not isinstance(self.prompt, str):
            raise RequestError("prompt must be a text", f["prompt"])
        _whole(self.steps, f["num_inference_steps"], 1, limits.max_steps, optional=True)
        _whole(self.count, f["count"], 1, limits.max_images, hint=" (images per request; see sd-serve --max-images)")
        _whole(self.width, f["width"], 8, limits.max_width, optional=True, hint=" (see sd-serve --max-size)")
        _whole(self.height, f["height"], 8, limits.max_height, optional=True, hint=" (see sd-serve --max-size)")
        height, width = self.size()
        if height > limits.max_height or width > limits.max_width:
            name = f["width"] if width > limits.max_width else f["height"]
            raise RequestError(f"the output would be {width}x{height}, more than the server's limit "
                               f"{limits.max_width}x{limits.max_height}; pass a smaller size", name)
        if self.guidance_scale is not None and not (math.isfinite(self.guidance_scale) and 0 <= self.guidance_scale <= 100):
            raise RequestError(f"{f['guidance_scale']} must be a number from 0 to 100, got {self.guidance_scale!r:.30}",
                               f["guidance_scale"])
        if self.strength is not None and not (math.isfinite(self.strength) and 0 < self.strength <= 1):
            raise RequestError(f"{f['strength']} must be a number in (0, 1], got {self.strength!r:.30}", f["strength"])
        if self.seed is None or self.seed == -1:
            self.seed = secrets.randbelow(2**32)
        _whole(self.seed, f["seed"], 0, MAX_SEED - self.count + 1, hint=" (-1 for a random one)")
        if self.mask is not None and self.init_image is None:
            raise RequestError(f"{f['mask_image']} needs {f['image']}, the picture to inpaint; send both", f["image"])
        if self.model.inpainting and self.mask is None:
            raise RequestError(f"model {self.model.name} is an inpainting model; send {f['image']} and {f['mask_image']}",
                               f["mask_image"])
        self._check_with_model(check_memory)
        return self

    def _check_with_model(self, check_memory: bool) -> None:
        """What the pipeline itself checks before a generation (sizes, sampler, images, memory)."""
        from leansd.runtime import budget
        from leansd.runtime.pipeline import Generation

        pipe = self.model.pipe
        try:
            generation = Generation(pipe, pipe.defaults.merged(**self.call_settings(0)))
            available = budget.available_bytes() if check_memory and generation.settings.memory_check else None
            if available is not None and (needed := generation.memory_estimate()).peak > available:
                raise InsufficientMemoryError(budget.describe(needed, available))
        except InsufficientMemoryError as exc:
            raise RequestError(f"{exc}; ask for a smaller size", self.fields["width"], 503) from None
        except LeanSDError as exc:
            raise RequestError(str(exc), self.fields.of_message(str(exc))) from None


def _whole(value: Any, name: str, low: int, high: int, optional: bool = False, hint: str = "") -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RequestError(f"{name} must be a whole number from {low} to {high}{hint}, got {value!r:.30}", name)
