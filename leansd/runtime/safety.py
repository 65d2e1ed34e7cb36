"""The safety checker of the SD 1.x pipelines, without torch: diffusers' `StableDiffusionSafetyChecker` as exported by
`sd-export` (`leansd.export.safety_checker`), with its feature extractor (transformers' `CLIPImageProcessor`) in
numpy and pillow.

    8-bit image -> shortest edge resized (pillow, the configured filter) -> centre crop -> x rescale -> (x - mean) / std
    -> CLIP vision tower -> cosine similarity with 3 "special care" and 17 concept embeddings (the exported graph)
    -> flagged when a concept's score passes its threshold (here, in numpy)

The decision is the one diffusers' `StableDiffusionSafetyChecker.forward` makes: score = round(similarity - threshold
+ adjustment, 3) in float32, flagged when a concept's score is > 0, where the adjustment becomes 0.01 as soon as a
special-care score is > 0 (for the special-care scores after it, and for all concept scores). A flagged image is replaced
by a black one, as diffusers' pipelines do.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from leansd.runtime import manifest as names
from leansd.runtime.backends import LazySession
from leansd.runtime.errors import ModelFolderError

CONCEPTS_FILE = "concepts.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
# transformers' CLIPImageProcessor defaults, for keys a preprocessor_config.json leaves out.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _size(value: Any, key: str, path: Path) -> tuple[int, int] | int:
    """A `size`/`crop_size` entry: {"shortest_edge": n} -> n; {"height": h, "width": w} or n -> (h, w)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return (value, value) if key == "crop_size" else value
    if isinstance(value, dict):
        if isinstance(value.get("shortest_edge"), int):
            return int(value["shortest_edge"])
        if isinstance(value.get("height"), int) and isinstance(value.get("width"), int):
            return int(value["height"]), int(value["width"])
    raise ModelFolderError(f"{path}: '{key}' is {value!r:.60}, not a size; re-export the model with sd-export")


@dataclass(frozen=True)
class FeatureExtractor:
    """CLIPImageProcessor's preprocessing, read from its `preprocessor_config.json`."""

    size: tuple[int, int] | int  # an int: the shortest edge
    crop: tuple[int, int] | None
    resample: int
    rescale_factor: float | None
    mean: np.ndarray | None
    std: np.ndarray | None

    @classmethod
    def from_file(cls, path: Path) -> "FeatureExtractor":
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelFolderError(f"cannot read {path} ({exc.__class__.__name__}); re-export the model with sd-export") from None
        if not isinstance(config, dict):
            raise ModelFolderError(f"{path} is not a JSON object; re-export the model with sd-export")
        normalize = config.get("do_normalize", True)
        return cls(
            size=_size(config.get("size", {"shortest_edge": 224}), "size", path) if config.get("do_resize", True) else 0,
            crop=_size(config.get("crop_size", {"height": 224, "width": 224}), "crop_size", path) if config.get("do_center_crop", True) else None,
            resample=int(config.get("resample", Image.Resampling.BICUBIC)),
            rescale_factor=float(config.get("rescale_factor", 1 / 255)) if config.get("do_rescale", True) else None,
            mean=np.asarray(config.get("image_mean", CLIP_MEAN), np.float32) if normalize else None,
            std=np.asarray(config.get("image_std", CLIP_STD), np.float32) if normalize else None,
        )

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """uint8 NHWC RGB images -> float32 NCHW `clip_input`."""
        return np.stack([self._one(image) for image in images]).transpose(0, 3, 1, 2)

    def _one(self, pixels: np.ndarray) -> np.ndarray:
        image = Image.fromarray(pixels, "RGB")
        if self.size:
            if isinstance(self.size, int):  # shortest edge to `size`, the other scaled and truncated (transformers' rule)
                w, h = image.size
                short, long = (w, h) if w <= h else (h, w)
                new_long = int(self.size * long / short)
                h, w = (new_long, self.size) if w <= h else (self.size, new_long)
            else:
                h, w = self.size
            image = image.resize((w, h), resample=self.resample)
        array = np.asarray(image)
        if self.crop is not None:
            array = center_crop(array, *self.crop)
        out = array.astype(np.float64) * self.rescale_factor if self.rescale_factor is not None else array
        out = out.astype(np.float32)
        if self.mean is not None:
            out = (out - self.mean) / self.std
        return out


def center_crop(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """The centre `height` x `width` of an HWC array, zero-padded around when it is smaller (transformers' rule:
    the offset rounds down, the padding up)."""
    h, w = array.shape[:2]
    pad_h, pad_w = max(0, height - h), max(0, width - w)
    if pad_h or pad_w:
        top, left = -(-pad_h // 2), -(-pad_w // 2)
        padded = np.zeros((h + pad_h, w + pad_w, *array.shape[2:]), array.dtype)
        padded[top : top + h, left : left + w] = array
        array, h, w = padded, h + pad_h, w + pad_w
    top, left = (h - height) // 2, (w - width) // 2
    return array[top : top + height, left : left + width]


def flagged(special_similarity: np.ndarray, similarity: np.ndarray, special_thresholds: list[float], thresholds: list[float]) -> bool:
    """diffusers' decision for one image (see the module docstring); float32 similarities, thresholds as Python floats."""
    adjustment = 0.0
    for value, threshold in zip(special_similarity, special_thresholds):
        if round(value - threshold + adjustment, 3) > 0:
            adjustment = 0.01
    return any(round(value - threshold + adjustment, 3) > 0 for value, threshold in zip(similarity, thresholds))


class SafetyChecker:
    """Flags images with unsafe concepts and blacks them out. `check` is its verb."""

    def __init__(self, session: LazySession, folder: Path, feature_extractor: FeatureExtractor):
        self.session = session
        self.feature_extractor = feature_extractor
        path = folder / CONCEPTS_FILE
        try:
            concepts = json.loads(path.read_text(encoding="utf-8"))
            self.special_thresholds = [float(v) for v in concepts["special_care_thresholds"]]
            self.thresholds = [float(v) for v in concepts["concept_thresholds"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelFolderError(f"cannot read the safety checker's thresholds in {path} ({exc.__class__.__name__}); "
                                   "re-export the model with sd-export") from None

    def check(self, images: np.ndarray) -> tuple[np.ndarray, list[bool]]:
        """float32 NHWC images in [0, 1] -> (the images with the flagged ones black, a flag per image)."""
        pixels = (images * 255).round().astype(np.uint8)  # what diffusers hands its feature extractor (PIL images)
        with self.session.use() as session:
            out = session.run({"clip_input": self.feature_extractor(pixels)})
        flags = [flagged(s, c, self.special_thresholds, self.thresholds) for s, c in zip(out["special_cos_dist"], out["cos_dist"])]
        if any(flags):
            images = images.copy()
            images[np.asarray(flags)] = 0.0
        return images, flags


def listed(manifest: dict | None) -> bool:
    """Whether a leansd export holds a safety checker. Only leansd's (listed in leansd.json) is used: an Optimum folder's
    safety_checker/model.onnx computes something else."""
    return names.SAFETY_CHECKER in ((manifest or {}).get("components") or {})


def feature_extractor(root: Path) -> FeatureExtractor:
    path = root / names.FEATURE_EXTRACTOR / PREPROCESSOR_FILE
    if not path.is_file():
        raise ModelFolderError(f"{path} is missing: the safety checker's image preprocessing; re-export the model with sd-export")
    return FeatureExtractor.from_file(path)
