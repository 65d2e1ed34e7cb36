"""The x4 upscaler at full size: time and peak memory of upscaling 128x128 -> 512x512 and 512x512 -> 2048x2048.

    python perf/upscaler_memory.py WORK_DIR [--steps 2] [--sizes 128,512]

Builds the released upscaler's architecture (leansd/export/configs/x4_upscaler: UNet 256-512-512-1024 with 7 input
channels, OpenCLIP-H text encoder, 3-level VAE) with seeded random weights (the same compute as the real weights),
exports it with sd-export (ONNX), then runs each (input size, mode) in a fresh process and records its peak RSS
(`ru_maxrss`), the UNet's time per step and the decode time. Modes: the default (whole decode) and low-memory
(weights loaded per stage, tiled VAE decode). Writes WORK_DIR/upscaler_memory.json and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "leansd" / "export" / "configs"


def build(out: Path) -> Path:
    """The upscaler's diffusers folder with random weights (skipped when it is already there)."""
    if (out / "model_index.json").is_file():
        return out
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    config = CONFIGS / "x4_upscaler"
    read = lambda name: json.loads((config / name).read_text())  # noqa: E731
    torch.manual_seed(0)
    with torch.no_grad():
        unet = UNet2DConditionModel.from_config(read("unet/config.json")).eval()
        vae = AutoencoderKL.from_config(read("vae/config.json")).eval()
        text = CLIPTextModel(CLIPTextConfig(**read("text_encoder/config.json"))).eval()
    tokenizer = CLIPTokenizer(str(CONFIGS / "clip" / "vocab.json"), str(CONFIGS / "clip" / "merges.txt"), model_max_length=77, pad_token="!")
    pipe = StableDiffusionUpscalePipeline(
        vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
        low_res_scheduler=DDPMScheduler.from_config(read("low_res_scheduler/scheduler_config.json")),
        scheduler=DDIMScheduler.from_config(read("scheduler/scheduler_config.json")), max_noise_level=350,
    )
    tmp = out.with_name(out.name + ".partial")
    pipe.save_pretrained(tmp)
    tmp.rename(out)
    return out


def run_one(model: str, size: int, steps: int, low_memory: bool) -> dict:
    """One upscale in this process; returns its timings and peak RSS."""
    import numpy as np

    import leansd

    start = time.perf_counter()
    pipe = leansd.load(model, backend="onnxruntime", low_memory=low_memory)
    image = (np.random.default_rng(0).random((size, size, 3)) * 255).astype(np.uint8)
    result: dict = {"input": size, "output": 4 * size, "mode": "low-memory (tiled decode)" if low_memory else "default"}
    try:
        out = pipe("a photo", image=image, num_inference_steps=steps, seed=0, output_type="np")
        result.update(ok=True, step_s=round(out.timings["step_s"], 2), decode_s=round(out.timings["decode_s"], 2),
                      total_s=round(time.perf_counter() - start, 1))
    except leansd.LeanSDError as exc:
        result.update(ok=False, error=str(exc))
    result["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", type=Path)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--sizes", default="128,512")
    parser.add_argument("--child", nargs=4, metavar=("MODEL", "SIZE", "STEPS", "LOW"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        model, size, steps, low = args.child
        print(json.dumps(run_one(model, int(size), int(steps), low == "1")))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    source = build(args.work / "x4-random")
    model = args.work / "x4-random-leansd"
    export_s = None
    if not (model / "leansd.json").is_file():
        from leansd.export import export_model

        began = time.perf_counter()
        export_model(source, model, backends="onnx")
        export_s = round(time.perf_counter() - began, 1)
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        for low in (False, True):
            child = subprocess.run([sys.executable, __file__, str(args.work), "--child", str(model), str(size), str(args.steps), "1" if low else "0"],
                                   capture_output=True, text=True, check=False)
            line = (child.stdout.strip().splitlines() or [""])[-1]
            rows.append(json.loads(line) if line.startswith("{") else {"input": size, "mode": "low" if low else "default", "ok": False,
                                                                      "error": (child.stderr.strip().splitlines() or ["?"])[-1]})
            print(rows[-1], flush=True)
    flags = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in Path("/proc/cpuinfo").read_text()]
    report = {"machine": f"{platform.processor() or platform.machine()}, {len(__import__('os').sched_getaffinity(0))} CPUs, {' '.join(flags)}",
              "export_s": export_s, "steps": args.steps, "rows": rows}
    (args.work / "upscaler_memory.json").write_text(json.dumps(report, indent=2))
    print("| input -> output | mode | UNet step | decode | peak RSS |\n|---|---|---|---|---|")
    for r in rows:
        if r.get("ok"):
            print(f"| {r['input']} -> {r['output']} | {r['mode']} | {r['step_s']} s | {r['decode_s']} s | {r['peak_rss_gb']} GB |")
        else:
            print(f"| {r['input']} -> {4 * r['input']} | {r['mode']} | refused/failed: {r.get('error', '')[:120]} | | {r.get('peak_rss_gb', '')} GB |")


if __name__ == "__main__":
    main()
