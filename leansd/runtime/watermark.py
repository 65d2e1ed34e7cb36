"""The invisible watermark of the Stable Diffusion reference scripts, in numpy.

The scripts call the `invisible-watermark` package (`imwatermark`, which imports torch and OpenCV):
`WatermarkEncoder().set_watermark('bytes', b"StableDiffusionV1")` (SD 2: b"SDV2") then `encode(bgr, 'dwtDct')`.
That method (its class `EmbedMaxDct`, default scales [0, 36, 36], blocks of 4) does, for a uint8 image:
  1. YUV with OpenCV's 8-bit fixed-point BGR2YUV (reproduced bit for bit below);
  2. of the top-left part whose sides are multiples of 4, only channel 1, U, is marked: its loop is
     `for channel in range(2)` with scale 0 for Y, so V (scale 36 too) is never visited;
  3. a one-level Haar DWT (pywt 'haar'); the LL subband is cut into 4x4 blocks (8x8 pixels), row by row,
     block n carrying bit n mod L. Despite the name there is no DCT: in the block (LL values themselves),
     the largest |value| other than the top-left one is quantized to (floor(|v| / 36) + 0.25 + 0.5 * bit) * 36,
     keeping its sign;
  4. inverse DWT, given the detail subbands as (V, H, D) instead of (H, V, D): each 2x2 pixel cell of U is
     transposed, marked or not. The float result is cast to uint8 by truncation (numpy's astype), so values
     just below an integer drop by 1; then the whole image (also the uncropped edge) goes back with YUV2BGR.
The decoder repeats 1-3 and reads bit = (|v| mod 36 > 18) per block, then bit n = mean over its blocks
* 255 > 127. Bits are the bytes' bits, most significant first (np.unpackbits).

All of this is reproduced with the package's float64 operation order, so our marks equal its marks pixel
for pixel, except one deliberate difference: where a marked U value leaves [0, 255] (saturated blues and
yellows), the package's cast wraps around (256 -> 0) and we clip.
"""
from __future__ import annotations

import numpy as np

DEFAULT_TEXT = "StableDiffusionV1"  # the SD 1 scripts; the SD 2 scripts use "SDV2"
SCALE = 36.0  # the package's scale for U
_H = 0.7071067811865476  # pywt's Haar filter tap
_SHIFT, _HALF = 14, 1 << 13  # OpenCV's fixed point for 8-bit YUV


def text_bits(text: str | bytes) -> np.ndarray:
    """The watermark bits of a text (UTF-8) or bytes, as the package's 'bytes' type: MSB first."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    if not data:
        raise ValueError("the watermark text is empty")
    return np.unpackbits(np.frombuffer(data, dtype=np.uint8))


def capacity(height: int, width: int) -> int:
    """How many 8x8 blocks carry bits in an image of this size (each bit needs at least one)."""
    return (height // 8) * (width // 8)


def embed(image: np.ndarray, text: str | bytes = DEFAULT_TEXT) -> np.ndarray:
    """An HxWx3 uint8 RGB image with `text` marked in it, as the reference scripts' dwtDct watermark."""
    rgb = _checked(image)
    bits = text_bits(text)
    h, w = rgb.shape[0] // 4 * 4, rgb.shape[1] // 4 * 4
    if capacity(h, w) < bits.size:
        raise ValueError(f"a {rgb.shape[1]}x{rgb.shape[0]} image has room for {capacity(h, w)} watermark bits, "
                         f"not {bits.size}; use a shorter text or a larger image")
    y, u, v = _to_yuv(rgb)  # the whole image goes through YUV and back, as in the package
    ll, details = _dwt(u[:h, :w])
    blocks, (bi, bj), sign = _blocks(ll)
    rows = np.arange(blocks.shape[0])
    chosen = blocks[rows, bi, bj]
    mark = bits[rows % bits.size].astype(np.float64)
    blocks[rows, bi, bj] = sign * ((np.abs(chosen) // SCALE + 0.25 + 0.5 * mark) * SCALE)
    _unblock(ll, blocks)
    u[:h, :w] = np.clip(np.trunc(_idwt_swapped(ll, *details)), 0, 255)
    return _to_rgb(y, u, v)


def read_bits(image: np.ndarray, length_bits: int) -> np.ndarray:
    """The `length_bits` watermark bits read from an HxWx3 uint8 RGB image (0/1 uint8)."""
    rgb = _checked(image)
    h, w = rgb.shape[0] // 4 * 4, rgb.shape[1] // 4 * 4
    if length_bits < 1 or capacity(h, w) < length_bits:
        raise ValueError(f"cannot read {length_bits} bits from a {rgb.shape[1]}x{rgb.shape[0]} image")
    _, u, _ = _to_yuv(rgb[:h, :w])
    blocks, (bi, bj), _ = _blocks(_dwt(u)[0])
    rows = np.arange(blocks.shape[0])
    scores = (np.abs(blocks[rows, bi, bj]) % SCALE > 0.5 * SCALE).astype(np.float64)
    means = np.bincount(rows % length_bits, weights=scores, minlength=length_bits) / np.bincount(rows % length_bits)
    return (means * 255 > 127).astype(np.uint8)


def read(image: np.ndarray, length_bits: int) -> bytes:
    """The watermark bytes read from an image (decode with .decode('utf-8', 'replace') for text)."""
    return np.packbits(read_bits(image, length_bits))[: length_bits // 8].tobytes()


def _checked(image: np.ndarray) -> np.ndarray:
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"the watermark works on HxWx3 uint8 RGB images, got {array.dtype} {array.shape}")
    return array


def _to_yuv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """OpenCV's COLOR_BGR2YUV for uint8 (exact on all 2^24 colours), as int64 channels."""
    r, g, b = (rgb[..., i].astype(np.int64) for i in range(3))
    y = (b * 1868 + g * 9617 + r * 4899 + _HALF) >> _SHIFT
    u = ((b - y) * 8061 + (128 << _SHIFT) + _HALF) >> _SHIFT
    v = ((r - y) * 14369 + (128 << _SHIFT) + _HALF) >> _SHIFT
    return y, np.clip(u, 0, 255), np.clip(v, 0, 255)


def _to_rgb(y: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """OpenCV's COLOR_YUV2BGR for uint8 (exact on all 2^24 inputs), as RGB uint8."""
    b = y + (((u - 128) * 33292 + _HALF) >> _SHIFT)
    g = y + (((u - 128) * -6472 + (v - 128) * -9519 + _HALF) >> _SHIFT)
    r = y + (((v - 128) * 18678 + _HALF) >> _SHIFT)
    return np.clip(np.stack([r, g, b], axis=-1), 0, 255).astype(np.uint8)


def _dwt(x: np.ndarray):
    """pywt.dwt2(x, 'haar') with its float64 order (rows pairs first): LL, and the (H, V, D) details."""
    f = x.astype(np.float64)
    a, b, c, d = f[0::2, 0::2], f[0::2, 1::2], f[1::2, 0::2], f[1::2, 1::2]
    lo_l, lo_r, hi_l, hi_r = a * _H + c * _H, b * _H + d * _H, a * _H - c * _H, b * _H - d * _H
    return lo_l * _H + lo_r * _H, (hi_l * _H + hi_r * _H, lo_l * _H - lo_r * _H, hi_l * _H - hi_r * _H)


def _idwt_swapped(ll: np.ndarray, h: np.ndarray, v: np.ndarray, d: np.ndarray) -> np.ndarray:
    """pywt.idwt2((ll, (v, h, d)), 'haar'), the package's call with H and V swapped: columns, then rows."""
    lo_l, lo_r = ll * _H + h * _H, ll * _H - h * _H  # the package passes H where V belongs
    hi_l, hi_r = v * _H + d * _H, v * _H - d * _H
    out = np.empty((ll.shape[0] * 2, ll.shape[1] * 2))
    out[0::2, 0::2], out[1::2, 0::2] = lo_l * _H + hi_l * _H, lo_l * _H - hi_l * _H
    out[0::2, 1::2], out[1::2, 1::2] = lo_r * _H + hi_r * _H, lo_r * _H - hi_r * _H
    return out


def _blocks(ll: np.ndarray):
    """The whole 4x4 blocks of LL, row by row (N, 4, 4), the position of each one's largest |value| after
    the first (np.argmax: the first of equals), and that value's sign (+1 for 0, as the package)."""
    n, m = ll.shape[0] // 4, ll.shape[1] // 4
    blocks = ll[: n * 4, : m * 4].reshape(n, 4, m, 4).transpose(0, 2, 1, 3).reshape(n * m, 4, 4)
    pos = np.argmax(np.abs(blocks.reshape(-1, 16)[:, 1:]), axis=1) + 1
    bi, bj = pos // 4, pos % 4
    sign = np.where(blocks[np.arange(pos.size), bi, bj] >= 0, 1.0, -1.0)
    return blocks, (bi, bj), sign


def _unblock(ll: np.ndarray, blocks: np.ndarray) -> None:
    n, m = ll.shape[0] // 4, ll.shape[1] // 4
    ll[: n * 4, : m * 4] = blocks.reshape(n, m, 4, 4).transpose(0, 2, 1, 3).reshape(n * 4, m * 4)
