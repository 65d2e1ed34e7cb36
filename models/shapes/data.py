"""Procedural training data for the bundled shapes model: flat shapes on flat backgrounds, with captions.

Nothing is downloaded; every image is drawn on the fly from a seeded numpy generator.

Grammar (the full caption, which the evaluator checks):

    a {colour} {shape} on a {colour} background        ("an" before "orange" half of the time)

with the shape colour never equal to the background colour. A fraction of the training captions
leave attributes out ("a red circle", "a circle on a blue background", "a circle"); the attribute left
out is still drawn at random, which is what makes negative prompts meaningful.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# sRGB colours of the palette.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "orange": (245, 140, 30),
    "purple": (140, 60, 190),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

RESOLUTION = 64
SUPERSAMPLE = 4  # drawn at 4x and box-filtered down: anti-aliased edges
MIN_SIZE, MAX_SIZE = 0.40, 0.75  # side of the shape's bounding box, as a fraction of the image
MARGIN = 2  # pixels kept free between the shape and the image border

# Probability of each caption form in training; the first is the full grammar.
CAPTION_FORMS: tuple[tuple[str, float], ...] = (
    ("{a_c} {c} {s} on {a_b} {b} background", 0.80),
    ("{a_c} {c} {s}", 0.08),
    ("a {s} on {a_b} {b} background", 0.08),
    ("a {s}", 0.04),
)


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    cx: float  # centre of the bounding box, pixels
    cy: float
    size: float  # side of the (square) bounding box, pixels


def article(word: str, rng: np.random.Generator | None = None) -> str:
    """'a', or 'an' before a vowel half of the time (both are seen in training)."""
    if word[0] in "aeiou" and (rng is None or rng.random() < 0.5):
        return "an"
    return "a"


def full_caption(shape: str, colour: str, background: str) -> str:
    """The canonical caption of the grammar, as the evaluator writes it."""
    return f"a {colour} {shape} on a {background} background"


def sample_scene(rng: np.random.Generator, resolution: int = RESOLUTION, **fixed: str) -> Scene:
    """A random scene; `shape`, `colour` or `background` may be fixed by keyword."""
    names = list(COLOURS)
    shape = fixed.get("shape") or SHAPES[rng.integers(len(SHAPES))]
    background = fixed.get("background") or names[rng.integers(len(names))]
    colour = fixed.get("colour")
    if colour is None:
        others = [n for n in names if n != background]
        colour = others[rng.integers(len(others))]
    if colour == background:
        raise ValueError(f"shape colour and background are both {colour!r}")
    size = resolution * rng.uniform(MIN_SIZE, MAX_SIZE)
    lo, hi = MARGIN + size / 2, resolution - MARGIN - size / 2
    cx, cy = rng.uniform(lo, hi), rng.uniform(lo, hi)
    return Scene(shape, colour, background, float(cx), float(cy), float(size))


def render(scene: Scene, resolution: int = RESOLUTION) -> np.ndarray:
    """The scene as an HxWx3 uint8 sRGB array."""
    k = SUPERSAMPLE
    img = Image.new("RGB", (resolution * k, resolution * k), COLOURS[scene.background])
    draw = ImageDraw.Draw(img)
    h = scene.size * k / 2
    x, y = scene.cx * k, scene.cy * k
    left, top, right, bottom = x - h, y - h, x + h, y + h
    fill = COLOURS[scene.colour]
    if scene.shape == "circle":
        draw.ellipse((left, top, right, bottom), fill=fill)
    elif scene.shape == "square":
        draw.rectangle((left, top, right, bottom), fill=fill)
    elif scene.shape == "triangle":
        draw.polygon([(x, top), (right, bottom), (left, bottom)], fill=fill)
    else:
        raise ValueError(f"unknown shape {scene.shape!r}; known: {', '.join(SHAPES)}")
    img = img.resize((resolution, resolution), Image.BOX)
    return np.asarray(img, dtype=np.uint8)


def caption(scene: Scene, rng: np.random.Generator | None = None) -> str:
    """A training caption for the scene: the full grammar, or (with `rng`) sometimes a partial one."""
    if rng is None:
        return full_caption(scene.shape, scene.colour, scene.background)
    forms, probs = zip(*CAPTION_FORMS)
    form = forms[rng.choice(len(forms), p=np.asarray(probs) / sum(probs))]
    return form.format(
        a_c=article(scene.colour, rng), c=scene.colour, s=scene.shape,
        a_b=article(scene.background, rng), b=scene.background,
    )


def batch(rng: np.random.Generator, n: int, resolution: int = RESOLUTION) -> tuple[np.ndarray, list[str], list[Scene]]:
    """`n` random images (n, H, W, 3) uint8 with their training captions and scenes."""
    scenes = [sample_scene(rng, resolution) for _ in range(n)]
    images = np.stack([render(s, resolution) for s in scenes])
    return images, [caption(s, rng) for s in scenes], scenes


def all_prompts() -> list[tuple[str, str, str]]:
    """Every (shape, colour, background) of the grammar: 3 x 8 x 7 = 168 combinations."""
    return [(s, c, b) for b in COLOURS for c in COLOURS if c != b for s in SHAPES]


if __name__ == "__main__":  # write a small grid of samples to look at
    import sys

    out = sys.argv[1] if len(sys.argv) > 1 else "data_samples.png"
    imgs, caps, _ = batch(np.random.default_rng(0), 16)
    grid = imgs.reshape(4, 4, RESOLUTION, RESOLUTION, 3).transpose(0, 2, 1, 3, 4).reshape(4 * RESOLUTION, 4 * RESOLUTION, 3)
    Image.fromarray(grid).resize((512, 512), Image.NEAREST).save(out)
    print("\n".join(caps))
