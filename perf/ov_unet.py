"""One UNet step on OpenVINO: leansd's IR against Optimum Intel's, same weights, same compile settings.

    python perf/ov_unet.py LEANSD_FOLDER OPTIMUM_FOLDER [--precision f32|bf16|default] [--calls 3] [--size 512]
        [--leansd-file openvino_model.xml] [--optimum-file openvino_model.xml] [--profile]

Both IRs are read, reshaped to the static batch-2 input of a guided step (SD 1.x/2.x, or SDXL with its pooled
text embedding and time ids), compiled with the same config (LATENCY hint, the precision hint; `default` leaves
OpenVINO's own, bf16 on CPUs that have it) and called alternately, each going first in every other round, so a
busy neighbour slows both alike.
Prints compile seconds, the median call, and the runtime graph's op counts where they differ: where a gap
between the two exports comes from. `--profile` adds OpenVINO's per-node timings (PERF_COUNT), summed by node
and kernel type, for each IR's last call. `--leansd-file openvino_model_int8.xml` compares leansd's int8 UNet
with Optimum's default SDXL export, whose UNet has int8 weights.
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
        elif name == "text_embeds":  # SDXL's pooled embedding
            width = port.get_partial_shape()[1].get_length()
            shape, value = [2, width], rng.standard_normal((2, width), dtype=np.float32)
        elif name == "time_ids":  # SDXL's micro-conditioning: original size, crop, target size
            shape, value = [2, 6], np.tile(np.array([size, size, 0, 0, size, size], np.float32), (2, 1))
        else:
            raise SystemExit(f"unexpected UNet input {name}")
        feeds[name], shapes[name] = value, shape
    return feeds, shapes


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("leansd", type=Path)
    p.add_argument("optimum", type=Path)
    p.add_argument("--precision", default="f32", choices=("f32", "bf16", "default"))
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--leansd-file", default="openvino_model.xml", help="the IR in LEANSD_FOLDER/unet")
    p.add_argument("--optimum-file", default="openvino_model.xml", help="the IR in OPTIMUM_FOLDER/unet")
    p.add_argument("--profile", action="store_true", help="per-node timings of each IR's last call, by type")
    args = p.parse_args()
    import openvino as ov

    core = ov.Core()
    config = {"PERFORMANCE_HINT": "LATENCY", "PERF_COUNT": args.profile}
    if args.precision != "default":
        config["INFERENCE_PRECISION_HINT"] = args.precision
    runs, graphs = {}, {}
    for name, folder, file in (("leansd", args.leansd, args.leansd_file), ("optimum", args.optimum, args.optimum_file)):
        model = core.read_model(str(folder / "unet" / file))
        feeds, shapes = _inputs(model, args.size)
        model.reshape({k: ov.PartialShape(v) for k, v in shapes.items()})
        t0 = time.perf_counter()
        compiled = core.compile_model(model, "CPU", config)
        print(f"{name}: compiled in {time.perf_counter() - t0:.1f} s, computes in {compiled.get_property('INFERENCE_PRECISION_HINT')}",
              flush=True)
        request = compiled.create_infer_request()
        request.infer(feeds)  # warm-up
        runs[name] = (request, feeds, [])
        graphs[name] = collections.Counter(op.get_rt_info()["layerType"].astype(str) for op in compiled.get_runtime_model().get_ops())
    for call in range(args.calls):
        for name in sorted(runs, reverse=call % 2 == 1):  # alternate which goes first: no order advantage
            request, feeds, times = runs[name]
            t0 = time.perf_counter()
            request.infer(feeds)
            times.append(time.perf_counter() - t0)
    for name, (_, _, times) in runs.items():
        print(f"{name}: UNet step (batch 2, {args.size}x{args.size}, {args.precision}) median {statistics.median(times):.3f} s "
              f"of {', '.join(f'{t:.3f}' for t in times)}")
    kinds = sorted(set(graphs["leansd"]) | set(graphs["optimum"]))
    diff = [(k, graphs["leansd"][k], graphs["optimum"][k]) for k in kinds if graphs["leansd"][k] != graphs["optimum"][k]]
    print("runtime graph ops that differ (leansd / optimum): " + ", ".join(f"{k} {a}/{b}" for k, a, b in diff))
    if args.profile:
        _print_profiles({name: request for name, (request, _, _) in runs.items()})
    return 0


def _print_profiles(requests: dict) -> None:
    """Seconds of each IR's last call by (node type, kernel), the kinds that take 1 % or more of either call."""
    sums = {}
    for name, request in requests.items():
        seconds = collections.Counter()
        for node in request.profiling_info:
            if node.status == node.Status.EXECUTED:
                seconds[(node.node_type, node.exec_type)] += node.real_time.total_seconds()
        sums[name] = seconds
    totals = {name: sum(s.values()) for name, s in sums.items()}
    print("last call by node and kernel type (leansd / optimum seconds): total " + " / ".join(f"{t:.3f}" for t in totals.values()))
    kinds = sorted(set().union(*sums.values()), key=lambda k: -max(s[k] for s in sums.values()))
    for kind in kinds:
        if max(sums[name][kind] / totals[name] for name in sums) >= 0.01:
            print(f"  {kind[0]} ({kind[1]}): " + " / ".join(f"{sums[name][kind]:.3f}" for name in sums))


if __name__ == "__main__":
    raise SystemExit(main())
