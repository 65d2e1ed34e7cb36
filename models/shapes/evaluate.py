"""Measure whether a text-to-image model draws what the prompt says, for the shapes grammar.

For every (shape, shape colour, background colour) of the grammar and a few seeds, an image is made from
the full caption ("a red circle on a blue background") and classified from its pixels:

* background colour: the palette colour most border pixels are nearest to;
* shape: the largest 4-connected region of pixels whose nearest palette colour is not the background;
* shape colour: the palette colour most of that region's pixels are nearest to;
* shape kind: from the region's fill ratio of its bounding box (square ~1, circle ~pi/4, triangle ~1/2),
  how full the four corner cells (1/4 x 1/4) of the bounding box are (square ~1, circle ~0.3), and
  whether it narrows upwards (triangles point up).

The image source is pluggable: anything with `generate(prompt, seed) -> HxWx3 uint8`. `--backend
diffusers` runs diffusers' StableDiffusionPipeline on the saved folder; `--backend onnxruntime|openvino`
runs leansd's runtime (`leansd.load(model_dir, backend=...)`) on an exported folder.

    python models/shapes/evaluate.py --validate            # the classifier on ground-truth images
    python models/shapes/evaluate.py --model models/shapes/weights --out models/shapes/eval
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter, deque
from pathlib import Path
from typing import Protocol

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import data  # noqa: E402

PALETTE_NAMES = list(data.COLOURS)
PALETTE = np.array([data.COLOURS[n] for n in PALETTE_NAMES], dtype=np.float32)

MIN_REGION = 30  # pixels; smaller regions do not count as a shape
SEED_BASE = 1_000_000  # evaluation seeds start here; training never draws latents from such seeds


# ----------------------------------------------------------------------------------------------------
# Classifier


def nearest_palette(img: np.ndarray) -> np.ndarray:
    """Index of the nearest palette colour (sRGB Euclidean) for every pixel: HxW int."""
    d = ((img.astype(np.float32)[..., None, :] - PALETTE) ** 2).sum(-1)
    return d.argmin(-1)


def largest_region(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask, as a boolean mask (all False if none)."""
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int32)
    best, best_size, current = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        current += 1
        labels[y0, x0] = current
        size, queue = 0, deque([(y0, x0)])
        while queue:
            y, x = queue.popleft()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = current
                    queue.append((ny, nx))
        if size > best_size:
            best, best_size = current, size
    return labels == best if best else np.zeros_like(mask)


def shape_kind(region: np.ndarray) -> tuple[str, dict[str, float]]:
    """'circle', 'square', 'triangle' or 'other' for a boolean region, with the features used."""
    ys, xs = np.nonzero(region)
    if len(ys) < MIN_REGION:
        return "none", {"area": float(len(ys))}
    box = region[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]
    bh, bw = box.shape
    fill = float(box.mean())
    widths = box.sum(1).astype(np.float32)
    q = max(1, bh // 4)
    taper = float(widths[:q].mean() / max(widths[-q:].mean(), 1.0))  # top width / bottom width
    ch, cw = max(1, bh // 4), max(1, bw // 4)
    corners = float(np.mean([box[:ch, :cw].mean(), box[:ch, -cw:].mean(), box[-ch:, :cw].mean(), box[-ch:, -cw:].mean()]))
    feats = {"area": float(len(ys)), "fill": fill, "taper": taper, "corners": corners, "aspect": bw / bh}
    if taper < 0.6 and fill < 0.75:  # narrow top, wide bottom, about half the box
        kind = "triangle"
    elif corners > 0.65:  # a square's corner cells are full even when its corners are a little rounded
        kind = "square"
    elif fill > 0.6 and 0.6 <= taper <= 1 / 0.6:
        kind = "circle"
    else:
        kind = "other"
    return kind, feats


def classify(img: np.ndarray) -> dict:
    """Background colour, shape colour and shape kind read from an HxWx3 uint8 image."""
    labels = nearest_palette(img)
    border = np.concatenate([labels[:2].ravel(), labels[-2:].ravel(), labels[:, :2].ravel(), labels[:, -2:].ravel()])
    bg = Counter(border.tolist()).most_common(1)[0][0]
    region = largest_region(labels != bg)
    kind, feats = shape_kind(region)
    colour = Counter(labels[region].tolist()).most_common(1)[0][0] if region.any() else None
    return {
        "background": PALETTE_NAMES[bg],
        "colour": PALETTE_NAMES[colour] if colour is not None else "none",
        "shape": kind,
        **{k: round(v, 3) for k, v in feats.items()},
    }


# ----------------------------------------------------------------------------------------------------
# Image sources


class Generator(Protocol):
    def __call__(self, prompt: str, seed: int, negative_prompt: str | None = None) -> np.ndarray: ...


def to_uint8(image) -> np.ndarray:
    """A pipeline's image (float in [0, 1], uint8 or PIL) as HxWx3 uint8, rounded as diffusers does."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0.0, 1.0) * 255).round().astype(np.uint8)
    return arr


def diffusers_generator(model_dir: str, steps: int, guidance: float, threads: int = 1) -> Generator:
    import torch
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(threads)
    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)

    def generate(prompt: str, seed: int, negative_prompt: str | None = None) -> np.ndarray:
        out = pipe(
            prompt, negative_prompt=negative_prompt, num_inference_steps=steps, guidance_scale=guidance,
            generator=torch.Generator("cpu").manual_seed(seed), output_type="np",
        )
        return to_uint8(out.images[0])

    return generate


def leansd_generator(model_dir: str | None, backend: str, steps: int, guidance: float, precision: str = "fp32",
                     deep_cache: int | None = None, scheduler: str | None = None, guidance_cutoff: float = 1.0,
                     token_merging: bool = False) -> Generator:
    """leansd's runtime on an exported model folder (`leansd.load(model_dir, backend=...)`; None: the bundled model)."""
    import leansd

    pipe = leansd.load(model_dir, backend=backend, precision=precision, deep_cache=deep_cache, guidance_cutoff=guidance_cutoff,
                       token_merging=token_merging or None)

    def generate(prompt: str, seed: int, negative_prompt: str | None = None) -> np.ndarray:
        kwargs = {"negative_prompt": negative_prompt} if negative_prompt else {}
        out = pipe(prompt, seed=seed, num_inference_steps=steps, guidance_scale=guidance, output_type="np",
                   scheduler=scheduler, **kwargs)
        return to_uint8(out.images[0])

    return generate


def make_generator(backend: str, model_dir: str | None, steps: int, guidance: float, threads: int = 1, **leansd_options) -> Generator:
    if backend == "diffusers":
        leansd_defaults = {"precision": "fp32", "deep_cache": None, "scheduler": None, "guidance_cutoff": 1.0, "token_merging": False}
        if any(leansd_options.get(k, default) != default for k, default in leansd_defaults.items()):
            raise SystemExit("--precision, --deep-cache, --guidance-cutoff, --token-merging and --scheduler apply to the leansd "
                             "backends only")
        return diffusers_generator(model_dir or str(Path(__file__).resolve().parent / "weights"), steps, guidance, threads)
    if backend in ("onnxruntime", "openvino"):
        return leansd_generator(model_dir, backend, steps, guidance, **leansd_options)
    raise ValueError(f"unknown backend {backend!r}; known: diffusers, onnxruntime, openvino")


def ground_truth_generator() -> Generator:
    """Images drawn by `data.py` for a full-grammar prompt: the classifier's own check (should be ~100%)."""

    def generate(prompt: str, seed: int, negative_prompt: str | None = None) -> np.ndarray:
        words = prompt.split()
        colour, shape, background = words[1], words[2], words[5]
        scene = data.sample_scene(np.random.default_rng(seed), shape=shape, colour=colour, background=background)
        return data.render(scene)

    return generate


# ----------------------------------------------------------------------------------------------------
# Evaluation

ATTRIBUTES = ("background", "colour", "shape")


def grammar_cases(seeds_per_prompt: int, seed_base: int) -> list[dict]:
    """Every full-grammar prompt (168) x `seeds_per_prompt` seeds; all three attributes are checked."""
    return [
        {"prompt": data.full_caption(s, c, b), "negative_prompt": None, "seed": seed_base + i * 1000 + k,
         "want": {"shape": s, "colour": c, "background": b}}
        for i, (s, c, b) in enumerate(data.all_prompts())
        for k in range(seeds_per_prompt)
    ]


def partial_cases(seeds_per_prompt: int, seed_base: int) -> list[dict]:
    """Prompts that name two attributes ("a red circle", "a circle on a blue background"): 48 prompts."""
    cases = []
    for i, s in enumerate(data.SHAPES):
        for j, c in enumerate(data.COLOURS):
            for k in range(seeds_per_prompt):
                seed = seed_base + 500_000 + (i * 8 + j) * 1000 + k
                cases.append({"prompt": f"{data.article(c)} {c} {s}", "negative_prompt": None, "seed": seed,
                              "want": {"shape": s, "colour": c}})
                cases.append({"prompt": f"a {s} on {data.article(c)} {c} background", "negative_prompt": None,
                              "seed": seed + 100, "want": {"shape": s, "background": c}})
    return cases


def negative_cases(seeds_per_prompt: int, seed_base: int) -> list[dict]:
    """"a {shape} on a {background} background" with and without the negative prompt "{colour}".

    The same seeds are used with and without, for every colour other than the background, so the rate
    at which the shape comes out in the unwanted colour can be compared directly.
    """
    cases = []
    for i, s in enumerate(data.SHAPES):
        for j, b in enumerate(data.COLOURS):
            for k in range(seeds_per_prompt):
                seed = seed_base + 700_000 + (i * 8 + j) * 1000 + k
                prompt = f"a {s} on {data.article(b)} {b} background"
                want = {"shape": s, "background": b}
                cases.append({"prompt": prompt, "negative_prompt": None, "seed": seed, "want": want})
                for c in data.COLOURS:
                    if c != b:
                        cases.append({"prompt": prompt, "negative_prompt": c, "seed": seed, "want": want})
    return cases


def psnr_against(images: np.ndarray, reference_npz: Path) -> dict:
    """PSNR (dB, 8-bit peak) of each image against the same case's image in an earlier run's --save-images file."""
    reference = np.load(reference_npz)["images"]
    if reference.shape != images.shape:
        raise SystemExit(f"{reference_npz} holds images of shape {reference.shape}, this run {images.shape}: not the same cases")
    mse = ((images.astype(np.float64) - reference.astype(np.float64)) ** 2).reshape(len(images), -1).mean(axis=1)
    psnr = 10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))
    return {"median_db": round(float(np.median(psnr)), 2), "min_db": round(float(psnr.min()), 2), "n": len(psnr)}


def run_cases(generate: Generator, cases: list[dict], progress: bool = True,
              keep_images: int = 0) -> tuple[list[dict], list[np.ndarray], float]:
    from tqdm import tqdm

    rows, images = [], []
    t0 = time.time()
    for case in tqdm(cases, disable=not progress, desc="evaluate", unit="img", mininterval=5):
        img = generate(case["prompt"], case["seed"], negative_prompt=case["negative_prompt"])
        rows.append({**case, "got": classify(img)})
        if len(images) < keep_images:
            images.append(img)
    return rows, images, (time.time() - t0) / max(1, len(cases))


def summarize(rows: list[dict]) -> dict:
    """Accuracy per checked attribute (with per-value counts) and for all checked attributes at once."""
    out = {"n": len(rows), "attributes": {}}
    for attr in ATTRIBUTES:
        checked = [r for r in rows if attr in r["want"]]
        if not checked:
            continue
        per_value: dict[str, list[int]] = {}
        for r in checked:
            c = per_value.setdefault(r["want"][attr], [0, 0])
            c[0] += r["got"][attr] == r["want"][attr]
            c[1] += 1
        ok = sum(a for a, _ in per_value.values())
        out["attributes"][attr] = {
            "correct": ok, "n": len(checked), "accuracy": round(ok / len(checked), 4),
            "per_value": {k: {"correct": a, "n": b} for k, (a, b) in per_value.items()},
        }
    ok = sum(all(r["got"][a] == v for a, v in r["want"].items()) for r in rows)
    out["all_checked"] = {"correct": ok, "n": len(rows), "accuracy": round(ok / max(1, len(rows)), 4)}
    return out


def summarize_negative(rows: list[dict]) -> dict:
    """How often the shape has colour X without a negative prompt, and with the negative prompt "X"."""
    base = {(r["prompt"], r["seed"]): r["got"]["colour"] for r in rows if r["negative_prompt"] is None}
    neg = [r for r in rows if r["negative_prompt"] is not None]
    hit_with = sum(r["got"]["colour"] == r["negative_prompt"] for r in neg)
    hit_without = sum(base[(r["prompt"], r["seed"])] == r["negative_prompt"] for r in neg)
    return {
        "pairs": len(neg),
        "shape_in_negative_colour_without_negative": {"count": hit_without, "rate": round(hit_without / len(neg), 4)},
        "shape_in_negative_colour_with_negative": {"count": hit_with, "rate": round(hit_with / len(neg), 4)},
        "with_negative": summarize(neg),
    }


LABELS = {"background": "background colour", "colour": "shape colour", "shape": "shape kind"}


def markdown(summary: dict, title: str) -> str:
    lines = [f"### {title}", "", "| attribute | correct | n | accuracy |", "|---|---:|---:|---:|"]
    for attr, label in LABELS.items():
        if attr in summary["attributes"]:
            a = summary["attributes"][attr]
            lines.append(f"| {label} | {a['correct']} | {a['n']} | {100 * a['accuracy']:.1f} % |")
    a = summary["all_checked"]
    lines.append(f"| all checked attributes | {a['correct']} | {a['n']} | {100 * a['accuracy']:.1f} % |")
    lines += ["", "Per value (correct / n):", ""]
    for attr, label in LABELS.items():
        if attr in summary["attributes"]:
            pv = summary["attributes"][attr]["per_value"]
            lines.append(f"- {label}: " + ", ".join(f"{k} {v['correct']}/{v['n']}" for k, v in pv.items()))
    return "\n".join(lines) + "\n"


def markdown_negative(neg: dict, title: str) -> str:
    a, b = neg["shape_in_negative_colour_without_negative"], neg["shape_in_negative_colour_with_negative"]
    lines = [
        f"### {title}", "",
        f"Shape drawn in colour X, over {neg['pairs']} (prompt, seed, X) triples:", "",
        "| | count | rate |", "|---|---:|---:|",
        f"| without a negative prompt | {a['count']} | {100 * a['rate']:.1f} % |",
        f"| with negative prompt \"X\" | {b['count']} | {100 * b['rate']:.1f} % |", "",
    ]
    return "\n".join(lines) + "\n" + markdown(neg["with_negative"], "Prompted attributes, with the negative prompt")


def save_grid(images: list[np.ndarray], path: Path, cols: int = 12) -> None:
    from PIL import Image

    if not images:
        return
    h, w, _ = images[0].shape
    rows = -(-len(images) // cols)
    grid = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = img
    Image.fromarray(grid).save(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None,
                   help="model folder (default: models/shapes/weights for diffusers, the bundled export for leansd)")
    p.add_argument("--backend", default="diffusers", choices=["diffusers", "onnxruntime", "openvino"])
    p.add_argument("--validate", action="store_true", help="score the classifier on ground-truth images from data.py")
    p.add_argument("--mode", default="grammar", choices=["grammar", "partial", "negative"],
                   help="grammar: every full caption (168 prompts); partial: two-attribute prompts (48); "
                        "negative: negative prompts naming a colour (24 prompts x 8)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--precision", default="fp32", help="leansd backends: fp32 or int8")
    p.add_argument("--deep-cache", type=int, default=None, metavar="N", help="leansd backends: refresh deep UNet features every N steps")
    p.add_argument("--guidance-cutoff", type=float, default=1.0, metavar="F",
                   help="leansd backends: stop guidance after this fraction of the steps (1 = never)")
    p.add_argument("--scheduler", default=None, help="leansd backends: sampler (default: the model's)")
    p.add_argument("--token-merging", action="store_true",
                   help="leansd backends: the token-merged UNet graphs (a folder exported with sd-export --token-merging)")
    p.add_argument("--seeds-per-prompt", type=int, default=2)
    p.add_argument("--seed-base", type=int, default=SEED_BASE)
    p.add_argument("--threads", type=int, default=1, help="torch threads for the diffusers backend")
    p.add_argument("--out", default=None, help="folder for results.json, results.md and a sample grid")
    p.add_argument("--save-images", type=Path, default=None, metavar="NPZ",
                   help="also write every generated image (uint8) to this .npz, for --psnr-against")
    p.add_argument("--psnr-against", type=Path, default=None, metavar="NPZ",
                   help="images of another run of the same cases (--save-images): report how far this run's images are "
                   "from them (PSNR per image, in dB), e.g. a fast mode against exact fp32")
    args = p.parse_args(argv)

    if args.validate:
        if args.mode != "grammar":
            p.error("--validate checks the full grammar only")
        generate, title = ground_truth_generator(), "Classifier on ground-truth images from data.py"
    else:
        generate = make_generator(args.backend, args.model, args.steps, args.guidance, args.threads,
                                  precision=args.precision, deep_cache=args.deep_cache, scheduler=args.scheduler,
                                  guidance_cutoff=args.guidance_cutoff, token_merging=args.token_merging)
        variant = "" if args.backend == "diffusers" else f" {args.precision}"
        variant += f", deep cache every {args.deep_cache} steps" if args.deep_cache and args.deep_cache > 1 else ""
        variant += f", guidance stops after {args.guidance_cutoff:g} of the steps" if args.guidance_cutoff < 1 else ""
        variant += f", {args.scheduler}" if args.scheduler else ""
        variant += ", token merging" if args.token_merging else ""
        title = f"{args.backend}{variant}, {args.steps} steps, guidance {args.guidance}, {args.mode} prompts"
    cases = {"grammar": grammar_cases, "partial": partial_cases, "negative": negative_cases}[args.mode](
        args.seeds_per_prompt, args.seed_base)
    keep = len(cases) if args.save_images or args.psnr_against else 168 * args.seeds_per_prompt
    rows, images, per_image = run_cases(generate, cases, keep_images=keep)
    if args.mode == "negative":
        summary = summarize_negative(rows)
        table = markdown_negative(summary, title)
    else:
        summary = summarize(rows)
        table = markdown(summary, title)
    summary.update({
        "mode": args.mode, "backend": None if args.validate else args.backend, "validate": args.validate,
        "model": None if args.validate else args.model, "steps": args.steps, "guidance_scale": args.guidance,
        "precision": args.precision, "deep_cache": args.deep_cache, "scheduler": args.scheduler,
        "guidance_cutoff": args.guidance_cutoff, "token_merging": args.token_merging,
        "seeds_per_prompt": args.seeds_per_prompt, "seed_base": args.seed_base, "seconds_per_image": round(per_image, 4),
    })
    if args.save_images:
        np.savez_compressed(args.save_images, images=np.stack(images))
    if args.psnr_against:
        summary["psnr_against"] = psnr_against(np.stack(images), args.psnr_against)
        table += (f"\nImages against {args.psnr_against.name} (same prompts and seeds): PSNR median "
                  f"{summary['psnr_against']['median_db']} dB, lowest {summary['psnr_against']['min_db']} dB\n")
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({"summary": summary, "rows": rows}, indent=1) + "\n")
        (out / "results.md").write_text(table)
        save_grid(images[:: max(1, args.seeds_per_prompt)][:168], out / "samples.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
