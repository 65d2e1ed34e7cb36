"""PyTorch module -> ONNX file, with the weights in one external-data file when the model passes 2 GB.

Uses the TorchScript-based exporter (`torch.onnx.export(..., dynamo=False)`), as Optimum does. torch 2.9+
defaults to the torch.export-based exporter, but that one needs `onnxscript` (not a dependency here) and
specialises diffusers' shape-dependent branches (`dim % upsampling factor`) unless every one is declared;
the TorchScript exporter takes `dynamic_axes` and matches PyTorch to ~1e-6 on these models.
"""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from leansd.export import components as comp

DEFAULT_OPSET = 17
# Protobuf cannot serialise a message over 2 GiB; keep a margin for the graph itself.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26


def export_onnx(
    component: str,
    module: Any,
    example: dict[str, np.ndarray],
    path: Path,
    *,
    opset: int = DEFAULT_OPSET,
    dynamic: bool = True,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
    info: comp.ModelInfo | None = None,
) -> list[Path]:
    """Trace `module` (a `components.wrap` wrapper) on `example` and write `path`; return the files written.

    With `dynamic`, the batch, spatial and sequence axes stay symbolic; without, every shape is the example's.
    Weights go to `<path>_data` (one file, next to the model) when they exceed `external_data_threshold`.
    """
    import torch

    scratch = path.parent / f".{path.stem}-trace"
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        args = tuple(torch.from_numpy(example[name]) for name in comp.input_names(component, info))
        with torch.no_grad(), warnings.catch_warnings():
            # Tracer warnings about Python-side shape checks are expected and harmless here.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                args,
                str(scratch / "model.onnx"),
                input_names=comp.input_names(component, info),
                output_names=comp.output_names(component, info),
                dynamic_axes=comp.dynamic_axes(component, info) if dynamic else None,
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        return _relocate(scratch / "model.onnx", path, external_data_threshold)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _relocate(src: Path, dst: Path, threshold: int) -> list[Path]:
    """Save the traced model at `dst`, gathering its weights into a single external file when large.

    The exporter writes one file per tensor next to a model over 2 GB; runtimes and Optimum expect at most a
    single `model.onnx_data`.
    """
    import onnx

    model = onnx.load(str(src), load_external_data=True)
    weight_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if weight_bytes > threshold:
        data = dst.with_name(dst.name + "_data")
        onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name, size_threshold=1024)
        written = [dst, data]
    else:
        onnx.save_model(model, str(dst))
        written = [dst]
    del model
    return written
