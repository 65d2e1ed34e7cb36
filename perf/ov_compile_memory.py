"""Compile memory and call time of one SD UNet IR (or the deep-cache deep part) on OpenVINO's CPU plugin, alone in a
fresh process.

    python perf/ov_compile_memory.py IR.xml [--precision f32|bf16] [--size 512]

Reads the IR, reshapes it to a guided step (batch 2; SD 1.x/2.x inputs), compiles it with the precision hint and
calls it twice on random inputs. Prints compile seconds, resident memory after compiling and after the calls, the
process's peak (ru_maxrss) and both call times. Plain OpenVINO: no leansd page release, so the mapped weight file
counts in full once read. How the deep-cache parts' OpenVINO int8 recipe was chosen (perf/README.md, Zen 4 section):
run it on the fp32 IR and on each int8 candidate, one process each.
"""
from __future__ import annotations

import argparse
import resource
import time

import numpy as np


def resident_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**30


def guided_step_inputs(model, size: int) -> tuple[dict, dict]:
    """Static shapes and random values for the UNet's sample, timestep and text embeddings, by input name."""
    rng = np.random.default_rng(0)
    lat = size // 8
    shapes, feeds = {}, {}
    for port in model.inputs:
        name = port.get_any_name()
        if name == "sample":
            shapes[name], feeds[name] = [2, 4, lat, lat], rng.standard_normal((2, 4, lat, lat), dtype=np.float32)
        elif name == "timestep":
            shapes[name] = [2] if port.get_partial_shape().rank.get_length() == 1 else []
            feeds[name] = np.full(shapes[name], 500, np.int64 if port.get_element_type().is_integral() else np.float32)
        elif name == "encoder_hidden_states":
            width = port.get_partial_shape()[2].get_length()
            shapes[name], feeds[name] = [2, 77, width], rng.standard_normal((2, 77, width), dtype=np.float32)
        else:
            raise SystemExit(f"input {name!r} is not a plain SD UNet's: pass a UNet IR or unet_deep's (not unet_shallow's)")
    return shapes, feeds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ir")
    p.add_argument("--precision", default="f32", choices=("f32", "bf16"))
    p.add_argument("--size", type=int, default=512)
    args = p.parse_args()
    import openvino as ov

    core = ov.Core()
    model = core.read_model(args.ir)
    shapes, feeds = guided_step_inputs(model, args.size)
    model.reshape(shapes)
    start = time.perf_counter()
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": args.precision})
    compile_s = time.perf_counter() - start
    del model
    after_compile = resident_gb()
    request = compiled.create_infer_request()
    calls = []
    for _ in range(2):
        start = time.perf_counter()
        request.infer(feeds)
        calls.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"{args.ir} ({args.precision}): compile {compile_s:.1f} s; resident {after_compile:.2f} GB after compiling, "
          f"{resident_gb():.2f} GB after the calls; peak {peak:.2f} GB; calls {calls[0]:.2f}, {calls[1]:.2f} s")


if __name__ == "__main__":
    main()
