"""What the safety checker costs: SD 1.x's checker architecture (CLIP ViT-L/14 vision tower, 768-wide projection) with
seeded random weights, exported as sd-export does it, then timed per image on both backends through leansd's sessions.

    PYTHONPATH=. python perf/safety_checker.py [--out /tmp/leansd-checker]

Prints the export time and file size, the feature extractor's preprocessing time for a 512x512 image, each backend's
load + first run and warm time per image, and the largest difference from PyTorch. Random weights cost the same time
as the released ones (same shapes); the flags they give mean nothing.
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/leansd-checker"), help="scratch folder for the exported files")
    out = parser.parse_args().out
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    from leansd.export.onnx import export_onnx
    from leansd.export.safety_checker import convert_openvino, wrap
    from leansd.runtime.backends import SessionOptions, open_session
    from leansd.runtime.safety import CLIP_MEAN, CLIP_STD, FeatureExtractor

    torch.manual_seed(0)
    vision = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24, image_size=224, patch_size=14,
                  hidden_act="quick_gelu")
    graph = wrap(StableDiffusionSafetyChecker(CLIPConfig(vision_config=vision, projection_dim=768)).eval())
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    export_onnx("safety_checker", graph, {"clip_input": np.random.rand(1, 3, 224, 224).astype(np.float32)}, out / "model.onnx")
    convert_openvino(out / "model.onnx", out / "openvino_model.xml")
    print(f"export (ONNX + OpenVINO IR): {time.perf_counter() - start:.1f} s, {(out / 'model.onnx').stat().st_size / 1e6:.0f} MB")
    feeds = {"clip_input": np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32)}
    with torch.no_grad():
        special, concepts = (t.numpy() for t in graph(torch.from_numpy(feeds["clip_input"])))
    del graph
    extractor = FeatureExtractor(size=224, crop=(224, 224), resample=3, rescale_factor=1 / 255, mean=np.asarray(CLIP_MEAN, np.float32),
                                 std=np.asarray(CLIP_STD, np.float32))
    pixels = np.random.default_rng(1).integers(0, 256, (1, 512, 512, 3), dtype=np.uint8)
    start = time.perf_counter()
    for _ in range(10):
        extractor(pixels)
    print(f"preprocessing a 512x512 image: {(time.perf_counter() - start) * 100:.1f} ms")
    for backend, path in (("onnxruntime", out / "model.onnx"), ("openvino", out / "openvino_model.xml")):
        start = time.perf_counter()
        session = open_session(path, backend, SessionOptions())
        session.run(feeds)
        first = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(3):
            got = session.run(feeds)
        error = max(float(np.abs(got["cos_dist"] - concepts).max()), float(np.abs(got["special_cos_dist"] - special).max()))
        print(f"{backend}: load + first image {first:.2f} s, then {(time.perf_counter() - start) / 3:.3f} s per image; "
              f"max-abs vs PyTorch {error:.1e}")


if __name__ == "__main__":
    main()
