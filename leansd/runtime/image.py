"""Images in and out: numpy <-> PIL, init-image loading, PNG files with generation parameters."""
from __future__ import annotations

import errno
import json
import os
import re
import secrets
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from leansd.runtime.errors import InvalidInputError

# Where A1111-style infotext breaks a prompt apart: whitespace and line breaks of any kind (str.split("\n"),
# str.splitlines(), strip()) and other control characters. Folded to one space, a prompt stays on one line.
_FOLD = re.compile(r"[\s\x00-\x1f\x7f-\x9f]+")
# What may not stand raw in a field's value: any whitespace but the space, control characters, line separators.
_BREAKS = re.compile(r"[^\S ]|[\x00-\x1f\x7f-\x9f]")
_RAW_IN_JSON = re.compile(r"[\x7f-\x9f\u2028\u2029]")  # json.dumps leaves these unescaped
# Pillow modes holding more than 8 bits per sample, read as 0..65535 ("I": 16-bit PGM, 32-bit TIFF).
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# Errors Pillow raises for a file it cannot read (broken chunks, truncated data, oversized text chunks).
_READ_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError)


def decoded_to_unit(decoded: np.ndarray) -> np.ndarray:
    """VAE output in [-1, 1], NCHW -> float32 NHWC in [0, 1] (what diffusers returns for output_type="np")."""
    return np.clip(decoded / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1).astype(np.float32)


def unit_to_pil(images: np.ndarray) -> list[Image.Image]:
    """float NHWC in [0, 1] -> PIL images, rounding like diffusers ((x * 255).round())."""
    return [Image.fromarray(img) for img in (images * 255).round().astype(np.uint8)]


def load_image(source: str | Path | Image.Image | np.ndarray) -> Image.Image:
    """Open an init image from a path, a PIL image or a uint8/float HWC array, as RGB (see `to_rgb`).

    A file is turned upright by its EXIF orientation first, as diffusers' `load_image` does.
    """
    if isinstance(source, Image.Image):
        return to_rgb(source)
    if isinstance(source, np.ndarray):
        array = source
        if array.ndim != 3 or array.shape[-1] not in (3, 4):
            raise InvalidInputError(f"init image array has shape {array.shape}; pass an HxWx3 array (uint8, or float in [0, 1])")
        if array.dtype != np.uint8:
            array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
        return Image.fromarray(array[..., :3])
    path = Path(source)
    return _read_file(path, "init image", lambda img: to_rgb(img, f"init image {path}"))


def _read_file(path: Path, what: str, convert):
    """`convert(image)` of the upright image in the file at `path`, or a one-line InvalidInputError naming `what`."""
    _check_image_file(path, what)
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that, then decodes gigabytes: refuse both.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                return convert(_upright(img))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidInputError(f"{what} {path} is too large to open safely ({str(exc).rstrip('.')}); pass a smaller image") from None
    except _READ_ERRORS as exc:
        raise InvalidInputError(f"cannot read {what} {path} ({_one_line(exc)}); pass a PNG or JPEG file") from None


def _upright(img: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001  (a damaged EXIF block: use the pixels as stored)
        return img


def _check_image_file(path: Path, what: str = "init image") -> None:
    if path.is_dir():
        raise InvalidInputError(f"{what} {path} is a folder; pass the path of a PNG or JPEG file")
    if not path.exists():
        raise InvalidInputError(f"{what} {path} does not exist; pass the path of a PNG or JPEG file")
    if not path.is_file():
        raise InvalidInputError(f"{what} {path} is not a regular file; pass the path of a PNG or JPEG file")


def load_mask(source: str | Path | Image.Image | np.ndarray) -> Image.Image | np.ndarray:
    """An inpainting mask (white = repaint, black = keep) from a path, a PIL image or an array.

    Images: with transparency (alpha, or a palette/tRNS transparent colour) where some pixel is not fully opaque,
    the alpha channel is the mask: every pixel with alpha < 255 is repainted, opaque ones are kept, whatever their
    colour (the convention of image editors and of OpenAI's image edits: erase what is to be redrawn; the init image
    itself, with its holes, can be the mask). Otherwise the grey level is the mask, as in diffusers (its pixels
    are binarized at 0.5 after resizing). 16-bit and float greyscale are scaled as `to_rgb` does.
    Arrays: HxW, HxWx1 or NxHxWx1, values in [0, 1] (uint8: 0..255), binarized at 0.5 after resizing.
    """
    if isinstance(source, np.ndarray):
        array = source
        if array.ndim in (3, 4) and array.shape[-1] == 1:
            array = array[..., 0]
        elif array.ndim != 2:
            raise InvalidInputError(f"mask array has shape {source.shape}; pass HxW (or HxWx1, NxHxWx1) with values in [0, 1]")
        array = array.astype(np.float32) / (255.0 if array.dtype == np.uint8 else 1.0)
        return array[None] if array.ndim == 2 else array
    if isinstance(source, Image.Image):
        return _mask_image(source, "mask image")
    path = Path(source)
    return _read_file(path, "mask image", lambda img: _mask_image(img, f"mask image {path}"))


def _mask_image(img: Image.Image, what: str) -> Image.Image:
    """A mask image in a mode diffusers' mask processing reads (resized, then converted to "L"), alpha rule applied."""
    if img.mode in _WIDE_MODES or img.mode == "F":
        return to_rgb(img, what).convert("L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        try:
            alpha = np.asarray(img.convert("RGBA").getchannel("A"))
        except ValueError as exc:
            raise InvalidInputError(f"cannot read the transparency of {what} ({exc}); save it as an RGBA or greyscale PNG") from None
        if alpha.min() < 255:
            return Image.fromarray(np.where(alpha < 255, 255, 0).astype(np.uint8), "L")
        return to_rgb(img, what)  # opaque everywhere: the grey level is the mask
    img.load()
    # Modes diffusers resizes as they are (Pillow resizes "1" and "P" with nearest neighbours) and then makes grey.
    return img.copy() if img.mode in ("L", "RGB", "1", "P") else to_rgb(img, what)


def mask_to_model_input(mask: Image.Image | np.ndarray, width: int, height: int) -> np.ndarray:
    """A mask from `load_mask` -> float32 N x 1 x height x width of 0 and 1, as diffusers' mask processor makes it.

    An image is resized with Lanczos in its own mode, then made greyscale, scaled to [0, 1] and binarized at 0.5;
    an array is resized with nearest neighbours (as torch's `interpolate`), then binarized.
    """
    if isinstance(mask, Image.Image):
        resized = mask.resize((width, height), Image.LANCZOS) if mask.size != (width, height) else mask
        values = (np.asarray(resized.convert("L"), dtype=np.float32) / 255.0)[None]
    else:
        values = nearest_resize(mask, height, width)
    return (values >= 0.5).astype(np.float32)[:, None]


def nearest_resize(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize the last two axes to (height, width) as torch's `interpolate(mode="nearest")` picks its source pixels:
    floor(out_index * float32(in / out)), clamped."""
    def index(size_in: int, size_out: int) -> np.ndarray:
        if size_in == size_out:
            return np.arange(size_out)
        scale = np.float32(size_in) / np.float32(size_out)
        return np.minimum(np.floor(np.arange(size_out, dtype=np.float32) * scale).astype(np.int64), size_in - 1)

    return array[..., index(array.shape[-2], height)[:, None], index(array.shape[-1], width)[None, :]]


def to_rgb(img: Image.Image, what: str = "init image") -> Image.Image:
    """Any Pillow image as 8-bit RGB.

    16-bit and 32-bit integer greyscale ("I;16", "I") are scaled from 0..65535 to 0..255; float greyscale ("F") is
    read as [0, 1] when it fits there, else as 0..255. Transparent pixels (alpha, or a palette/tRNS transparent
    colour) are laid over white, as AUTOMATIC1111 does with init images; other modes (CMYK, YCbCr, 1, P, ...)
    go through Pillow's conversion.
    """
    if img.mode in _WIDE_MODES:
        wide = np.asarray(img).astype(np.float64)
        img = Image.fromarray((np.clip(wide, 0, 65535) / 257.0).round().astype(np.uint8), "L")
    elif img.mode == "F":
        values = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0)
        scale = 255.0 if values.size and 0.0 <= values.min() and values.max() <= 1.0 else 1.0
        img = Image.fromarray(np.clip(values * scale, 0, 255).round().astype(np.uint8), "L")
    try:
        if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
            rgba = img.convert("RGBA")
            return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
        return img.convert("RGB")
    except ValueError as exc:
        raise InvalidInputError(f"cannot convert {what} from mode {img.mode} to RGB ({exc}); save it as an RGB PNG or JPEG") from None


def image_to_model_input(image: Image.Image, width: int, height: int, resample: str = "lanczos") -> np.ndarray:
    """PIL RGB -> float32 NCHW in [-1, 1] at (height, width), resized when sizes differ (diffusers resizes init images
    with Lanczos, the upscaler's input bicubic)."""
    if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS if resample == "lanczos" else Image.BICUBIC)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return (array * 2.0 - 1.0).transpose(2, 0, 1)[None]


def unit_array_to_model_input(images: np.ndarray) -> np.ndarray:
    """float NHWC (or HWC) in [0, 1] -> NCHW in [-1, 1], no resizing (the exact path diffusers takes for arrays)."""
    if images.ndim == 3:
        images = images[None]
    return (images.astype(np.float32) * 2.0 - 1.0).transpose(0, 3, 1, 2)


def infotext_prompt(prompt: str) -> str:
    """`prompt` as one line that AUTOMATIC1111's `parse_generation_parameters` reads back unchanged.

    Runs of whitespace, line breaks and control characters become one space and the ends are trimmed: CLIP's
    tokenizer folds whitespace the same way, so the text encoder sees the same tokens (control characters, which
    it would keep, become spaces). A prompt starting with "Negative prompt:" gets a lower-case "n" (CLIP lowercases
    everything), so it cannot pass for the negative-prompt line.
    """
    text = _FOLD.sub(" ", prompt).strip(" ")
    return "n" + text[1:] if text.startswith("Negative prompt:") else text


def infotext_value(value: object) -> str:
    """A `Key: value` field's value, JSON-quoted as AUTOMATIC1111's `quote` does when it holds a comma, colon or
    newline (and also when it holds a quote or line break of any kind, or leading/trailing spaces), so that it
    parses back as one field."""
    text = str(value)
    if not text or text != text.strip() or any(c in text for c in ',:"') or _BREAKS.search(text):
        return _RAW_IN_JSON.sub(lambda m: f"\\u{ord(m.group()):04x}", json.dumps(text, ensure_ascii=False))
    return text


def a1111_parameters(prompt: str, negative_prompt: str | None, settings: dict) -> str:
    """The `parameters` text chunk AUTOMATIC1111-style tools read: prompt, negative prompt, then `Key: value, ...`.

    The prompts are folded onto one line each (`infotext_prompt`) and values quoted where needed
    (`infotext_value`), so every field parses back as written whatever the prompts contain.
    """
    lines = [infotext_prompt(prompt)]
    if negative_prompt and infotext_prompt(negative_prompt):
        lines.append(f"Negative prompt: {infotext_prompt(negative_prompt)}")
    lines.append(", ".join(f"{k}: {infotext_value(v)}" for k, v in settings.items() if v is not None))
    return "\n".join(lines)


def save_png(image: Image.Image, path: Path, parameters: str | None = None, overwrite: bool = False) -> None:
    """Write a PNG atomically with an optional `parameters` text chunk (see `stage_png` and `commit_file`)."""
    path = Path(path)
    if not overwrite and os.path.lexists(path):
        raise InvalidInputError(f"{path} already exists; choose another --output or pass --overwrite")
    commit_file(stage_png(image, path, parameters), path, overwrite)


def stage_png(image: Image.Image, path: Path, parameters: str | None = None) -> Path:
    """Write the PNG to a new hidden temp file in `path`'s folder and return the temp file's path.

    The temp file is created with mode 0o666 under the process umask, like any new file.
    """
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", parameters.encode("utf-8", "backslashreplace").decode("utf-8"))
    tmp, fd = _new_temp_file(Path(path))
    try:
        with os.fdopen(fd, "wb") as fh:
            image.save(fh, format="PNG", pnginfo=info)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _new_temp_file(path: Path) -> tuple[Path, int]:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return tmp, os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue


def commit_file(tmp: Path, path: Path, overwrite: bool = False) -> None:
    """Move the staged file `tmp` to `path` (same folder) and remove `tmp`.

    Without `overwrite`, `os.link` puts it in place, which fails when `path` exists: of two writers finishing
    together, one gets InvalidInputError and nothing is replaced. With `overwrite`, `os.replace` swaps it in and
    the new file keeps the replaced file's permission bits.
    """
    try:
        if overwrite:
            _copy_mode(path, tmp)
            os.replace(tmp, path)
        else:
            _link_new(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _copy_mode(source: Path, target: Path) -> None:
    try:
        mode = stat.S_IMODE(os.stat(source).st_mode)
    except OSError:
        return
    os.chmod(target, mode)


def _link_new(tmp: Path, path: Path) -> None:
    exists = InvalidInputError(f"{path} already exists; choose another --output or pass --overwrite")
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise exists from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS, errno.EXDEV):
            raise
        # A file system without hard links: claim the name with an exclusive create, then move the file over it.
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            raise exists from None
        os.replace(tmp, path)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
