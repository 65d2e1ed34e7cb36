"""`sd-run`: generate images from the command line."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from leansd.runtime.errors import LeanSDError

if TYPE_CHECKING:
    from leansd.runtime.settings import StepCallback

# How AUTOMATIC1111-style tools name each sampler in the `parameters` chunk.
SAMPLER_LABELS = {
    "DDIMScheduler": "DDIM",
    "PNDMScheduler": "PLMS",
    "EulerDiscreteScheduler": "Euler",
    "EulerAncestralDiscreteScheduler": "Euler a",
    "DPMSolverMultistepScheduler": "DPM++ 2M",
    "LMSDiscreteScheduler": "LMS",
    "LCMScheduler": "LCM",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sd-run", description="Generate images with Stable Diffusion, without PyTorch.")
    p.add_argument("prompt", help="what to draw")
    p.add_argument("--model", type=Path, default=None, help="model folder written by sd-export (default: the bundled model)")
    p.add_argument("-o", "--output", type=Path, default=None, help="PNG file, or a folder for several images (default: ./leansd-SEED.png)")
    p.add_argument("--negative-prompt", default=None, help="what not to draw")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's recommendation, else 50)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale; 1 or less turns guidance off")
    p.add_argument("--scheduler", default=None, help="ddim, pndm/plms, euler, euler_a, dpm++2m, dpm++2m_karras, lms, lcm or a diffusers class name")
    p.add_argument("--seed", type=int, default=None, help="seed; the same seed gives the same image as diffusers with torch.Generator('cpu')")
    p.add_argument("-n", "--num-images", type=int, default=1, help="images to generate")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--init-image", type=Path, default=None, help="start from this image (image-to-image)")
    p.add_argument("--strength", type=float, default=0.8, help="how much to change the init image, in (0, 1]")
    p.add_argument("--backend", default=None, help="onnxruntime or openvino (default: what is installed)")
    p.add_argument("--device", default="cpu", help="cpu, auto, or a backend device such as cuda, dml, gpu")
    p.add_argument("--precision", default="fp32", help="model variant: fp32 or int8 when the folder has it")
    p.add_argument("--cache-dir", type=Path, default=None, metavar="DIR",
                   help="keep optimized/compiled models here so later runs start faster (about one copy of each model file)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: the backend's choice)")
    p.add_argument("--low-memory", action="store_true", help="load each model only while it is needed; on onnxruntime, stream the UNet weights part by part when the export has UNet parts (sd-export writes them for models over 2 GB)")
    p.add_argument("--tiled-vae", action="store_true", default=None,
                   help="decode images larger than the VAE's native size tile by tile (on with --low-memory)")
    p.add_argument("--deep-cache", type=int, default=None, metavar="N",
                   help="reuse the UNet's deep features for N-1 of every N steps (needs a folder exported with sd-export --deep-cache)")
    p.add_argument("--guidance-cutoff", type=float, default=1.0, metavar="F",
                   help="stop classifier-free guidance after this fraction of the steps (e.g. 0.3): later steps cost half; "
                   "1 (default) guides every step. With --deep-cache, features are then reused on the unguided steps only")
    p.add_argument("--tiny-vae", action="store_true",
                   help="decode with the tiny VAE decoder (TAESD; needs a folder exported with sd-export --tiny-vae): much faster, a little less detail")
    p.add_argument("--preview", type=Path, default=None, metavar="PNG",
                   help="after every step, write the current estimate of the (first) image to this PNG, replaced in place "
                   "(with the tiny VAE decoder when the folder has one)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


def output_paths(output: Path | None, count: int, seed: int, overwrite: bool) -> list[Path]:
    """Where each image goes; refuses existing files unless overwriting, before any work is done."""
    if output is None:
        stem = f"leansd-{seed}"
        names = [f"{stem}.png"] if count == 1 else [f"{stem}-{k}.png" for k in range(1, count + 1)]
        paths = [Path(n) for n in names]
        explicit = False
    elif output.is_dir() or output.suffix == "" or str(output).endswith(("/", "\\")):
        paths = [output / (f"leansd-{seed}.png" if count == 1 else f"leansd-{seed}-{k}.png") for k in range(1, count + 1)]
        explicit = True
    else:
        if output.suffix.lower() != ".png":
            raise LeanSDError(f"output {output} must be a .png file or a folder")
        paths = [output] if count == 1 else [output.with_name(f"{output.stem}-{k}.png") for k in range(1, count + 1)]
        explicit = True
    for path in paths:
        if path.exists() and not overwrite:
            hint = "choose another --output or pass --overwrite" if explicit else "pass -o PATH or --overwrite"
            raise LeanSDError(f"{path} already exists; {hint}")
        if not path.parent.exists():
            if path.parent == output:
                continue
            raise LeanSDError(f"folder {path.parent} does not exist; create it or choose another --output")
    return paths


def progress_callback(quiet: bool, preview: Path | None, pipe) -> StepCallback | None:
    """The step callback of a run: a progress bar on stderr, and the preview PNG rewritten after each step."""
    if preview is not None and (preview.suffix.lower() != ".png" or not preview.parent.is_dir()):
        raise LeanSDError(f"--preview {preview} must be a .png file in an existing folder")
    if quiet and preview is None:
        return None
    from tqdm import tqdm

    from leansd.runtime.image import save_png, unit_to_pil

    bar: list = []

    def callback(step: int, total: int, latents, denoised) -> None:
        if not quiet:
            if not bar:
                bar.append(tqdm(total=total, unit="step", leave=False, dynamic_ncols=True))
            bar[0].update(1)
            if step + 1 == total:
                bar[0].close()
        if preview is not None:
            save_png(unit_to_pil(pipe.preview(denoised[:1]))[0], preview, overwrite=True)

    return callback


def run(args: argparse.Namespace) -> list[Path]:
    import secrets

    from leansd.runtime.image import a1111_parameters, save_png
    from leansd.runtime.loader import load
    from leansd.runtime.version import __version__

    if args.num_images < 1:
        raise LeanSDError(f"--num-images must be at least 1, got {args.num_images}")
    if args.init_image is not None and not 0.0 < args.strength <= 1.0:
        raise LeanSDError(f"--strength must be in (0, 1], got {args.strength}")
    seed = args.seed if args.seed is not None else secrets.randbelow(2**32)
    paths = output_paths(args.output, args.num_images, seed, args.overwrite)
    pipe = load(
        args.model, backend=args.backend, device=args.device, precision=args.precision,
        num_threads=args.threads, cache_dir=args.cache_dir, low_memory=args.low_memory, deep_cache=args.deep_cache,
        vae_tiling=args.tiled_vae, tiny_vae=args.tiny_vae, guidance_cutoff=args.guidance_cutoff,
    )
    result = pipe(
        args.prompt,
        negative_prompt=args.negative_prompt,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        num_images_per_prompt=args.num_images,
        height=args.height,
        width=args.width,
        image=args.init_image,
        strength=args.strength,
        seed=seed,
        scheduler=args.scheduler,
        callback=progress_callback(args.quiet, args.preview, pipe),
    )
    used = result.settings
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    for k, (image, path) in enumerate(zip(result.images, paths)):
        settings = {
            "Steps": result.num_inference_steps,
            "Sampler": SAMPLER_LABELS.get(result.scheduler, result.scheduler),
            "CFG scale": result.guidance_scale,
            "Seed": seed,
            "Size": f"{image.width}x{image.height}",
            "Model": pipe.bundle.name,
            "Denoising strength": args.strength if args.init_image is not None else None,
            "Batch size": args.num_images if args.num_images > 1 else None,
            "Batch pos": k if args.num_images > 1 else None,
            "Deep cache": used.deep_cache if used.deep_cache > 1 else None,
            "CFG cutoff": used.guidance_cutoff if used.guidance_cutoff < 1 else None,
            "VAE": "tiny (TAESD)" if used.tiny_vae else None,
            "Backend": f"leansd {__version__} {pipe.backend} {pipe.precision}",
        }
        save_png(image, path, a1111_parameters(args.prompt, args.negative_prompt, settings), overwrite=args.overwrite)
        print(path)
    if not args.quiet:
        t = result.timings
        print(f"{t['total_s']:.2f} s: text {t['text_encoder_s']:.2f} s, {result.num_inference_steps} steps {t['denoise_s']:.2f} s, "
              f"decode {t['decode_s']:.2f} s ({pipe.backend}, {pipe.precision})", file=sys.stderr)
    return paths


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except LeanSDError as exc:
        print(f"sd-run: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sd-run: interrupted; no image was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
