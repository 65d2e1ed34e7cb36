"""Images over HTTP: base64 in (with or without a data: prefix), PNG bytes out with a `parameters` chunk."""
from __future__ import annotations

import base64
import binascii
import io

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from leansd.server.errors import RequestError

# Pixels an uploaded image may have (a decompression bomb is refused before it is decoded).
MAX_UPLOAD_PIXELS = 64 * 1024 * 1024


def decode_base64_image(text: str, field: str) -> Image.Image:
    """A PNG/JPEG/WebP sent as base64 text, or as a data: URL."""
    if not isinstance(text, str) or not text.strip():
        raise RequestError(f"{field} must be a base64-encoded PNG or JPEG image", field)
    payload = text.split(",", 1)[1] if text.lstrip().startswith("data:") and "," in text else text
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{field} is not valid base64; send the image file's bytes base64-encoded", field) from None
    return open_image(data, field)


def open_image(data: bytes, field: str) -> Image.Image:
    """Decode image file bytes, refusing what is not an image or is too large to decode safely."""
    try:
        img = Image.open(io.BytesIO(data))
        if img.width * img.height > MAX_UPLOAD_PIXELS:
            raise RequestError(f"{field} is {img.width}x{img.height} pixels, more than the {MAX_UPLOAD_PIXELS} allowed; "
                               "send a smaller image", field, 413)
        img.load()
    except RequestError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        raise RequestError(f"{field} is not a readable image ({type(exc).__name__}); send a PNG or JPEG", field) from None
    return img


def png_bytes(image: Image.Image, parameters: str | None = None) -> bytes:
    """The image as PNG, with the A1111 `parameters` text chunk when given (as sd-run writes it)."""
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", parameters.encode("utf-8", "backslashreplace").decode("utf-8"))
    out = io.BytesIO()
    image.save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def unit_png(unit: np.ndarray) -> bytes:
    """A float HWC image in [0, 1] (a preview) as PNG bytes."""
    return png_bytes(Image.fromarray((np.clip(unit, 0, 1) * 255).round().astype(np.uint8)))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
