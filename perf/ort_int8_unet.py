"""ONNX Runtime int8 UNet recipes side by side: fp32, dynamic int8 (leansd's), static QDQ int8 (calibrated), with
OpenVINO's bf16 on the same UNet for scale.

    python perf/ort_int8_unet.py EXPORT_FOLDER WORK_FOLDER [--size 512] [--steps 4] [--calls 3] [--images 0]

EXPORT_FOLDER is a leansd ONNX fp32 export of an SD 1.x/2.x model (perf/cache/full/leansd). The script
1. generates with leansd's own fp32 pipeline (the export's scheduler, guidance 7.5) and records every UNet call's
   inputs and outputs: the first two of `quantize.CALIBRATION_PROMPTS` calibrate, the first held-out prompt
   measures (different prompt and seed);
2. writes two int8 UNets into WORK_FOLDER from the fused-attention fp32 graph (`unet/model.fused.onnx`, the graph
   leansd's ONNX Runtime sessions run; the attention stays float in all three):
   - dynamic (`--int8-unet-onnx dynamic`, the default): MatMul/Gemm/Gather weights int8 per channel in a 7-bit
     range, activations quantized per call; convolutions stay float;
   - static (`--int8-unet-onnx static`): QDQ, u8 activations and s8 per-channel weights (7-bit range) on every
     Conv, MatMul and Gemm but the UNet's first and last convolution, ranges from min/max calibration on the
     recorded calls (`sd-export` calibrates on all of `CALIBRATION_PROMPTS` at 8 steps, this on two at STEPS);
3. times one batch-2 call of each model at SIZE, alternating which goes first, and measures the worst held-out
   call's output PSNR against fp32 (20 log10(peak / RMS error)), the figure `sd-export` gates the UNet on (24 dB).
   The OpenVINO row runs the export's IR at OpenVINO's default precision (bf16 where the CPU has it) with a static
   shape, as leansd's `precision="bf16"` does.

With `--images N` it then generates the first N held-out prompts whole (20 steps at SIZE, guidance 7.5, leansd's
fp32 pipeline with its UNet session swapped for each int8 file) and gives each image's PSNR against the fp32 image
of the same prompt and seed, and the generation's time in this process (models already compiled).

Recordings and quantized files are kept in WORK_FOLDER and reused on the next run.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def _record(export: Path, work: Path, size: int, steps: int) -> tuple[list[dict], list[dict], list[dict]]:
    """Calibration inputs, held-out inputs and the held-out fp32 outputs (cached as .npz in `work`)."""
    from leansd.export import quantize

    cache = work / f"recorded-{size}-{steps}.npz"
    if not cache.exists():
        plan = quantize.RunPlan(height=size, width=size, steps=steps)
        calibration = quantize.record(export, "onnx", "fp32", quantize.CALIBRATION_PROMPTS[:2], quantize.CALIBRATION_SEED, plan)
        held_out = quantize.record(export, "onnx", "fp32", quantize.HELD_OUT_PROMPTS[:1], quantize.HELD_OUT_SEED, plan)
        arrays = {}
        for tag, calls in (("cal", calibration.inputs["unet"]), ("held", held_out.inputs["unet"]), ("ref", held_out.outputs["unet"])):
            for i, call in enumerate(calls):
                arrays.update({f"{tag}/{i}/{name}": value for name, value in call.items()})
        np.savez(work / "recorded.tmp.npz", **arrays)
        (work / "recorded.tmp.npz").replace(cache)
    data = np.load(cache)
    calls: dict[str, dict[int, dict]] = {"cal": {}, "held": {}, "ref": {}}
    for key in data.files:
        tag, i, name = key.split("/")
        calls[tag].setdefault(int(i), {})[name] = data[key]
    return ([calls["cal"][i] for i in sorted(calls["cal"])], [calls["held"][i] for i in sorted(calls["held"])],
            [calls["ref"][i] for i in sorted(calls["ref"])])


def _quantize(src: Path, work: Path, calibration: list[dict]) -> dict[str, Path]:
    """The two recipes as `sd-export --precision fp32,int8` writes them (`--int8-unet-onnx dynamic|static`)."""
    from leansd.export import quantize, quantize_parts

    files = {"dynamic": work / "dynamic" / "model.onnx", "static": work / "static" / "model.onnx"}
    for name, path in files.items():
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        if name == "dynamic":  # the whole file in one call: the part-wise path (for large files) cuts the graph
            quantize_parts.quantize_file(src, path, path.parent)
        else:
            quantize.onnx_static_int8(src, path, calibration)
        print(f"{name} int8 written in {time.perf_counter() - t:.0f} s", flush=True)
    return files


def _whole_images(export: Path, files: dict[str, Path], size: int, count: int) -> None:
    """Generate `count` held-out prompts with each UNet file in leansd's fp32 pipeline; print PSNR against fp32's."""
    from leansd.export import quantize
    from leansd.runtime.backends import SessionOptions, open_session
    from leansd.runtime.bundle import ModelBundle
    from leansd.runtime.loader import assemble
    from leansd.runtime.memory import MemoryPolicy

    prompts = [quantize.HELD_OUT_PROMPTS[i % len(quantize.HELD_OUT_PROMPTS)] for i in range(count)]
    images: dict[str, list[np.ndarray]] = {}
    for name, path in files.items():
        def swap(component, session, path=path):
            if component != "unet":
                return session
            session.close()
            return open_session(path, "onnxruntime", SessionOptions())

        pipe = assemble(ModelBundle.open(export), "onnxruntime", "fp32", SessionOptions(), MemoryPolicy(), hook=swap)
        try:
            images[name] = []
            for i, prompt in enumerate(prompts):
                t = time.perf_counter()
                out = pipe(prompt, num_inference_steps=20, guidance_scale=quantize.GUIDANCE, height=size, width=size,
                           seed=quantize.HELD_OUT_SEED + i, output_type="np")
                images[name].append(np.asarray(out.images[0], dtype=np.float64))
                note = "" if name == "fp32" else f", {_psnr(images['fp32'][i], images[name][i]):.1f} dB from the fp32 image"
                print(f"{name} image {i}: {time.perf_counter() - t:.1f} s{note}", flush=True)
        finally:
            pipe.close()


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.enable_mem_pattern = False  # as leansd's sessions
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class _OpenVINO:
    """The export's UNet IR compiled for one static shape at OpenVINO's default precision, with ONNX Runtime's verb."""

    def __init__(self, path: Path, feed: dict) -> None:
        import openvino as ov

        core = ov.Core()
        model = core.read_model(path)
        model.reshape({name: list(value.shape) for name, value in feed.items()})
        self._compiled = core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY"})
        self._request = self._compiled.create_infer_request()
        self.precision = str(self._compiled.get_property("INFERENCE_PRECISION_HINT"))

    def run(self, _names, feed: dict) -> list[np.ndarray]:
        out = self._request.infer(feed)
        return [np.array(out[self._compiled.outputs[0]], copy=True)]


def _psnr(ref: np.ndarray, got: np.ndarray) -> float:
    rms = float(np.sqrt(np.mean((ref.astype(np.float64) - got) ** 2)))
    return float("inf") if rms == 0 else 20 * np.log10(float(np.abs(ref).max()) / rms)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("export", type=Path)
    p.add_argument("work", type=Path)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=4, help="denoising steps of each recorded generation")
    p.add_argument("--calls", type=int, default=3, help="timed calls of each model")
    p.add_argument("--images", type=int, default=0, help="whole 20-step generations per file (see above)")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    src = args.export / "unet" / "model.fused.onnx"
    if not src.exists():
        sys.exit(f"{src} is missing; export the model with sd-export --backend onnx (it writes the fused graph with the UNet's parts)")

    calibration, held_out, reference = _record(args.export, args.work, args.size, args.steps)
    print(f"recorded {len(calibration)} calibration and {len(held_out)} held-out UNet calls", flush=True)
    files = {"fp32": src, **_quantize(src, args.work, calibration)}

    sessions, quality = {}, {}
    ir = args.export / "unet" / "openvino_model.xml"
    if ir.exists():
        files["openvino"] = ir
    for name, path in files.items():
        t = time.perf_counter()
        sessions[name] = _OpenVINO(path, held_out[0]) if name == "openvino" else _session(path)
        ready = time.perf_counter() - t
        outputs = [sessions[name].run(None, feed)[0] for feed in held_out]
        quality[name] = min(_psnr(ref["out_sample"], got) for ref, got in zip(reference, outputs))
        print(f"{name}: session {ready:.1f} s; worst held-out call {quality[name]:.1f} dB against the recorded fp32 output", flush=True)

    feed = held_out[len(held_out) // 2]
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for r in range(args.calls):
        for name in (list(sessions) if r % 2 == 0 else list(sessions)[::-1]):
            t = time.perf_counter()
            sessions[name].run(None, feed)
            times[name].append(time.perf_counter() - t)
        print(f"round {r}: " + ", ".join(f"{n} {times[n][-1]:.2f} s" for n in sessions), flush=True)

    base = statistics.median(times["fp32"])
    if "openvino" in sessions:
        print(f"openvino computes in {sessions['openvino'].precision}")
    print(f"\n| UNet (batch {feed['sample'].shape[0]}, {args.size}x{args.size}) | median call | vs fp32 | worst held-out PSNR vs fp32 |")
    print("|---|---|---|---|")
    for name in sessions:
        med = statistics.median(times[name])
        print(f"| {name} | {med:.2f} s | {base / med:.2f}x | {quality[name]:.1f} dB |")
    if args.images:
        sessions.clear()
        _whole_images(args.export, {k: v for k, v in files.items() if k != "openvino"}, args.size, args.images)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
