"""Where sd-run's files go and how they are written: every path planned and checked before any work, PNG
`parameters` chunks as AUTOMATIC1111 writes them, the scripts' grid, and atomic, all-or-nothing writing.
"""
from __future__ import annotations

import argparse
import errno
import os
import re
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from leansd.runtime.errors import LeanSDError

if TYPE_CHECKING:
    from PIL import Image

    from leansd.runtime.pipeline import Pipeline, PipelineOutput

# How AUTOMATIC1111 names each sampler in the `parameters` chunk. A Karras or exponential sigma schedule adds
# " Karras" / " Exponential" (see sampler_label).
SAMPLER_LABELS = {
    "DDIMScheduler": "DDIM",
    "PNDMScheduler": "PLMS",
    "EulerDiscreteScheduler": "Euler",
    "EulerAncestralDiscreteScheduler": "Euler a",
    "DPMSolverMultistepScheduler": "DPM++ 2M",
    "LMSDiscreteScheduler": "LMS",
    "LCMScheduler": "LCM",
}
SAMPLE_NAME, GRID_NAME = r"(\d+)\.png", r"grid-(\d+)\.png"


# ---------------------------------------------------------------- where files go


@dataclass
class OutputPlan:
    """Where a run's files go: one path per image (iteration by iteration), the grid's, and whether names are
    numbered (the scripts' layout: each file takes the next free number when it is written)."""

    images: list[Path]
    grid: Path | None
    numbered: bool
    option: str  # the option that named the place, for messages

    @property
    def files(self) -> list[Path]:
        return [*self.images, *([self.grid] if self.grid else [])]


def plan_outputs(args: argparse.Namespace, seed: int) -> OutputPlan:
    """Every output path, checked before any work: existing files (unless --overwrite), and each folder exists
    (or will be made, for a folder output) and can be written."""
    count = args.num_images * args.n_iter
    plan = script_paths(args, count) if args.script_layout else leansd_paths(args.output, count, seed, args.grid)
    made = plan.numbered or args.output is not None and plan.images[0].parent == args.output
    for path in [] if plan.numbered else plan.files:
        if os.path.isdir(path):
            raise LeanSDError(f"{path} is a folder; choose another {plan.option}")
        if os.path.lexists(path) and not args.overwrite:
            hint = "pass -o PATH or --overwrite" if args.output is None else "choose another --output or pass --overwrite"
            raise LeanSDError(f"{path} already exists; {hint}")
    for folder in dict.fromkeys(p.parent for p in plan.files):
        check_folder(folder, plan.option, may_create=made)
    return plan


def leansd_paths(output: Path | None, count: int, seed: int, grid: bool) -> OutputPlan:
    """sd-run's own names: leansd-SEED.png here or in the -o folder, or the -o file; STEM-1.png, STEM-2.png... for
    several images, STEM-grid.png for the grid."""
    if output is None or output.is_dir() or output.suffix == "":
        folder, stem, single = output or Path(), f"leansd-{seed}", None
    elif output.suffix.lower() == ".png":
        folder, stem, single = output.parent, output.stem, output
    else:
        raise LeanSDError(f"output {output} must be a .png file or a folder")
    if count == 1:
        images = [single or folder / f"{stem}.png"]
    else:
        images = [folder / f"{stem}-{k}.png" for k in range(1, count + 1)]
    return OutputPlan(images, folder / f"{stem}-grid.png" if grid else None, False, "-o/--output")


def script_paths(args: argparse.Namespace, count: int) -> OutputPlan:
    """The scripts' layout: OUTDIR/samples/00000.png numbered upward, and OUTDIR/grid-0000.png unless --skip_grid.
    OUTDIR defaults to theirs: outputs/txt2img-samples, or outputs/img2img-samples with an init image."""
    outdir = args.outdir or Path("outputs", "img2img-samples" if args.init_image else "txt2img-samples")
    first = next_number(outdir / "samples", SAMPLE_NAME)
    images = [outdir / "samples" / f"{first + k:05}.png" for k in range(count)]
    grid = None if args.skip_grid else outdir / f"grid-{next_number(outdir, GRID_NAME):04}.png"
    return OutputPlan(images, grid, True, "--outdir")


def next_number(folder: Path, pattern: str) -> int:
    """One past the highest number among the names in `folder` matching `pattern` (0 when none)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return 0
    numbers = [int(m.group(1)) for m in map(re.compile(pattern).fullmatch, names) if m]
    return max(numbers, default=-1) + 1


def check_folder(folder: Path, option: str, may_create: bool) -> None:
    """Refuse a folder that is a file, that does not exist (unless it is to be made), or that cannot be written
    (tried by creating and removing a temp file there, which also catches read-only mounts and /proc)."""
    existing = next((f for f in (folder, *folder.parents) if os.path.lexists(f)), Path("."))
    if not existing.is_dir():
        raise LeanSDError(f"{existing} is a file, not a folder; choose another {option}")
    if existing != folder and not may_create:
        raise LeanSDError(f"folder {folder} does not exist; create it or choose another {option}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".sd-run-check-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise LeanSDError(f"cannot write to folder {existing} ({exc.strerror or exc}); choose another {option}") from None


def check_preview(preview: Path | None, plan: OutputPlan, overwrite: bool) -> None:
    if preview is None:
        return
    if preview.suffix.lower() != ".png" or preview.is_dir():
        raise LeanSDError(f"--preview {preview} must be a .png file path")
    outputs = {os.path.normcase(os.path.realpath(p)) for p in plan.files}
    if os.path.normcase(os.path.realpath(preview)) in outputs or any(_same_file(preview, p) for p in plan.files):
        raise LeanSDError(f"--preview {preview} is also an output file; choose another --preview path")
    if os.path.lexists(preview) and not overwrite:
        raise LeanSDError(f"--preview {preview} already exists; choose another --preview path or pass --overwrite")
    check_folder(preview.parent, "--preview path", may_create=False)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


# ---------------------------------------------------------------- generating


def sampler_label(result: PipelineOutput, scheduler_config: dict) -> str:
    """AUTOMATIC1111's name for the sampler, schedule included: "DPM++ 2M Karras", "Euler a", "LMS Karras"...

    The combined form ("DPM++ 2M Karras", not "Sampler: DPM++ 2M, Schedule type: Karras" as A1111 >= 1.9 writes)
    is read by every A1111 version: >= 1.9 splits a known schedule off the end of the name."""
    from leansd.runtime.schedulers import get_scheduler

    config = get_scheduler(result.settings.scheduler, scheduler_config).config
    label = SAMPLER_LABELS.get(result.scheduler, result.scheduler)
    if result.scheduler == "DPMSolverMultistepScheduler":
        label = f"DPM++ {config.solver_order}M"
    if getattr(config, "use_karras_sigmas", False):
        label += " Karras"
    elif getattr(config, "use_exponential_sigmas", False):
        label += " Exponential"
    return label


def image_parameters(args: argparse.Namespace, pipe: Pipeline, result: PipelineOutput, image: Image.Image, pos: int) -> dict:
    """The `Key: value` fields of one image's `parameters` chunk."""
    from leansd.runtime.version import __version__

    used, batch = result.settings, args.num_images
    return {
        "Steps": result.num_inference_steps,
        "Sampler": sampler_label(result, pipe.bundle.scheduler_config),
        "CFG scale": result.guidance_scale,
        "Seed": result.seed,
        "Size": f"{image.width}x{image.height}",
        "Model": pipe.bundle.name,
        "Denoising strength": used.strength if used.image is not None and used.denoising_start is None else None,
        "Clip skip": used.clip_skip + 1 if used.clip_skip else None,  # AUTOMATIC1111's numbering: diffusers' + 1
        "Eta DDIM": used.eta if used.eta else None,
        "Batch size": batch if batch > 1 else None,
        "Batch pos": pos if batch > 1 else None,
        "Deep cache": used.deep_cache if used.deep_cache > 1 else None,
        "CFG cutoff": used.guidance_cutoff if used.guidance_cutoff < 1 else None,
        "VAE": "tiny (TAESD)" if used.tiny_vae else None,
        "Token merging ratio": (pipe.bundle.manifest or {}).get("token_merging", {}).get("ratio") if used.token_merging else None,
        "Watermark": used.watermark,
        # AUTOMATIC1111's names for the SDXL refiner hand-off
        "Refiner": getattr(args, "refiner", None) and Path(args.refiner).name,
        "Refiner switch at": used.denoising_start,
        # As AUTOMATIC1111 records them: "name: short hash" for each LoRA run with and each embedding a prompt named.
        "Lora hashes": ", ".join(f"{lora.name}: {lora.hash}" for lora in result.loras) or None,
        "TI hashes": ", ".join(f"{e.token}: {e.hash}" for e in result.embeddings) or None,
        "Backend": f"leansd {__version__} {pipe.backend} {pipe.precision}" + (" (auto)" if pipe.precision_reason else ""),
    }


# ---------------------------------------------------------------- writing


def make_grid(images: list[Image.Image], rows: int, columns: int, padding: int = 2) -> Image.Image:
    """Images tiled row by row with a black `padding`-pixel border, as torchvision's make_grid in the scripts."""
    from PIL import Image

    w, h = images[0].size
    grid = Image.new("RGB", (columns * (w + padding) + padding, rows * (h + padding) + padding))
    for k, image in enumerate(images):
        grid.paste(image, (padding + (k % columns) * (w + padding), padding + (k // columns) * (h + padding)))
    return grid


def writing(path: Path, option: str, write: Callable[[], Any]) -> Any:
    """Run `write`; an OSError (disk full, permissions changed meanwhile) becomes a one-line error."""
    try:
        return write()
    except OSError as exc:
        full = "free some space or " if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        raise LeanSDError(f"cannot write {path} ({exc.strerror or exc}); {full}choose another {option}") from None


def write_outputs(args: argparse.Namespace, plan: OutputPlan, pipe: Pipeline, results: list[PipelineOutput]) -> list[Path]:
    """Write every image (and the grid) atomically. If one cannot be written, or the run is interrupted, the
    files this run created are removed again: all or nothing."""
    from leansd.runtime.image import a1111_parameters

    pngs: list[tuple[Image.Image, str]] = []  # (image, parameters), in the order of plan.files
    for result in results:
        for pos, image in enumerate(result.images):
            pngs.append((image, a1111_parameters(result.settings.prompt, result.settings.negative_prompt,
                                                 image_parameters(args, pipe, result, image, pos))))
    if plan.grid is not None:
        pngs.append((make_grid([image for image, _ in pngs], args.n_iter, args.num_images), pngs[0][1]))
    created: list[tuple[Path, os.stat_result]] = []
    try:
        return [place(image, text, path, plan, args.overwrite, created) for (image, text), path in zip(pngs, plan.files)]
    except BaseException:
        for path, st in reversed(created):
            if _same_file_stat(path, st):
                Path(path).unlink(missing_ok=True)
        raise


def place(image: Image.Image, text: str, path: Path, plan: OutputPlan, overwrite: bool,
          created: list[tuple[Path, os.stat_result]]) -> Path:
    """Write one PNG at `path`, or with numbered names at the next free number from there; note it in `created`."""
    from leansd.runtime.image import save_png

    existed = os.path.lexists(path)
    writing(path.parent, plan.option, lambda: path.parent.mkdir(parents=True, exist_ok=True))
    while True:
        try:
            writing(path, plan.option, lambda p=path: save_png(image, p, text, overwrite=overwrite and not plan.numbered))
            break
        except LeanSDError:
            if not (plan.numbered and os.path.lexists(path)):
                raise
            digits = re.search(r"(\d+)\.png$", path.name)
            path = path.with_name(f"{path.name[: digits.start(1)]}{int(digits.group(1)) + 1:0{len(digits.group(1))}}.png")
    if not existed or plan.numbered:
        created.append((path, os.stat(path)))
    return path


def _same_file_stat(path: Path, st: os.stat_result) -> bool:
    try:
        now = os.stat(path)
    except OSError:
        return False
    return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)


def say_path(path: Path) -> None:
    """Print a written path on stdout; a name that is not valid text goes out as its raw bytes."""
    try:
        print(path)
    except UnicodeEncodeError:
        buffer = getattr(sys.stdout, "buffer", None)
        if buffer is None:
            print(str(path).encode("utf-8", "backslashreplace").decode("utf-8"))
        else:
            sys.stdout.flush()
            buffer.write(os.fsencode(path) + b"\n")
            buffer.flush()


