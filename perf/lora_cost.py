"""What run-time LoRA costs: time to apply, memory, and the time per UNet step with and without it.

    python perf/lora_cost.py MODEL_FOLDER [--backend onnxruntime] [--size 256] [--steps 3] [--rank 32] [--locon] [--alternate 3]

Makes a kohya LoRA for the folder from its weight_map.json (every UNet attention-block weight and every text-encoder
layer at `--rank`; with `--locon` also every resnet convolution), then: a call without LoRA (warm-up and baseline),
a call with it (the switch: `adapters_s`, plus on OpenVINO the recompile in the first call), a second call with it
(per-step time), and a call without it again (switching back). Memory is the process's resident set after each call.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--locon", action="store_true")
    parser.add_argument("--low-memory", action="store_true")
    parser.add_argument("--alternate", type=int, default=0, metavar="N",
                        help="then N rounds of (without, with) LoRA, each measured on the second call after the switch: "
                        "per-step times side by side on a loaded machine")
    args = parser.parse_args()

    import leansd
    from tests.lora_files import kohya_lora_from_map

    def pick(component: str, name: str) -> bool:
        return component == "text_encoder" or "attentions" in name or (args.locon and "resnets" in name)

    lora = kohya_lora_from_map(args.model, Path(tempfile.mkdtemp()) / "measure.safetensors", seed=0, rank=args.rank, pick=pick)
    call = dict(prompt="a castle on a hill", num_inference_steps=args.steps, height=args.size, width=args.size, seed=1,
                output_type="latent", memory_check=False)
    start = time.perf_counter()
    pipe = leansd.load(args.model, backend=args.backend, low_memory=args.low_memory)
    report = {"model": str(args.model), "backend": args.backend, "size": args.size, "steps": args.steps, "rank": args.rank,
              "locon": args.locon, "low_memory": args.low_memory, "lora_mb": round(lora.stat().st_size / 2**20, 1),
              "load_s": round(time.perf_counter() - start, 2), "rss_loaded_gb": round(rss_gb(), 2)}
    runs = {}
    for label, loras in (("base", {}), ("base_again", {}), ("lora_first", {str(lora): 0.8}), ("lora", {str(lora): 0.8}),
                         ("back_to_base", {})):
        out = pipe(**call, loras=loras)
        runs[label] = {k: round(v, 3) for k, v in out.timings.items() if k in ("adapters_s", "text_encoder_s", "denoise_s", "step_s", "total_s")}
        runs[label]["rss_gb"] = round(rss_gb(), 2)
        print(label, runs[label], file=sys.stderr, flush=True)
        if label == "lora":
            report["patched_weights"] = {c: len(v) for c, v in pipe.adapters._overrides.items()}
    report["runs"] = runs
    steps: dict[str, list[float]] = {"without": [], "with": []}
    for _ in range(args.alternate):
        for label, loras in (("without", {}), ("with", {str(lora): 0.8})):
            pipe(**call, loras=loras)  # the switch (and OpenVINO's compile)
            steps[label].append(round(pipe(**call, loras=loras).timings["step_s"], 3))
    if args.alternate:
        report["alternating_step_s"] = {**steps, "median": {k: sorted(v)[len(v) // 2] for k, v in steps.items()}}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
