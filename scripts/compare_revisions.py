"""Do two revisions of leansd draw the same images? A check for refactorings that must not change any number.

    .venv-dev/bin/python scripts/compare_revisions.py BASE_REV            # e.g. f5abf5e, or HEAD~3

builds two tiny models with seeded random weights (an SD 1.x one with every optional part: int8, deep-cache
parts, weight-streaming parts, a tiny VAE; and a v-prediction one with VAE factor 4), exports them with this
checkout, then generates a matrix of images (every scheduler, both backends, image-to-image, guidance off and
cut off, deep cache, low memory with streamed weights, tiled VAE, tiny VAE, int8, step callbacks) once with
BASE_REV (a temporary git worktree) and once with this checkout, each in its own process, and compares every
array bit for bit. Only the public API is used (`leansd.load`, the call, its keyword names), so any two
revisions that share it can be compared. Exit status 0 when every array is identical.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle on a blue background", "a green square"]
SCHEDULERS = ["ddim", "pndm", "plms", "euler", "euler_a", "dpm++2m", "dpm++2m_karras", "lms", "lcm"]


def build(folder: Path) -> None:
    """The two tiny models, exported with this checkout (export code is not what is compared)."""
    sys.path.insert(0, str(REPO))
    import torch
    from diffusers import AutoencoderTiny

    from leansd.export import export_model
    from tests.tiny_models import build_tiny_sd

    torch.set_num_threads(1)
    torch.manual_seed(3)
    taesd = folder / "taesd"
    AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
                    num_decoder_blocks=(1, 1), latent_channels=4).save_pretrained(taesd)
    source = build_tiny_sd(folder / "src-sd")
    export_model(source, folder / "sd", precisions=("fp32", "int8"), force_int8=True, deep_cache=True, tiny_vae=taesd,
                 unet_parts=3, progress=False)
    vpred = build_tiny_sd(folder / "src-vpred", vae_blocks=3, prediction_type="v_prediction", seed=1)
    export_model(vpred, folder / "vpred", progress=False)


def cases() -> list[tuple[str, str, dict, dict]]:
    """(name, model, load options, call options) for every generation compared."""
    base = {"prompt": PROMPTS, "negative_prompt": ["blurry", ""], "num_inference_steps": 4, "guidance_scale": 7.5,
            "height": 32, "width": 32, "seed": 11, "output_type": "np"}
    out = []
    for backend in ("onnxruntime", "openvino"):
        load = {"backend": backend}
        for s in SCHEDULERS:
            out.append((f"{backend}-{s}", "sd", load, {**base, "scheduler": s}))
            out.append((f"{backend}-vpred-{s}", "vpred", load, {**base, "scheduler": s, "num_images_per_prompt": 2}))
        for s in ("euler_a", "ddim", "dpm++2m"):
            out.append((f"{backend}-img2img-{s}", "sd", load, {**base, "scheduler": s, "image": "INIT", "strength": 0.6}))
        out += [
            (f"{backend}-noguidance", "sd", load, {**base, "guidance_scale": 1.0, "negative_prompt": None}),
            (f"{backend}-latents", "sd", load, {**base, "output_type": "latent", "scheduler": "euler_a"}),
            (f"{backend}-cutoff", "sd", load, {**base, "guidance_cutoff": 0.5, "scheduler": "euler_a"}),
            (f"{backend}-deepcache", "sd", load, {**base, "deep_cache": 2, "num_inference_steps": 6}),
            (f"{backend}-deepcache-cutoff", "sd", load, {**base, "deep_cache": 2, "guidance_cutoff": 0.3, "num_inference_steps": 6}),
            (f"{backend}-lowmem", "sd", {**load, "low_memory": True}, {**base, "scheduler": "euler_a"}),
            (f"{backend}-lowmem-cutoff", "sd", {**load, "low_memory": True}, {**base, "guidance_cutoff": 0.5}),
            (f"{backend}-lowmem-deepcache", "sd", {**load, "low_memory": True, "deep_cache": 2},
             {**base, "num_inference_steps": 6, "guidance_cutoff": 0.5}),
            (f"{backend}-lowmem-img2img", "sd", {**load, "low_memory": True}, {**base, "image": "INIT", "strength": 0.7}),
            (f"{backend}-tiled", "sd", {**load, "vae_tiling": True}, {**base, "height": 48, "width": 64}),
            (f"{backend}-tiny-vae", "sd", {**load, "tiny_vae": True}, base),
            (f"{backend}-int8", "sd", {**load, "precision": "int8"}, base),
            (f"{backend}-int8-lowmem", "sd", {**load, "precision": "int8", "low_memory": True}, base),
            (f"{backend}-int8-deepcache", "sd", {**load, "precision": "int8"}, {**base, "deep_cache": 3, "num_inference_steps": 6}),
            (f"{backend}-callback", "sd", load, {**base, "scheduler": "lms", "callback": "RECORD"}),
        ]
    return out


def generate(models: Path, out: Path) -> None:
    """Run every case with whatever `leansd` this interpreter imports; save the arrays to `out` (.npz)."""
    import leansd

    init = np.linspace(0, 1, 32 * 32 * 3, dtype=np.float32).reshape(32, 32, 3)
    arrays: dict[str, np.ndarray] = {}
    pipes: dict[tuple, object] = {}
    for name, model, load, call in cases():
        key = (model, tuple(sorted(load.items())))
        if key not in pipes:
            pipes[key] = leansd.load(models / model, **load)
        call = dict(call)
        seen: list[np.ndarray] = []
        if call.get("image") == "INIT":
            call["image"] = init
        if call.get("callback") == "RECORD":
            call["callback"] = lambda i, n, latents, denoised: seen.extend([latents.copy(), denoised.copy()])
        arrays[name] = np.asarray(pipes[key](**call).images)
        for k, a in enumerate(seen):
            arrays[f"{name}-callback{k}"] = a
    np.savez(out, **arrays)
    print(f"{len(arrays)} arrays from {leansd.__file__}")


def compare(a: Path, b: Path) -> int:
    base, new = np.load(a), np.load(b)
    differ = [k for k in base.files if k not in new.files or not np.array_equal(base[k], new[k])]
    for k in differ:
        detail = "missing" if k not in new.files else f"max-abs {np.abs(base[k].astype(np.float64) - new[k]).max():.3g}"
        print(f"DIFFERENT {k}: {detail}")
    print(f"{len(base.files) - len(differ)} of {len(base.files)} arrays bit-identical")
    return 1 if differ else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("base", help="git revision to compare this checkout with")
    p.add_argument("--work", type=Path, default=None, help="folder for the models and arrays (default: a temporary one)")
    p.add_argument("--generate", nargs=2, metavar=("MODELS", "OUT"), help=argparse.SUPPRESS)  # the child processes
    args = p.parse_args()
    if args.generate:
        generate(Path(args.generate[0]), Path(args.generate[1]))
        return 0
    work = args.work or Path(tempfile.mkdtemp(prefix="leansd-compare-"))
    models = work / "models"
    if not (models / "vpred" / "leansd.json").is_file():
        build(models)
    tree = work / "base-tree"
    if not tree.exists():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), args.base], check=True)
    for label, root in (("base", tree), ("new", REPO)):
        env = {**os.environ, "PYTHONPATH": str(root)}
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(REPO / 'scripts')!r}); import compare_revisions as c; "
                        f"c.generate(__import__('pathlib').Path({str(models)!r}), __import__('pathlib').Path({str(work / (label + '.npz'))!r}))"],
                       env=env, check=True, cwd=root)
    return compare(work / "base.npz", work / "new.npz")


if __name__ == "__main__":
    sys.exit(main())
