"""Compile memory and call time of one SD UNet IR (or the deep-cache deep part) on OpenVINO's CPU plugin, alone in a
fresh process.

    python perf/ov_compile_memory.py IR.xml [--precision f32|bf16] [--size 512]

Reads the IR, reshapes it to a guided step (batch 2; `ov_unet.py`'s inputs), compiles it with the precision hint and
calls it twice on random inputs. Prints compile seconds, resident memory after compiling (and how much of it is not
file-backed) and after the calls, the process's peak (ru_maxrss) and both call times. Plain OpenVINO: no leansd page
release, so the mapped weight file counts in full once read; the part that is not file-backed is what stays once
leansd has released those pages. How the OpenVINO int8 recipes for the deep-cache parts and for large UNets were
chosen (perf/README.md): run it on the fp32 IR and on each int8 candidate, one process each.
"""
from __future__ import annotations

import argparse
import resource
import time

from ov_unet import _inputs as guided_step_inputs  # perf/ is the script's folder, first on sys.path


def resident_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**30


def anonymous_gb() -> float:
    """The resident memory that is not a mapped file: what releasing the weight file's pages (as leansd does) leaves."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:")) / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ir")
    p.add_argument("--precision", default="f32", choices=("f32", "bf16"))
    p.add_argument("--size", type=int, default=512)
    args = p.parse_args()
    import openvino as ov

    core = ov.Core()
    model = core.read_model(args.ir)
    feeds, shapes = guided_step_inputs(model, args.size)
    model.reshape(shapes)
    start = time.perf_counter()
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": args.precision})
    compile_s = time.perf_counter() - start
    del model
    after_compile, anonymous = resident_gb(), anonymous_gb()
    request = compiled.create_infer_request()
    calls = []
    for _ in range(2):
        start = time.perf_counter()
        request.infer(feeds)
        calls.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"{args.ir} ({args.precision}): compile {compile_s:.1f} s; resident {after_compile:.2f} GB after compiling "
          f"({anonymous:.2f} GB not file-backed), "
          f"{resident_gb():.2f} GB after the calls; peak {peak:.2f} GB; calls {calls[0]:.2f}, {calls[1]:.2f} s")


if __name__ == "__main__":
    main()
