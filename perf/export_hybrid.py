"""Optimum Intel's hybrid int8 export (NNCF), offline: calibrated on a fixed list of prompts.

    python perf/export_hybrid.py SRC OUT [--num-samples N]

`optimum-cli export openvino --quant-mode int8 --dataset conceptual_captions` needs the calibration set from
the Hub; Optimum Intel's Python API also takes the calibration prompts as a list of strings, which is what this
does. Hybrid mode quantizes the UNet's weights and activations and the other models' weights only. The
calibration runs the pipeline at its default step count until N UNet inputs are collected.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

PROMPTS = [
    "a photograph of an astronaut riding a horse on the moon",
    "a watercolor painting of a lighthouse at dawn",
    "a bowl of ramen on a wooden table, studio lighting",
    "a portrait of an old fisherman, film grain",
    "a futuristic city skyline at night, neon lights",
    "a cat sleeping on a pile of books",
]


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--num-samples", type=int, default=50, help="UNet calls collected for calibration (default 50)")
    args = p.parse_args(argv)
    from optimum.intel import OVStableDiffusionPipeline, OVWeightQuantizationConfig

    config = OVWeightQuantizationConfig(bits=8, quant_method="hybrid", dataset=PROMPTS, num_samples=args.num_samples)
    pipe = OVStableDiffusionPipeline.from_pretrained(args.src, export=True, quantization_config=config)
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    pipe.save_pretrained(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
