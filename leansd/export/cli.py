"""`sd-export`: turn a Stable Diffusion model into a leansd model folder.

    sd-export SOURCE OUTPUT_DIR [--backend onnx|openvino|all] [--height H --width W --batch B]
              [--opset N] [--overwrite] [--tolerance T | --tolerance unet=T,vae_decoder=T]
              [--precision fp32|fp32,int8] [--force-int8] [--int8-unet auto|hybrid|weights] [--int8-unet-onnx dynamic|static]
              [--deep-cache] [--tiny-vae PATH] [--token-merging [RATIO]]
              [--config DIR] [--prediction-type epsilon|v_prediction] [--image-size N]   (single files)

Exit status: 0 success; 2 a problem the message names (bad source, existing output, bad size, parity over
the tolerance or an int8 model under its quality gate); 1 an unexpected failure (rerun with --verbose for the
traceback).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from typing import NoReturn, Sequence

from leansd.export import quantize
from leansd.export.errors import ExportError
from leansd.export.token_merging import DEFAULT_RATIO

PROG = "sd-export"


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line (the message and where to read more), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {message}; see {PROG} --help\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Export a Stable Diffusion 1.x/2.x or SDXL model to ONNX and OpenVINO IR, verified against PyTorch.")
    p.add_argument("source", help="diffusers folder, Hugging Face Hub id (online only), or SD 1.x/2.x / x4-upscaler .ckpt/.safetensors file")
    p.add_argument("output_dir", help="folder to create (written atomically)")
    p.add_argument("--backend", default="all", choices=["onnx", "openvino", "all"], help="which model files to write (default: all)")
    p.add_argument("--height", type=_positive_int, help="static image height in pixels (default: dynamic shapes)")
    p.add_argument("--width", type=_positive_int, help="static image width in pixels")
    p.add_argument("--batch", type=_positive_int, help="static number of images per call (the UNet gets twice that)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset, 14..20 (default: 17)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT_DIR if it exists (only after a successful export)")
    p.add_argument(
        "--tolerance",
        type=_tolerance,
        help="largest relative error vs PyTorch (max-abs error / max-abs output), one number or COMPONENT=N,... (default: 1e-3)",
    )
    p.add_argument(
        "--precision",
        default="fp32",
        metavar="LIST",
        help="fp32 (default) or fp32,int8: also write int8 variants (OpenVINO: NNCF, see --int8-unet for the UNet, int8 weights elsewhere; "
        "ONNX: onnxruntime dynamic int8), calibrated and measured on the fp32 export with a few built-in prompts at the "
        "model's size; fp32 is always written",
    )
    p.add_argument(
        "--force-int8",
        action="store_true",
        help="keep int8 models that miss their quality gate against fp32 (default: the export fails for the UNet and "
        "text encoder; the VAE keeps fp32 in the int8 variant)",
    )
    p.add_argument("--int8-unet", default="auto", choices=quantize.UNET_RECIPES, help=quantize.UNET_RECIPE_HELP)
    p.add_argument("--int8-unet-onnx", default="dynamic", choices=quantize.ONNX_UNET_RECIPES, help=quantize.ONNX_UNET_RECIPE_HELP)
    p.add_argument(
        "--deep-cache",
        action="store_true",
        help="also write the UNet cut into a deep and a shallow part (fp32; with --precision fp32,int8 int8 too), so that "
        "sd-run --deep-cache N can reuse the deep features for N-1 of every N steps (DeepCache): faster steps at a small quality cost",
    )
    p.add_argument(
        "--tiny-vae",
        metavar="PATH",
        help="also export this tiny VAE decoder (a diffusers AutoencoderTiny folder, e.g. a copy of madebyollin/taesd) for "
        "fast decoding and step previews: sd-run --tiny-vae / --preview",
    )
    p.add_argument(
        "--token-merging",
        type=float,
        nargs="?",
        const=DEFAULT_RATIO,
        metavar="RATIO",
        help="also write the UNet (and its deep-cache parts) with token merging (ToMe) in the top-resolution "
        "self-attentions, merging RATIO of the tokens (default 0.5), for sd-run --token-merging: faster steps, an "
        "approximate image (SD 1.x/2.x)",
    )
    p.add_argument(
        "--unet-parts",
        type=int,
        metavar="N",
        help="cut the ONNX UNet into N parts sharing its weights file, so that sd-run --low-memory on onnxruntime loads "
        "one part at a time (weight streaming); default when the UNet is over 2 GB: 8 parts, or more so that none holds "
        "much over 640 MB (SD 1.5: 8, SDXL: 16); else none; 0: none",
    )
    p.add_argument(
        "--text-encoder-parts",
        type=int,
        metavar="N",
        help="cut SDXL's second ONNX text encoder (text_encoder_2, fp32) into N parts for the same weight streaming; "
        "default when it is over 2 GB (SDXL's is 2.8 GB): 8; else none; 0: none. An existing export is cut without "
        "re-exporting by: python -m leansd.export.parts FOLDER",
    )
    p.add_argument("--config", "--sd1-config", dest="config", metavar="DIR",
                   help="diffusers-layout config folder for single-file checkpoints (default: the SD 1.x or SD 2.x configs shipped with "
                   "leansd, chosen by the checkpoint's text encoder)")
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction"],
                   help="single files: what the UNet predicts (SD 2 base 512: epsilon; SD 2 768-v: v_prediction); needed for an "
                   "SD 2.x text-to-image file whose metadata and global_step do not say")
    p.add_argument("--image-size", type=_positive_int, metavar="PIXELS",
                   help="single files: the model's native image side (default 512; 768 for SD 2.x v_prediction)")
    p.add_argument(
        "--lora",
        action="append",
        metavar="FILE[:SCALE]",
        help="fuse this LoRA (.safetensors: kohya/AUTOMATIC1111 or diffusers/PEFT, convolution LoRAs too) into the model "
        "at SCALE (default 1) before export; repeat for several. Without re-export, sd-run --lora applies LoRAs at run time",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true", help="show library warnings and full tracebacks")
    return p


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def _tolerance(text: str) -> float | dict[str, float]:
    try:
        if "=" not in text:
            return float(text)
        pairs = (item.split("=", 1) for item in text.split(",") if item.strip())
        return {name.strip(): float(value) for name, value in pairs}
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or COMPONENT=NUMBER list") from None


def _quiet_libraries() -> None:
    """Silence tracer warnings and library logging; the exporter reports what matters itself."""
    warnings.filterwarnings("ignore")
    # Read when the libraries are first imported (some log at import time).
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        import diffusers.utils.logging as dlog
        import transformers

        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
        transformers.logging.set_verbosity_error()
    except ImportError:  # reported properly by the exporter
        pass


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from leansd.export import export_model

    if not args.verbose:
        _quiet_libraries()
    static = {"height": args.height, "width": args.width, "batch": args.batch}
    start = time.perf_counter()
    try:
        out = export_model(
            args.source,
            args.output_dir,
            backends=args.backend,
            static_shapes=static if any(v is not None for v in static.values()) else None,
            opset=args.opset,
            overwrite=args.overwrite,
            tolerance=args.tolerance,
            single_file_config=args.config,
            prediction_type=args.prediction_type,
            image_size=args.image_size,
            progress=False if args.quiet else None,
            precisions=args.precision,
            force_int8=args.force_int8,
            deep_cache=args.deep_cache,
            tiny_vae=args.tiny_vae,
            unet_parts=args.unet_parts,
            text_encoder_parts=args.text_encoder_parts,
            loras=args.lora,
            token_merging=args.token_merging,
            int8_unet=args.int8_unet,
            int8_unet_onnx=args.int8_unet_onnx,
        )
    except ExportError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line unless --verbose
        if args.verbose:
            raise
        first = (str(exc).strip().splitlines() or [""])[0]
        print(f"{PROG}: error: unexpected {exc.__class__.__name__}: {first}; nothing was written (rerun with --verbose for details)", file=sys.stderr)
        return 1
    print(f"exported {out} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
