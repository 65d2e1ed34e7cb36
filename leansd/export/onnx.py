"""PyTorch module -> ONNX file, with the weights in one external-data file when the model passes 2 GB.

Uses the TorchScript-based exporter (`torch.onnx.export(..., dynamo=False)`), as Optimum does. torch 2.9+
defaults to the torch.export-based exporter, but that one needs `onnxscript` (not a dependency here) and
specialises diffusers' shape-dependent branches (`dim % upsampling factor`) unless every one is declared;
the TorchScript exporter takes `dynamic_axes` and matches PyTorch to ~1e-6 on these models.
"""
from __future__ import annotations

import shutil
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from leansd.export import components as comp
from leansd.export.errors import ExportError

DEFAULT_OPSET = 17
# Protobuf cannot serialise a message over 2 GiB; keep a margin for the graph itself.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26
# Tensors under this many bytes stay inside the graph file (onnx.save_model's default size_threshold).
INLINE_LIMIT = 1024
COPY_CHUNK = 2**26


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
    single `model.onnx_data`. The pieces are streamed into it, each deleted once copied, so neither the weights
    (10 GB for SDXL's UNet) nor a second copy of them on disk is ever held.
    """
    import onnx

    model = onnx.load(str(src), load_external_data=False)
    initializers = model.graph.initializer
    external = [t for t in initializers if t.data_location == onnx.TensorProto.EXTERNAL]
    dst.parent.mkdir(parents=True, exist_ok=True)
    if sum(_stored_bytes(t, src.parent) for t in initializers) <= threshold:
        if external:  # small enough for one protobuf: take the weights inline
            onnx.load_external_data_for_model(model, str(src.parent))
        onnx.save_model(model, str(dst))
        return [dst]
    data = dst.with_name(dst.name + "_data")
    readers = Counter(_external_info(t)["location"] for t in external)
    with open(data, "wb") as out:
        for tensor in initializers:
            offset = out.tell()
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                info = _external_info(tensor)
                piece = src.parent / info["location"]
                _copy_range(piece, int(info.get("offset", 0)), int(info["length"]) if "length" in info else None, out)
                readers[info["location"]] -= 1
                if not readers[info["location"]]:
                    piece.unlink()  # keeps the disk peak at one copy of the weights
            elif len(tensor.raw_data) >= INLINE_LIMIT:
                out.write(tensor.raw_data)
                tensor.ClearField("raw_data")
            else:
                continue  # small tensors stay in the graph file, as onnx.save_model leaves them
            del tensor.external_data[:]
            for key, value in (("location", data.name), ("offset", offset), ("length", out.tell() - offset)):
                tensor.external_data.add(key=key, value=str(value))
            tensor.data_location = onnx.TensorProto.EXTERNAL
    onnx.save_model(model, str(dst))
    return [dst, data]


def _external_info(tensor: Any) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def _stored_bytes(tensor: Any, folder: Path) -> int:
    """Bytes of one initializer's data, without reading it."""
    info = _external_info(tensor)
    if not info:
        return len(tensor.raw_data) or tensor.ByteSize()
    return int(info["length"]) if "length" in info else (folder / info["location"]).stat().st_size - int(info.get("offset", 0))


def _copy_range(path: Path, offset: int, length: int | None, out: BinaryIO) -> None:
    """Append `length` bytes of `path` from `offset` (to its end when None) to `out`, in bounded chunks."""
    with open(path, "rb") as fh:
        fh.seek(offset)
        left = length
        while left is None or left > 0:
            chunk = fh.read(COPY_CHUNK if left is None else min(COPY_CHUNK, left))
            if not chunk:
                break
            out.write(chunk)
            left = None if left is None else left - len(chunk)
    if left:
        raise ExportError(f"{path} ends {left} bytes early; the ONNX exporter wrote a truncated weight file, export again")
