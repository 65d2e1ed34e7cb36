"""Export the trained shapes model into the package as leansd's bundled default model.

Dev tool (needs the exporter's dependencies). Run from the repository root after training:

    python models/bundle_default.py [--weights models/shapes/weights] [--precision fp32,int8]

It exports with `sd-export`'s own code (every component verified against PyTorch), then records the name
and the generation defaults the model card recommends in `leansd.json`, and swaps the folder into
`leansd/bundled/shapes/` in one rename.

Only the ONNX files are shipped by default: OpenVINO reads ONNX directly (the runtime falls back to
`model.onnx` when a folder has no IR), so a second copy of the weights in IR form would double the package
for no gain on a model this small.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET = REPO / "leansd" / "bundled" / "shapes"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=REPO / "models" / "shapes" / "weights")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--backend", default="onnx", help="onnx (default), openvino or all")
    parser.add_argument("--steps", type=int, default=None, help="default steps (else training.json's recommendation)")
    parser.add_argument("--guidance", type=float, default=None, help="default guidance (else training.json's recommendation)")
    args = parser.parse_args()

    from leansd.export import export_model

    training = json.loads((args.weights / "training.json").read_text()) if (args.weights / "training.json").is_file() else {}
    recommended = training.get("recommended", {})
    staging = Path(tempfile.mkdtemp(prefix=".shapes-", dir=TARGET.parent if TARGET.parent.exists() else None))
    out = staging / "shapes"
    kwargs = {"precisions": tuple(args.precision.split(","))} if args.precision != "fp32" else {}
    export_model(args.weights, out, backends=args.backend, progress=True, **kwargs)
    manifest_path = out / "leansd.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["name"] = "leansd-shapes"
    manifest["defaults"] = {
        "num_inference_steps": args.steps or recommended.get("num_inference_steps", 20),
        "guidance_scale": args.guidance or recommended.get("guidance_scale", 7.5),
    }
    manifest["provenance"]["source"] = "models/shapes/weights (see models/shapes/README.md)"
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    TARGET.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if TARGET.exists():
        old = TARGET.with_name(".shapes-old")
        shutil.rmtree(old, ignore_errors=True)
        TARGET.rename(old)
    os.replace(out, TARGET)
    shutil.rmtree(staging, ignore_errors=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    size = sum(p.stat().st_size for p in TARGET.rglob("*") if p.is_file())
    print(f"bundled model written to {TARGET} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
