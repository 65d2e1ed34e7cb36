"""How good is the memory estimate that refuses generations too big for the machine? Estimate vs measured peak.

    python perf/memory.py MODEL_DIR --sizes 256 384 512 [--backend onnxruntime] [--low-memory] [--images 1]

Each case runs in a fresh process: load the model, note the resident memory (VmRSS), generate one image with
one step (the per-step and decode peaks are the same as for many steps) with the check off, then read the
process's peak resident memory (VmHWM, Linux). The estimate (`leansd.runtime.budget`) is of the memory a
generation adds to what is loaded, so the table compares it with peak minus loaded. Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, sys
import leansd
from leansd.runtime.pipeline import Generation

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

args = json.loads(sys.argv[1])
pipe = leansd.load(args["model"], backend=args["backend"], low_memory=args["low_memory"])
loaded = status("VmRSS:")
call = dict(prompt="a red circle on a blue background", height=args["size"], width=args["size"], num_inference_steps=1,
            num_images_per_prompt=args["images"], seed=1, output_type=args["output"], memory_check=False)
estimate = Generation(pipe, pipe.defaults.merged(**call)).memory_estimate()
pipe(**call)
print(json.dumps({"loaded": loaded, "peak": status("VmHWM:"), "unet": estimate.unet, "decode": estimate.decode,
                  "weights": estimate.weights, "estimate": estimate.peak}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("--low-memory", action="store_true")
    p.add_argument("--images", type=int, default=1)
    p.add_argument("--unet-only", action="store_true", help="stop before decoding (output_type='latent'): the UNet's peak alone")
    args = p.parse_args()
    gib = 2**30
    print("| model | backend | mode | size | images | loaded GB | measured peak - loaded GB | estimate GB (UNet / decode / weights) | estimate / measured |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        spec = {"model": args.model, "backend": args.backend, "low_memory": args.low_memory, "size": size, "images": args.images,
                "output": "latent" if args.unet_only else "np"}
        out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        added = r["peak"] - r["loaded"]
        print(f"| {args.model.rstrip('/').split('/')[-1]} | {args.backend} | {'low memory' if args.low_memory else 'normal'}{', UNet only' if args.unet_only else ''} | "
              f"{size} | {args.images} | {r['loaded'] / gib:.2f} | {added / gib:.2f} | {r['estimate'] / gib:.2f} "
              f"({r['unet'] / gib:.2f} / {r['decode'] / gib:.2f} / {r['weights'] / gib:.2f}) | {r['estimate'] / max(added, 1):.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
