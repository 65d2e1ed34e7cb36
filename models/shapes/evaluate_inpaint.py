"""Inpainting with the shapes model: recolour the shape of a generated image, and check the result by its pixels.

The bundled model is an ordinary text-to-image model (4 input channels), so leansd inpaints with it as diffusers'
StableDiffusionInpaintPipeline does for such models: the image, noised to each step's level, is put back outside
the mask after every step. For each case:

1. draw "a {colour} {shape} on a {background} background" (the card's 20 steps, guidance 7.5);
2. the mask: the bounding box of the shape (the largest region not of the background colour, as the evaluator
   finds it), grown by `MARGIN` pixels (one latent cell: the anti-aliased edge is inside it);
3. inpaint "a {new colour} {shape} on a {background} background" in that mask (strength 1, diffusers' default);
4. right when: the evaluator reads the new colour as the shape's and the old background as the background; at
   least `MIN_BACKGROUND_OUTSIDE` of the pixels outside the mask are the background colour; and inside the mask
   the new colour is the most frequent colour other than the background.

A case whose first image is already wrong (background, colour or shape) is skipped and counted apart. Seeds come
from the evaluator's held-out range (`evaluate.SEED_BASE`, never used in training), at an offset of 900,000 that
no other evaluation uses.

    python models/shapes/evaluate_inpaint.py --backend onnxruntime          # the 168 grammar prompts, 1 seed each
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import data  # noqa: E402
import evaluate  # noqa: E402

SEED_OFFSET = 900_000  # past the grammar (0..), partial (500,000..) and negative (700,000..) seeds
MARGIN = 4  # pixels around the shape's bounding box
MIN_BACKGROUND_OUTSIDE = 0.9


def cases(seeds_per_prompt: int = 1, seed_base: int = evaluate.SEED_BASE) -> list[dict]:
    """Every full-grammar prompt, each with a new colour (neither its colour nor its background; the 6 candidates
    taken in turn) and `seeds_per_prompt` fresh seeds."""
    out = []
    for i, (shape, colour, background) in enumerate(data.all_prompts()):
        candidates = [c for c in data.COLOURS if c not in (colour, background)]
        for k in range(seeds_per_prompt):
            out.append({"shape": shape, "colour": colour, "background": background,
                        "new": candidates[(i + k) % len(candidates)], "seed": seed_base + SEED_OFFSET + i * 1000 + k})
    return out


def shape_mask(image: np.ndarray, background: str, margin: int = MARGIN) -> np.ndarray:
    """HxW float mask (1 = repaint): the bounding box of the largest region not of `background`, grown by `margin`."""
    labels = evaluate.nearest_palette(image)
    ys, xs = np.nonzero(evaluate.largest_region(labels != evaluate.PALETTE_NAMES.index(background)))
    h, w = labels.shape
    mask = np.zeros((h, w), np.float32)
    mask[max(0, ys.min() - margin) : ys.max() + 1 + margin, max(0, xs.min() - margin) : xs.max() + 1 + margin] = 1.0
    return mask


def judge(image: np.ndarray, mask: np.ndarray, case: dict) -> dict:
    """What the evaluator and the pixels see in an inpainted image, and whether that is right (see the docstring)."""
    names = evaluate.PALETTE_NAMES
    labels, inside = evaluate.nearest_palette(image), mask > 0.5
    got = evaluate.classify(image)
    outside_bg = float((labels[~inside] == names.index(case["background"])).mean()) if (~inside).any() else 1.0
    counts = Counter(labels[inside].tolist())
    counts.pop(names.index(case["background"]), None)
    top = names[counts.most_common(1)[0][0]] if counts else "none"
    right = (got["background"] == case["background"] and got["colour"] == case["new"] and outside_bg >= MIN_BACKGROUND_OUTSIDE
             and top == case["new"])
    share = {name: round(float((labels[inside] == names.index(name)).mean()), 3) for name in (case["new"], case["colour"])}
    return {"right": right, "evaluator": {k: got[k] for k in evaluate.ATTRIBUTES}, "background_outside": round(outside_bg, 3),
            "top_colour_inside": top, "share_inside": share, "same_shape": got["shape"] == case["shape"]}


def run_case(pipe, case: dict, **settings) -> tuple[dict, np.ndarray | None, np.ndarray | None]:
    """(result row, first image, inpainted image); the images are None when the first image is wrong."""
    prompt = data.full_caption(case["shape"], case["colour"], case["background"])
    first = evaluate.to_uint8(pipe(prompt, seed=case["seed"], output_type="np", **settings).images[0])
    got = evaluate.classify(first)
    if (got["shape"], got["colour"], got["background"]) != (case["shape"], case["colour"], case["background"]):
        return {**case, "skipped": "first image wrong", "first": {k: got[k] for k in evaluate.ATTRIBUTES}}, None, None
    mask = shape_mask(first, case["background"])
    new_prompt = data.full_caption(case["shape"], case["new"], case["background"])
    out = pipe(new_prompt, image=first, mask_image=mask, seed=case["seed"], output_type="np", **settings)
    image = evaluate.to_uint8(out.images[0])
    return {**case, **judge(image, mask, case)}, first, image


def summary(rows: list[dict]) -> dict:
    judged = [r for r in rows if "skipped" not in r]
    right = sum(r["right"] for r in judged)
    per_new: dict[str, list[int]] = {}
    for r in judged:
        per_new.setdefault(r["new"], [0, 0])
        per_new[r["new"]][0] += r["right"]
        per_new[r["new"]][1] += 1
    return {"cases": len(rows), "skipped_first_image_wrong": len(rows) - len(judged), "judged": len(judged), "right": right,
            "accuracy": round(right / max(1, len(judged)), 4), "same_shape": sum(r["same_shape"] for r in judged),
            "evaluator_right": sum(r["evaluator"]["background"] == r["background"] and r["evaluator"]["colour"] == r["new"] for r in judged),
            "per_new_colour": {k: {"right": a, "n": n} for k, (a, n) in sorted(per_new.items())}}


def markdown(result: dict, rows: list[dict], title: str) -> str:
    """The summary as the card's tables are written, with every wrong or skipped case on a line."""
    lines = [f"### {title}", "", "| | count |", "|---|---:|", f"| cases | {result['cases']} |",
             f"| skipped: first image wrong | {result['skipped_first_image_wrong']} |",
             f"| right (evaluator and pixels) | {result['right']} of {result['judged']} ({100 * result['accuracy']:.1f} %) |",
             f"| evaluator alone right (background, new colour) | {result['evaluator_right']} of {result['judged']} |",
             f"| shape kind kept | {result['same_shape']} of {result['judged']} |", "",
             "Per new colour (right / judged): " + ", ".join(f"{k} {v['right']}/{v['n']}" for k, v in result["per_new_colour"].items()),
             ""]
    lines += [f"- {'skipped' if 'skipped' in r else 'wrong'}: {json.dumps(r)}" for r in rows if "skipped" in r or not r["right"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    p.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "openvino"])
    p.add_argument("--seeds-per-prompt", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="folder for results.md and a grid of (first, inpainted) pairs")
    args = p.parse_args(argv)
    import leansd

    pipe = leansd.load(args.model, backend=args.backend)
    rows, pairs, start = [], [], time.time()
    for case in cases(args.seeds_per_prompt):
        row, first, image = run_case(pipe, case)
        rows.append(row)
        if first is not None and len(pairs) < 48:
            pairs += [first, image]
    result = summary(rows)
    result["seconds_per_case"] = round((time.time() - start) / max(1, len(rows)), 3)
    table = markdown(result, rows, f"leansd {args.backend} fp32, inpainting, {args.seeds_per_prompt} seed(s) per prompt")
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.md").write_text(table)
        evaluate.save_grid(pairs, args.out / "pairs.png", cols=12)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
