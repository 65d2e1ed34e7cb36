"""leansd.runtime.watermark against the `invisible-watermark` package (imwatermark), the SD scripts' watermark.

The scripts mark with `WatermarkEncoder().set_watermark('bytes', text.encode())` and `encode(bgr, 'dwtDct')`.
Measured: our marked images equal the package's pixel for pixel (max difference 0) on every image here, and
the two decoders read the same bits from every PNG. The method itself is fragile (not ours to fix): its
8-bit round trip moves block maxima, so on smooth images it misreads some bits whoever marked them (bit error
rates of 0.1-0.3 on the synthetic images here; on the bundled model's flat, saturated shapes at 256x256, 0.36
on average, as marked values clip in RGB). On the bundled model's red circle on blue at 4 steps (blurrier)
both texts read back with no error in both directions.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

imwatermark = pytest.importorskip("imwatermark")
cv2 = pytest.importorskip("cv2")

from leansd.runtime import watermark  # noqa: E402

TEXTS = ["StableDiffusionV1", "SDV2"]  # what the SD 1 and SD 2 scripts pass


def png(rgb: np.ndarray) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, "PNG")
    return np.array(Image.open(buf))


def package_embed(rgb: np.ndarray, text: str) -> np.ndarray:
    """What the scripts' put_watermark does: RGB -> BGR, encode 'dwtDct', back to RGB."""
    encoder = imwatermark.WatermarkEncoder()
    encoder.set_watermark("bytes", text.encode("utf-8"))
    return encoder.encode(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), "dwtDct")[:, :, ::-1]


def package_read(rgb: np.ndarray, text: str) -> bytes:
    decoder = imwatermark.WatermarkDecoder("bytes", len(text) * 8)
    return decoder.decode(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), "dwtDct")


def synthetic(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth colour gradient with blotchy texture and fine noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    base = np.stack([0.5 + 0.3 * np.sin(6 * x + seed), 0.4 + 0.3 * np.cos(5 * y), 0.5 + 0.25 * np.sin(4 * (x + y))], -1)
    blotches = rng.normal(0, 0.04, (height // 8 + 1, width // 8 + 1, 3)).repeat(8, 0).repeat(8, 1)[:height, :width]
    return (np.clip(base + blotches + rng.normal(0, 0.02, base.shape), 0, 1) * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def model_image() -> np.ndarray:
    import leansd
    from leansd.runtime.loader import bundled_model_path

    if not (bundled_model_path() / "leansd.json").is_file():
        pytest.skip("the bundled default model is not in this checkout")
    out = leansd.load()("a red circle on a blue background", height=256, width=256, seed=0, num_inference_steps=4, output_type="np")
    return (out.images[0] * 255).round().astype(np.uint8)


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("size", [(256, 256), (300, 421), (512, 384)])
def test_embed_equals_package(size, text):
    image = synthetic(*size, seed=size[1])
    ours, theirs = watermark.embed(image, text), package_embed(image, text)
    assert np.abs(ours.astype(int) - theirs).max() == 0
    # Whoever marked, both decoders read the same bits from the PNG.
    for marked in (ours, theirs):
        assert watermark.read(png(marked), len(text) * 8) == package_read(png(marked), text)


@pytest.mark.parametrize("text", TEXTS)
def test_both_ways_on_model_image(model_image, text):
    ours, theirs = png(watermark.embed(model_image, text)), png(package_embed(model_image, text))
    assert np.abs(ours.astype(int) - theirs).max() == 0
    assert package_read(ours, text) == text.encode()  # its decoder reads our mark
    assert watermark.read(theirs, len(text) * 8) == text.encode()  # ours reads its mark
    assert watermark.read(model_image, len(text) * 8) != text.encode()  # an unmarked image does not carry it


def test_colour_conversion_equals_opencv():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)
    y, u, v = watermark._to_yuv(rgb)
    assert (np.stack([y, u, v], -1) == cv2.cvtColor(rgb[:, :, ::-1], cv2.COLOR_BGR2YUV)).all()
    assert (watermark._to_rgb(*(rgb[..., i].astype(np.int64) for i in range(3))) == cv2.cvtColor(rgb, cv2.COLOR_YUV2BGR)[:, :, ::-1]).all()
