"""The depth map of depth-to-image models (diffusers' `StableDiffusionDepth2ImgPipeline`), prepared as diffusers does.

The UNet of SD 2's depth model takes a fifth channel beside the latents: the depth map, resized to the latents' size
with PyTorch's bicubic interpolation (`interpolate(mode="bicubic", align_corners=False)`, reproduced here in numpy) and
scaled per image to [-1, 1] by its own minimum and maximum. The map is the caller's (an array, a `.npy` file or a
greyscale image, 16-bit PNGs keeping their precision; larger values nearer, as DPT/MiDaS writes it) or, as diffusers
does when none is given, the one the model's DPT depth estimator predicts from the init image (`DepthEstimator`, when
sd-export found one in the source folder).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from leansd.runtime.errors import InvalidInputError, ModelFolderError

CUBIC_A = -0.75  # PyTorch's bicubic coefficient
_WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "F")  # integer and float images read without going through 8 bits


def load_depth_map(depth: Any) -> np.ndarray:
    """A depth map (HxW or NxHxW array, a .npy path, an image path or a PIL image) as float32 N x H x W."""
    if isinstance(depth, (str, Path)):
        path = Path(depth)
        if not path.is_file():
            raise InvalidInputError(f"depth map {path} does not exist; pass a .npy array or a greyscale image")
        if path.suffix.lower() == ".npy":
            try:
                depth = np.load(path, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise InvalidInputError(f"cannot read the depth map {path} as a numpy array ({exc.__class__.__name__}); save it with numpy.save") from None
        else:
            try:
                with Image.open(path) as image:
                    depth = _from_image(image)
            except OSError as exc:
                raise InvalidInputError(f"cannot read the depth map {path} as an image ({exc.__class__.__name__}); pass a PNG or a .npy array") from None
    elif isinstance(depth, Image.Image):
        depth = _from_image(depth)
    array = np.asarray(depth)
    if array.dtype.kind not in "fiu" or array.ndim not in (2, 3) or 0 in array.shape or not np.isfinite(array).all():
        raise InvalidInputError(f"depth_map must be an HxW or NxHxW array of finite numbers, got {array.dtype} of shape {array.shape}")
    array = array.astype(np.float32)
    return array[None] if array.ndim == 2 else array


def _from_image(image: Image.Image) -> np.ndarray:
    image.load()
    return np.asarray(image if image.mode in _WIDE_MODES else image.convert("L")).astype(np.float32)


def bicubic_weights(size_in: int, size_out: int) -> np.ndarray:
    """The (size_out, size_in) matrix of PyTorch's bicubic resampling along one axis (align_corners=False: source
    position (i + 0.5) * in / out - 0.5, four taps, indices clamped at the borders, no antialiasing)."""
    scale = np.float32(size_in / size_out)
    weights = np.zeros((size_out, size_in), np.float64)
    a = CUBIC_A
    for i in range(size_out):
        real = float(scale * np.float32(i + 0.5) - np.float32(0.5))
        base = math.floor(real)
        t = real - base
        taps = (((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
                ((a + 2) * t - (a + 3)) * t * t + 1,
                ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,
                ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a)
        for k, w in enumerate(taps):
            weights[i, min(max(base - 1 + k, 0), size_in - 1)] += w
    return weights


def depth_condition(depth: np.ndarray, height: int, width: int) -> np.ndarray:
    """N x H x W depth maps -> the UNet's extra channel: N x 1 x height x width, each map scaled to [-1, 1]."""
    rows, cols = bicubic_weights(depth.shape[1], height), bicubic_weights(depth.shape[2], width)
    resized = np.einsum("yh,nhw,xw->nyx", rows, depth.astype(np.float64), cols).astype(np.float32)[:, None]
    low = resized.min(axis=(1, 2, 3), keepdims=True)
    high = resized.max(axis=(1, 2, 3), keepdims=True)
    if (high - low == 0).any():
        raise InvalidInputError("a depth map is flat (one value everywhere, at the latents' size), so it cannot be scaled to [-1, 1]; "
                                "pass a map with some depth in it")
    return (np.float32(2.0) * (resized - low) / (high - low) - np.float32(1.0)).astype(np.float32)


class DepthEstimator:
    """The model's depth estimator (DPT, exported by sd-export when the source has one) with its feature extractor's
    preprocessing (transformers' `DPTImageProcessor`: resize to a fixed size with pillow, rescale, normalise). `estimate`
    is its verb."""

    def __init__(self, session: Any, preprocessor: Path):
        self.session = session
        try:
            config = json.loads(preprocessor.read_text(encoding="utf-8"))
            size = config.get("size", 384)
            size = {"height": size, "width": size} if isinstance(size, int) else size
            multiple = int(config.get("ensure_multiple_of", 1))
            self.height, self.width = (int(round(int(size[k]) / multiple) * multiple) for k in ("height", "width"))
            self.resample = int(config.get("resample", Image.Resampling.BICUBIC))
            self.rescale_factor = float(config.get("rescale_factor", 1 / 255)) if config.get("do_rescale", True) else None
            normalize = config.get("do_normalize", True)
            self.mean = np.asarray(config.get("image_mean", (0.5, 0.5, 0.5)), np.float32) if normalize else None
            self.std = np.asarray(config.get("image_std", (0.5, 0.5, 0.5)), np.float32) if normalize else None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelFolderError(f"cannot read the depth estimator's preprocessing in {preprocessor} ({exc.__class__.__name__}); "
                                   "re-export the model with sd-export") from None

    def preprocess(self, pixels: list[np.ndarray]) -> np.ndarray:
        """uint8 HxWx3 images -> float32 N x 3 x height x width `pixel_values`."""
        out = []
        for image in pixels:
            array = np.asarray(Image.fromarray(image, "RGB").resize((self.width, self.height), resample=self.resample))
            values = array.astype(np.float64) * self.rescale_factor if self.rescale_factor is not None else array
            values = values.astype(np.float32)
            if self.mean is not None:
                values = (values - self.mean) / self.std
            out.append(values.transpose(2, 0, 1))
        return np.stack(out)

    def estimate(self, pixels: list[np.ndarray]) -> np.ndarray:
        """uint8 HxWx3 images -> their depth maps, N x H' x W' (larger nearer), as the model predicts them."""
        with self.session.use() as session:
            return session.run({"pixel_values": self.preprocess(pixels)})["predicted_depth"].astype(np.float32)


def as_uint8_images(image: Any) -> list[np.ndarray]:
    """The init image(s) as the depth estimator's feature extractor sees them: 8-bit RGB, one array per image."""
    if isinstance(image, Image.Image):
        return [np.asarray(image.convert("RGB"))]
    array = np.asarray(image)
    array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8) if array.dtype != np.uint8 else array
    return list(array[None] if array.ndim == 3 else array)
