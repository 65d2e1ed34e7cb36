"""The depth map of depth-to-image models (diffusers' `StableDiffusionDepth2ImgPipeline`), prepared as diffusers does.

The UNet of SD 2's depth model takes a fifth channel beside the latents: the depth map, resized to the latents' size
with PyTorch's bicubic interpolation (`interpolate(mode="bicubic", align_corners=False)`, reproduced here in numpy) and
scaled per image to [-1, 1] by its own minimum and maximum. diffusers estimates the map with the model's DPT depth
estimator when none is given; leansd does not export that estimator yet, so the caller gives the map: an array, a
`.npy` file or a greyscale image (16-bit PNGs keep their precision), larger values nearer, as DPT (MiDaS) writes it.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from leansd.runtime.errors import InvalidInputError

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
