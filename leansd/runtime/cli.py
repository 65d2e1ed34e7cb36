"""`sd-run`: generate images from the command line.

    parse_args (typed options; the CompVis/Stability script flags as aliases)
    -> plan_outputs (every file's path; folders checked writable before any work) -> check_preview
    -> generate (one pipeline call per --n_iter iteration, seed + k) -> write_outputs (atomic, all or nothing)
"""
from __future__ import annotations

import argparse
import logging
import math
import secrets
import shlex
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from leansd.runtime.errors import LeanSDError
from leansd.runtime.outputs import check_preview, plan_outputs, say_path, write_outputs, writing
from leansd.runtime.run_progress import RunProgress

if TYPE_CHECKING:
    from PIL import Image

    from leansd.runtime.pipeline import Pipeline, PipelineOutput

MAX_SEED = 2**64 - 1
# Flags of the CompVis/Stability scripts/txt2img.py and img2img.py. Any of them but --prompt, without -o, writes
# what those scripts write: OUTDIR/samples/00000.png ... and OUTDIR/grid-0000.png.
SCRIPT_FLAGS = frozenset({"--prompt", "--ckpt", "--outdir", "--plms", "--dpm", "--ddim_steps", "--ddim_eta", "--scale",
                          "--n_samples", "--n_iter", "--H", "--W", "--skip_grid", "--init-img"})
CHECKPOINT_SUFFIXES = (".ckpt", ".safetensors", ".pt", ".pth", ".bin")


# ---------------------------------------------------------------- parsing


def whole(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"must be a whole number >= {minimum}, got {text!r}")
        return value
    return parse


def number(low: float, high: float = math.inf, low_open: bool = False, hint: str = "") -> Callable[[str], float]:
    """A finite number in [low, high] ((low, high] when low_open)."""
    where = f"{'(' if low_open else '['}{low:g}, {high:g}]" if high < math.inf else f"{'>' if low_open else '>='} {low:g}"
    kind = "a number in " if high < math.inf else "a number "

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and (value > low if low_open else value >= low) and value <= high):
            raise argparse.ArgumentTypeError(f"must be {kind}{where}{hint}, got {text!r}")
        return value
    return parse


def seed_value(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        value = None
    if value is None or not (value == -1 or 0 <= value <= MAX_SEED):
        raise argparse.ArgumentTypeError(f"must be a whole number from 0 to {MAX_SEED} (2**64-1), or -1 for a random seed, got {text!r}")
    return value


def lora_option(text: str) -> tuple[str, float]:
    """FILE or FILE:SCALE (the last colon separates the scale, so paths with colons still work)."""
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            value = float(tail)
        except ValueError:
            return text, 1.0
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"the scale of {head!r} must be a finite number, got {tail!r}")
        return head, value
    return text, 1.0


def prompt_text(text: str) -> str:
    """A prompt as the shell gave it; bytes that were not valid text in the locale's encoding are refused."""
    bad = next((i for i, c in enumerate(text) if "\udc80" <= c <= "\udcff"), None)
    if bad is not None:
        raise argparse.ArgumentTypeError(
            f"is not valid {sys.getfilesystemencoding().upper()} text (byte 0x{ord(text[bad]) - 0xDC00:02x} at character {bad + 1}); "
            "pass the text as UTF-8 (check the terminal's or file's encoding)")
    return text


class ScriptFlag(argparse.Action):
    """Stores a value (or `const` for a flag without one) and notes which of the scripts' flags was used."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)
        if option_string in SCRIPT_FLAGS:
            namespace.script_flags = (*namespace.script_flags, option_string)


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line, as every other error of sd-run (argparse would print the usage first)."""
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="sd-run", description="Generate images with Stable Diffusion, without PyTorch. "
               "The flags of the CompVis/Stability scripts/txt2img.py and img2img.py are accepted too (see README).")
    p.set_defaults(script_flags=())
    add_prompt_options(p)
    add_output_options(p)
    add_runtime_options(p)
    return p


def add_prompt_options(p: argparse.ArgumentParser) -> None:
    flag = {"action": ScriptFlag}
    p.add_argument("prompt", nargs="?", type=prompt_text, default=None,
                   help="what to draw: any length, with AUTOMATIC1111's (word), (word:1.3), [word] weights and BREAK")
    p.add_argument("--prompt", dest="prompt_flag", type=prompt_text, default=None, **flag, help="the prompt, as the scripts take it")
    p.add_argument("--negative-prompt", type=prompt_text, default=None, help="what not to draw (same syntax)")
    p.add_argument("--steps", "--ddim_steps", type=whole(1), default=None, **flag, help="denoising steps (default: the model's recommendation, else 50)")
    p.add_argument("--guidance", "--scale", type=number(0, hint=" (0 or 1 turn guidance off)"), default=None, **flag,
                   help="classifier-free guidance scale; it applies when > 1")
    p.add_argument("--scheduler", default=None, help="ddim, pndm/plms, euler, euler_a, dpm++2m, dpm++2m_karras, lms, lcm or a diffusers class name")
    p.add_argument("--plms", dest="scheduler", nargs=0, const="plms", **flag, help="the PLMS sampler (--scheduler plms)")
    p.add_argument("--dpm", dest="scheduler", nargs=0, const="dpm++2m", **flag, help="DPM-Solver++ 2M (--scheduler dpm++2m)")
    p.add_argument("--clip-skip", type=whole(0), default=0, metavar="N",
                   help="use the text encoder's hidden states N layers before the last (diffusers' clip_skip; 0 = off). "
                   "AUTOMATIC1111 counts one more: its 'Clip skip: 2' is --clip-skip 1")
    p.add_argument("--eta", "--ddim_eta", type=number(0), default=0.0, **flag, help="DDIM's eta: fresh noise per step (ddim only; 0 = deterministic)")
    p.add_argument("--seed", type=seed_value, default=None,
                   help="0 to 2**64-1; the same seed gives the same image as diffusers with torch.Generator('cpu'); -1 or none: random")
    p.add_argument("-n", "--num-images", "--n_samples", type=whole(1), default=1, **flag, help="images per prompt (one batch)")
    p.add_argument("--n_iter", type=whole(1), default=1, **flag, help="repeat the batch this many times; iteration k uses seed + k")
    p.add_argument("--width", "--W", type=whole(1), default=None, **flag)
    p.add_argument("--height", "--H", type=whole(1), default=None, **flag)
    p.add_argument("--init-image", "--init-img", type=Path, default=None, **flag,
                   help="start from this image (image-to-image); with the x4 upscaler, the image to upscale")
    p.add_argument("--mask", type=Path, default=None, metavar="PNG",
                   help="inpaint: repaint the white part of this mask in --init-image (or, in an image with transparency, "
                   "its transparent part: the init image itself can be the mask); resized to the output size")
    p.add_argument("--depth-map", type=Path, default=None, metavar="FILE",
                   help="depth-to-image models: the depth of --init-image, a greyscale image (16-bit PNG ok) or a .npy array, "
                   "larger values nearer; resized to the output size")
    p.add_argument("--save-depth-map", type=Path, default=None, metavar="PNG",
                   help="depth-to-image models: also write the depth map used (the estimator's, or --depth-map's) as a 16-bit "
                   "greyscale PNG, scaled to its full range, larger values nearer")
    p.add_argument("--strength", type=number(0, 1, low_open=True), default=None,
                   help="how much to change the init image, in (0, 1] (default 0.8; 1 with --mask)")
    p.add_argument("--noise-level", type=whole(0), default=None,
                   help="x4 upscaler: how much noise is added to --init-image before upscaling (default 20); more invents more detail")


def add_output_options(p: argparse.ArgumentParser) -> None:
    flag = {"action": ScriptFlag}
    p.add_argument("-o", "--output", type=Path, default=None, help="PNG file, or a folder for several images (default: ./leansd-SEED.png)")
    p.add_argument("--outdir", type=Path, default=None, **flag,
                   help="as the scripts: OUTDIR/samples/00000.png, ... and a grid OUTDIR/grid-0000.png")
    p.add_argument("--grid", action="store_true", help="also write the images tiled in one PNG (n_iter rows x n_samples columns)")
    p.add_argument("--skip_grid", nargs=0, const=True, default=False, **flag, help="no grid with the scripts' layout")
    p.add_argument("--preview", type=Path, default=None, metavar="PNG",
                   help="after every step, write the current estimate of the (first) image to this PNG, replaced in place "
                   "(with the tiny VAE decoder when the folder has one)")
    p.add_argument("--watermark", nargs="?", const="StableDiffusionV1", default=None, metavar="TEXT",
                   help="mark the images invisibly as the SD scripts do (default text: StableDiffusionV1; SD 2's is SDV2)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files (and an existing --preview file)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def add_runtime_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, default=None, help="model folder written by sd-export (default: the bundled model)")
    p.add_argument("--ckpt", type=Path, default=None, action=ScriptFlag, help="a model folder; a .ckpt/.safetensors file must be converted with sd-export first")
    p.add_argument("--backend", default=None, help="onnxruntime or openvino (default: what is installed)")
    p.add_argument("--device", default="cpu", help="cpu, auto, or a backend device such as cuda, dml, gpu")
    p.add_argument("--precision", default="fp32",
                   help="fp32 (exact, default), int8 when the folder has it, bf16 (OpenVINO on CPUs with native bfloat16), "
                        "or auto: the fastest of these this CPU runs well and the export measured within its quality gate")
    p.add_argument("--cache-dir", type=Path, default=None, metavar="DIR",
                   help="keep optimized/compiled models here so later runs start faster (about one copy of each model file)")
    p.add_argument("--threads", type=whole(1), default=None, help="intra-op threads (default: the backend's choice)")
    p.add_argument("--low-memory", action="store_true", help="load each model only while it is needed; on onnxruntime, stream the weights of the UNet and of SDXL's second text encoder part by part when the export has parts (sd-export writes them for models over 2 GB)")
    p.add_argument("--no-memory-check", dest="memory_check", action="store_false",
                   help="generate even when the memory estimate says the machine has too little available")
    p.add_argument("--tiled-vae", action="store_true", default=None,
                   help="decode images larger than the VAE's native size tile by tile (on with --low-memory)")
    p.add_argument("--deep-cache", type=whole(1), default=None, metavar="N",
                   help="reuse the UNet's deep features for N-1 of every N steps (needs a folder exported with sd-export --deep-cache)")
    p.add_argument("--guidance-cutoff", type=number(0, 1), default=1.0, metavar="F",
                   help="stop classifier-free guidance after this fraction of the steps (e.g. 0.3): later steps cost half; "
                   "1 (default) guides every step. With --deep-cache, features are then reused on the unguided steps only")
    p.add_argument("--safety-checker", action=argparse.BooleanOptionalAction, default=None,
                   help="run the model's safety checker (flagged images are written black, with a warning); default: on when the "
                   "model folder has one (exported from a folder with safety_checker/), as in diffusers")
    p.add_argument("--lora", action="append", type=lora_option, default=None, metavar="FILE[:SCALE]",
                   help="run with this LoRA (.safetensors: kohya/AUTOMATIC1111 or diffusers/PEFT) at SCALE (default 1), applied "
                   "to the weights without re-export (needs a folder exported with a weight map); repeat for several. "
                   "Prompts can also name LoRAs with <lora:NAME:SCALE> tags (see --lora-dir)")
    p.add_argument("--lora-dir", type=Path, default=None, metavar="DIR",
                   help="where <lora:NAME:SCALE> tags in the prompt find NAME.safetensors")
    p.add_argument("--embedding", action="append", type=Path, default=None, metavar="FILE",
                   help="a textual-inversion embedding (.safetensors: diffusers' learned_embeds or AUTOMATIC1111's, named by its "
                   "file) that prompts can then name; repeat for several")
    p.add_argument("--token-merging", action="store_true",
                   help="merge similar tokens in the UNet's top-resolution self-attentions (ToMe; needs a folder exported with "
                   "sd-export --token-merging): faster steps, an approximate image")
    p.add_argument("--tiny-vae", action="store_true",
                   help="decode with the tiny VAE decoder (TAESD; needs a folder exported with sd-export --tiny-vae): much faster, a little less detail")
    p.add_argument("--refiner", type=Path, default=None, metavar="DIR",
                   help="SDXL: finish every image with this refiner model folder (exported with sd-export): the --model stops at "
                   "--refiner-switch and hands its latents over")
    p.add_argument("--refiner-switch", type=number(0, 1, low_open=True), default=0.8, metavar="F",
                   help="with --refiner: the fraction of the schedule the base model runs (default 0.8; diffusers' guide's value)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parsed and cross-checked arguments; `args.prompt` is the prompt however given, `args.script_layout` whether
    files go where the scripts put them."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.prompt is not None and args.prompt_flag is not None:
        parser.error("the prompt is given twice; pass it either as the first argument or with --prompt")
    args.prompt = args.prompt if args.prompt is not None else args.prompt_flag
    if args.prompt is None:
        parser.error('no prompt; pass what to draw, e.g. sd-run "a red circle on a blue background" (or --prompt "...")')
    for (first, one), (second, other) in ((("output", "-o/--output"), ("outdir", "--outdir")),
                                          (("grid", "--grid"), ("skip_grid", "--skip_grid")),
                                          (("model", "--model"), ("ckpt", "--ckpt"))):
        if getattr(args, first) and getattr(args, second):
            parser.error(f"{one} and {other} cannot be used together; pass one of them")
    if args.depth_map is not None and args.init_image is None:
        parser.error("--depth-map needs --init-image, the picture to redraw with that depth")
    if args.mask is not None and args.init_image is None:
        parser.error("--mask needs --init-image, the picture to inpaint")
    args.script_layout = args.output is None and bool(set(args.script_flags) - {"--prompt"})
    return args


def model_folder(args: argparse.Namespace) -> Path | None:
    """--model, or --ckpt when it names a folder; a checkpoint file gets the sd-export command that converts it."""
    ckpt = args.ckpt
    if ckpt is None or ckpt.is_dir():
        return ckpt or args.model
    if ckpt.is_file() and ckpt.suffix.lower() in CHECKPOINT_SUFFIXES:
        out = f"{ckpt.stem}-leansd"
        raise LeanSDError(f"--ckpt {ckpt} is a PyTorch checkpoint, which sd-run does not read; convert it once with "
                          f"`sd-export {shlex.quote(str(ckpt))} {shlex.quote(out)}` (needs PyTorch), then pass --model {shlex.quote(out)}")
    if ckpt.exists():
        raise LeanSDError(f"--ckpt {ckpt} is neither a model folder nor a .ckpt/.safetensors checkpoint; pass a folder written by sd-export")
    raise LeanSDError(f"--ckpt {ckpt} does not exist; pass a model folder written by sd-export (convert a checkpoint with `sd-export CKPT OUTDIR`)")


def generate(args: argparse.Namespace, pipe: Pipeline, seed: int, init_image: Image.Image | None,
             mask: Image.Image | None = None, refiner: Pipeline | None = None) -> list[PipelineOutput]:
    """One pipeline call per --n_iter iteration; iteration k uses seed + k, so each can be redone alone. With a
    `refiner`, the base model stops at --refiner-switch and the refiner finishes its latents (diffusers' hand-off)."""
    from leansd.runtime.image import infotext_prompt

    progress = RunProgress(args.quiet, args.preview, args.overwrite, pipe.preview)
    callback = progress.callback
    negative = infotext_prompt(args.negative_prompt) if args.negative_prompt is not None else None
    results = []
    for k in range(args.n_iter):
        common = dict(negative_prompt=negative, num_inference_steps=args.steps, guidance_scale=args.guidance, seed=seed + k,
                      scheduler=args.scheduler, eta=args.eta, callback=callback, memory_check=args.memory_check,
                      clip_skip=args.clip_skip)
        with progress.running():
            first = pipe(
                infotext_prompt(args.prompt), num_images_per_prompt=args.num_images, height=args.height, width=args.width,
                image=init_image, mask_image=mask, strength=args.strength, noise_level=args.noise_level,
                depth_map=args.depth_map, **common,
                **({"denoising_end": args.refiner_switch, "output_type": "latent"} if refiner else {"watermark": args.watermark}),
            )
        if refiner is None:
            results.append(first)
            continue
        with progress.running():
            done = refiner(infotext_prompt(args.prompt), image=first.images, denoising_start=args.refiner_switch,
                           watermark=args.watermark, **common)
        done.timings = {key: first.timings.get(key, 0.0) + value for key, value in done.timings.items()}
        results.append(done)
    return results


# ---------------------------------------------------------------- the command


def run(args: argparse.Namespace) -> list[Path]:
    from leansd.runtime.image import load_image, load_mask
    from leansd.runtime.loader import load

    seed = args.seed if args.seed not in (None, -1) else secrets.randbelow(2**32)
    if seed + args.n_iter - 1 > MAX_SEED:
        raise LeanSDError(f"--seed {seed} with --n_iter {args.n_iter} would go past the largest seed 2**64-1; pass a smaller --seed")
    model = model_folder(args)
    plan = plan_outputs(args, seed)
    check_preview(args.preview, plan, args.overwrite)
    check_depth_output(args.save_depth_map, plan, args.overwrite)
    init_image = load_image(args.init_image) if args.init_image is not None else None
    mask = load_mask(args.mask) if args.mask is not None else None
    pipe = load(
        model, backend=args.backend, device=args.device, precision=args.precision,
        num_threads=args.threads, cache_dir=args.cache_dir, low_memory=args.low_memory, deep_cache=args.deep_cache,
        vae_tiling=args.tiled_vae, tiny_vae=args.tiny_vae, guidance_cutoff=args.guidance_cutoff, safety_checker=args.safety_checker,
        token_merging=args.token_merging or None, loras=dict(args.lora) if args.lora else None, lora_dir=args.lora_dir, embeddings=args.embedding,
    )
    if args.save_depth_map is not None and pipe.unet.in_channels != pipe.models.vae_decoder.latent_channels + 1:
        raise LeanSDError(f"--save-depth-map is for depth-to-image models; {pipe.bundle.root} is not one (leave it out)")
    refiner = None
    if args.refiner is not None:
        refiner = load(args.refiner, backend=pipe.backend, device=args.device, precision=args.precision, num_threads=args.threads,
                       cache_dir=args.cache_dir, low_memory=args.low_memory, vae_tiling=args.tiled_vae, tiny_vae=args.tiny_vae,
                       safety_checker=args.safety_checker)
    results = generate(args, pipe, seed, init_image, mask, refiner)
    if args.save_depth_map is not None:
        save_depth_map(results[0].depth_map[0], args.save_depth_map, args.overwrite)
    paths = write_outputs(args, plan, pipe, results)
    for path in paths:
        say_path(path)
    if not args.quiet:
        t = {key: sum(r.timings[key] for r in results) for key in ("total_s", "text_encoder_s", "denoise_s", "decode_s")}
        steps = sum(r.num_inference_steps for r in results)
        print(f"{t['total_s']:.2f} s: text {t['text_encoder_s']:.2f} s, {steps} steps {t['denoise_s']:.2f} s, "
              f"decode {t['decode_s']:.2f} s ({pipe.backend}, {pipe.precision})", file=sys.stderr)
        if pipe.precision_reason:
            print(f"precision {pipe.precision}: {pipe.precision_reason}", file=sys.stderr)
    return paths


def check_depth_output(path: Path | None, plan, overwrite: bool) -> None:
    """--save-depth-map: a .png that is none of the images, and not an existing file unless --overwrite."""
    if path is None:
        return
    if path.suffix.lower() != ".png" or path.is_dir():
        raise LeanSDError(f"--save-depth-map {path} must be a .png file path")
    if path.resolve() in {p.resolve() for p in plan.files}:
        raise LeanSDError(f"--save-depth-map {path} is also an output file; choose another path")
    if path.exists() and not overwrite:
        raise LeanSDError(f"--save-depth-map {path} already exists; choose another path or pass --overwrite")


def save_depth_map(depth, path: Path, overwrite: bool) -> None:
    """The depth map as a 16-bit greyscale PNG, its minimum black and its maximum white."""
    import numpy as np
    from PIL import Image

    from leansd.runtime.image import save_png

    low, high = float(depth.min()), float(depth.max())
    scaled = (depth - low) / (high - low if high > low else 1.0) * 65535
    image = Image.fromarray(np.round(scaled).astype(np.uint16))
    writing(path, "--save-depth-map path", lambda: save_png(image, path, overwrite=overwrite))
    say_path(path)


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings from the runtime (a prompt longer than the text encoder takes, ...) as one line each."""
    print(f"sd-run: warning: {' '.join(str(message).split())}", file=sys.stderr)


class OneLineLog(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"sd-run: {record.levelname.lower()}: {' '.join(record.getMessage().split())}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineLog())
    logging.getLogger("leansd").addHandler(handler)
    shown, warnings.showwarning = warnings.showwarning, show_warning
    try:
        run(args)
    except LeanSDError as exc:
        print(f"sd-run: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sd-run: interrupted; no image was written", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = shown
        logging.getLogger("leansd").removeHandler(handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
