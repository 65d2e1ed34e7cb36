"""Images in and out: numpy <-> PIL, init-image loading, PNG files with generation parameters."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from leansd.runtime.errors import InvalidInputError


def decoded_to_unit(decoded: np.ndarray) -> np.ndarray:
    """VAE output in [-1, 1], NCHW -> float32 NHWC in [0, 1] (what diffusers returns for output_type="np")."""
    return np.clip(decoded / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1).astype(np.float32)


def unit_to_pil(images: np.ndarray) -> list[Image.Image]:
    """float NHWC in [0, 1] -> PIL images, rounding like diffusers ((x * 255).round())."""
    return [Image.fromarray(img) for img in (images * 255).round().astype(np.uint8)]


def load_image(source: "str | Path | Image.Image | np.ndarray") -> Image.Image:
    """Open an init image from a path, a PIL image or a uint8/float HWC array, as RGB."""
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    if isinstance(source, np.ndarray):
        array = source
        if array.ndim != 3 or array.shape[-1] not in (3, 4):
            raise InvalidInputError(f"init image array has shape {array.shape}; pass an HxWx3 array (uint8, or float in [0, 1])")
        if array.dtype != np.uint8:
            array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
        return Image.fromarray(array[..., :3])
    path = Path(source)
    if not path.is_file():
        raise InvalidInputError(f"init image {path} does not exist; pass the path of a PNG or JPEG file")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise InvalidInputError(f"cannot read init image {path} ({exc}); pass a PNG or JPEG file") from None


def image_to_model_input(image: Image.Image, width: int, height: int) -> np.ndarray:
    """PIL RGB -> float32 NCHW in [-1, 1] at (height, width), resized with Lanczos when sizes differ."""
    if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return (array * 2.0 - 1.0).transpose(2, 0, 1)[None]


def unit_array_to_model_input(images: np.ndarray) -> np.ndarray:
    """float NHWC (or HWC) in [0, 1] -> NCHW in [-1, 1], no resizing (the exact path diffusers takes for arrays)."""
    if images.ndim == 3:
        images = images[None]
    return (images.astype(np.float32) * 2.0 - 1.0).transpose(0, 3, 1, 2)


def a1111_parameters(prompt: str, negative_prompt: str | None, settings: dict) -> str:
    """The `parameters` text chunk AUTOMATIC1111-style tools read: prompt, negative prompt, then `Key: value, ...`."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{k}: {v}" for k, v in settings.items() if v is not None))
    return "\n".join(lines)


def save_png(image: Image.Image, path: Path, parameters: str | None = None, overwrite: bool = False) -> None:
    """Write a PNG atomically (temp file + rename) with an optional `parameters` text chunk."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise InvalidInputError(f"{path} already exists; choose another --output or pass --overwrite")
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            image.save(fh, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
