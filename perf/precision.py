"""Precision variants side by side on one machine: image time, UNet step, decode, peak memory, and quality
against the backend's fp32 image, in one run.

    python perf/precision.py MODEL_DIR [--variants openvino:fp32,openvino:bf16,onnxruntime:fp32] [--steps 20] [--size 512]

Each variant runs in its own process (peak RSS from its rusage, as `/usr/bin/time -v` reports it), generating the
same image twice (cold, then warm) with Euler (one UNet call per step), guidance 7.5, seed 1. Quality is the
PSNR and max-abs difference of the variant's image against the first fp32 variant's. The CPU's instruction-set
flags that matter (avx2, avx512f, avx512_bf16, amx_bf16, avx512_vnni, amx_int8) are printed with the table.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

CHILD = r"""
import json, resource, sys, time
import numpy as np
import leansd
spec = json.loads(sys.argv[1])
t0 = time.perf_counter()
pipe = leansd.load(spec["model"], backend=spec["backend"], precision=spec["precision"])
load_s, times = time.perf_counter() - t0, []
for _ in range(2):
    t = time.perf_counter()
    out = pipe("a castle on a hill", scheduler="euler", num_inference_steps=spec["steps"], guidance_scale=7.5,
               guidance_cutoff=spec["cutoff"], height=spec["size"], width=spec["size"], seed=1, output_type="np")
    times.append(time.perf_counter() - t)
np.save(spec["image"], out.images)
print(json.dumps({"load_s": load_s, "image_s": times, "step_s": out.timings["step_s"], "decode_s": out.timings["decode_s"],
                  "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    line = next((l for l in text.splitlines() if l.startswith("flags")), "")
    have = set(line.split(":", 1)[-1].split())
    return [f for f in FLAGS if f in have]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--variants", default="openvino:fp32,openvino:bf16,onnxruntime:fp32")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--guidance-cutoff", type=float, default=1.0, help="stop guidance after this fraction of the steps")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="leansd-precision-"))
    rows, reference = [], None
    for variant in args.variants.split(","):
        backend, precision = variant.split(":")
        image = work / f"{backend}-{precision}.npy"
        spec = {"model": args.model, "backend": backend, "precision": precision, "steps": args.steps, "size": args.size,
                "cutoff": args.guidance_cutoff, "image": str(image)}
        out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        pixels = np.load(image)
        if reference is None and precision == "fp32":
            reference = pixels
        if reference is not None:
            mse = float(np.mean((pixels - reference) ** 2))
            quality = f"{10 * np.log10(1 / mse):.1f} dB / {np.abs(pixels - reference).max():.4f}" if mse else "reference"
        else:
            quality = "-"
        rows.append(f"| {backend} {precision} | {r['image_s'][0]:.1f} | {r['image_s'][1]:.1f} | {r['step_s']:.2f} | "
                    f"{r['decode_s']:.1f} | {r['peak_kb'] / 2**20:.2f} | {quality} |")
    cutoff = f", guidance cutoff {args.guidance_cutoff}" if args.guidance_cutoff < 1 else ""
    print(f"CPU flags: {' '.join(cpu_flags())}; {args.size}x{args.size}, {args.steps} Euler steps, guidance 7.5{cutoff}")
    print("| variant | image s (cold) | image s (warm) | UNet step s | decode s | peak RSS GB | PSNR / max-abs vs fp32 |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
