"""One UNet step on OpenVINO: leansd's IR against Optimum Intel's, same weights, same compile settings.

    python perf/ov_unet.py LEANSD_FOLDER OPTIMUM_FOLDER [--precision f32|bf16] [--calls 3] [--size 512]

Both IRs are read, reshaped to the static batch-2 input of a guided 512x512 step, compiled with the same
config (LATENCY hint, the precision hint) and called alternately, so a busy neighbour slows both alike.
Prints compile seconds, the median call, and the runtime graph's op counts where they differ: where a gap
between the two exports comes from.
"""
from __future__ import annotations

import argparse
import collections
import statistics
import time
from pathlib import Path

import numpy as np


def _inputs(model, size: int) -> dict:
    """Static shapes and random values for the UNet's three inputs, by name."""
    rng = np.random.default_rng(0)
    lat = size // 8
    feeds, shapes = {}, {}
    for port in model.inputs:
        name = port.get_any_name()
        if name == "sample":
            shape, value = [2, 4, lat, lat], rng.standard_normal((2, 4, lat, lat), dtype=np.float32)
        elif name == "timestep":
            rank = port.get_partial_shape().rank.get_length()
            shape = [2] if rank == 1 else []
            value = np.full(shape, 500, dtype=np.int64 if port.get_element_type().is_integral() else np.float32)
        elif name == "encoder_hidden_states":
            width = port.get_partial_shape()[2].get_length()
            shape, value = [2, 77, width], rng.standard_normal((2, 77, width), dtype=np.float32)
        else:
            raise SystemExit(f"unexpected UNet input {name}")
        feeds[name], shapes[name] = value, shape
    return feeds, shapes


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("leansd", type=Path)
    p.add_argument("optimum", type=Path)
    p.add_argument("--precision", default="f32", choices=("f32", "bf16"))
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--size", type=int, default=512)
    args = p.parse_args()
    import openvino as ov

    core = ov.Core()
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": args.precision}
    runs, graphs = {}, {}
    for name, folder in (("leansd", args.leansd), ("optimum", args.optimum)):
        model = core.read_model(str(folder / "unet" / "openvino_model.xml"))
        feeds, shapes = _inputs(model, args.size)
        model.reshape({k: ov.PartialShape(v) for k, v in shapes.items()})
        t0 = time.perf_counter()
        compiled = core.compile_model(model, "CPU", config)
        print(f"{name}: compiled in {time.perf_counter() - t0:.1f} s", flush=True)
        request = compiled.create_infer_request()
        request.infer(feeds)  # warm-up
        runs[name] = (request, feeds, [])
        graphs[name] = collections.Counter(op.get_rt_info()["layerType"].astype(str) for op in compiled.get_runtime_model().get_ops())
    for _ in range(args.calls):
        for name, (request, feeds, times) in runs.items():
            t0 = time.perf_counter()
            request.infer(feeds)
            times.append(time.perf_counter() - t0)
    for name, (_, _, times) in runs.items():
        print(f"{name}: UNet step (batch 2, {args.size}x{args.size}, {args.precision}) median {statistics.median(times):.3f} s "
              f"of {', '.join(f'{t:.3f}' for t in times)}")
    kinds = sorted(set(graphs["leansd"]) | set(graphs["optimum"]))
    diff = [(k, graphs["leansd"][k], graphs["optimum"][k]) for k in kinds if graphs["leansd"][k] != graphs["optimum"][k]]
    print("runtime graph ops that differ (leansd / optimum): " + ", ".join(f"{k} {a}/{b}" for k, a, b in diff))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
