"""Write `weight_map.json`: where each PyTorch weight of the text encoder(s) and UNet lives in the exported files.

See `leansd.runtime.adapters.weight_map` for the format and why it is needed. Weights are found by value: the
PyTorch module's 2-D and 4-D float weights are fingerprinted (as they are, and transposed for 2-D ones), and
every float32 initializer (ONNX) or constant (OpenVINO IR) of the same shape and bytes is that weight. Values,
not names, because the exporters name transposed linear weights anonymously; matching bytes is exact (random
weights never collide, and a weight the exporter merged with an identical one is left out: changing it would
change both).
"""
from __future__ import annotations

import hashlib
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np

from leansd.export import layout
from leansd.runtime.adapters.weight_map import FORMAT, FORMAT_VERSION, MAP_FILE

Fingerprints = dict[tuple[tuple[int, ...], str], tuple[str, bool]]  # (stored shape, digest) -> (param, transposed)


def _digest(data: bytes | memoryview) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def fingerprints(module: Any) -> Fingerprints:
    """Fingerprints of a PyTorch module's 2-D and 4-D float weights, as stored and (2-D) transposed."""
    out: Fingerprints = {}
    seen: dict = {}
    for name, param in module.named_parameters():
        if param.ndim not in (2, 4) or not param.dtype.is_floating_point:
            continue
        value = param.detach().float().cpu().numpy()
        layouts = [(value, False)] + ([(value.T, True)] if value.ndim == 2 else [])
        for stored, transposed in layouts:
            key = (tuple(stored.shape), _digest(np.ascontiguousarray(stored).tobytes()))
            if key in seen:  # two identical weights: the export may share one tensor between them
                out.pop(key, None)
                continue
            seen[key] = name
            out[key] = (name, transposed)
    return out


def _onnx_weights(model_path: Path) -> tuple[Path, list[tuple[str, tuple[int, ...], int, int]]]:
    """(data file, [(initializer name, shape, offset, byte length)]) for the float32 initializers of an ONNX file."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    raw = model_path.read_bytes()
    data_file, out, cursor = model_path, [], 0
    for tensor in model.graph.initializer:
        if tensor.data_type != onnx.TensorProto.FLOAT or len(tensor.dims) not in (2, 4):
            continue
        shape = tuple(int(d) for d in tensor.dims)
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in tensor.external_data}
            data_file = model_path.parent / info["location"]
            out.append((tensor.name, shape, int(info.get("offset", 0)), int(info["length"])))
        elif tensor.raw_data:
            # Initializers are serialized in order: the next match after the previous one is this tensor's bytes.
            at = raw.find(tensor.raw_data, cursor)
            if at < 0:
                at = raw.find(tensor.raw_data)
            if at >= 0:
                out.append((tensor.name, shape, at, len(tensor.raw_data)))
                cursor = at + len(tensor.raw_data)
    return data_file, out


def _openvino_weights(xml_path: Path) -> tuple[Path, list[tuple[str, tuple[int, ...], int, int]]]:
    """(the .bin, [(constant name, shape, offset, byte length)]) for the f32 constants of an OpenVINO IR."""
    out = []
    for layer in ET.parse(xml_path).getroot().iter("layer"):
        data = layer.find("data")
        if layer.get("type") != "Const" or data is None or data.get("element_type") != "f32":
            continue
        shape = tuple(int(d) for d in (data.get("shape") or "").split(",") if d.strip())
        if len(shape) in (2, 4):
            out.append((layer.get("name", ""), shape, int(data.get("offset", 0)), int(data.get("size", 0))))
    return xml_path.with_suffix(".bin"), out


def map_file(root: Path, model_path: Path, component: str, prints: Fingerprints) -> dict[str, Any]:
    """The map entry of one model file: each fingerprinted weight found in it, by PyTorch name."""
    data_file, weights = _onnx_weights(model_path) if model_path.suffix == ".onnx" else _openvino_weights(model_path)
    found: dict[str, list] = {}
    names_seen: dict[str, int] = {}
    with open(data_file, "rb") as fh:
        for name, shape, offset, length in weights:
            fh.seek(offset)
            hit = prints.get((shape, _digest(fh.read(length))))
            if hit is None or hit[0] in found:
                continue
            found[hit[0]] = [name, hit[1], offset, list(shape)]
            names_seen[name] = names_seen.get(name, 0) + 1
    found = {param: entry for param, entry in found.items() if names_seen[entry[0]] == 1}
    params = {name for name, _ in prints.values()}
    return {"component": component, "data": data_file.relative_to(root).as_posix(), "weights": dict(sorted(found.items())),
            "unmatched": sorted(params - set(found))}


def write(root: Path, files: dict[str, tuple[str, Fingerprints]]) -> Path:
    """Write `weight_map.json` for {relative model file: (component, fingerprints)}."""
    entries = {rel: map_file(root, root / rel, component, prints) for rel, (component, prints) in sorted(files.items())}
    path = root / MAP_FILE
    layout.write_json(path, {"format": FORMAT, "format_version": FORMAT_VERSION, "files": entries})
    return path


def add_to_folder(source_spec: str, folder: Path) -> Path:
    """Write `weight_map.json` into a folder exported before maps existed, from the source it was exported from
    (the weights are matched by value, so a different source finds nothing and is refused)."""
    from leansd.export.errors import ExportError
    from leansd.export.sources import resolve_source

    folder = Path(folder)
    if not (folder / layout.MANIFEST).is_file():
        raise ExportError(f"{folder} is not a folder written by sd-export (no {layout.MANIFEST})")
    source = resolve_source(source_spec)
    files: dict[str, tuple[str, Fingerprints]] = {}
    try:
        for module_name, components in (("text_encoder", ("text_encoder",)), ("text_encoder_2", ("text_encoder_2",)),
                                        ("unet", ("unet", "unet_deep", "unet_shallow"))):
            if not any((folder / c).is_dir() for c in components):
                continue  # SD 1.x/2.x have no second text encoder; SDXL's refiner no first
            prints = fingerprints(source.load(module_name))
            for component in components:
                for name in ("model.onnx", "openvino_model.xml"):
                    if (folder / component / name).is_file():
                        files[f"{component}/{name}"] = (component, prints)
    finally:
        source.close()
    path = write(folder, files)
    import json

    mapped = json.loads(path.read_text())["files"]
    empty = [rel for rel, entry in mapped.items() if not entry["weights"]]
    if empty:
        path.unlink()
        raise ExportError(f"none of the source's weights are in {empty[0]}: {source_spec} is not the model {folder} was exported from")
    manifest = json.loads((folder / layout.MANIFEST).read_text())
    manifest["files"] = layout.file_table(folder)
    layout.write_json(folder / layout.MANIFEST, manifest)
    return path


def main(argv: list[str] | None = None) -> int:
    """`python -m leansd.export.weight_map SOURCE FOLDER`: add the weight map run-time LoRA needs to an older export."""
    import argparse
    import sys

    from leansd.export.errors import ExportError

    parser = argparse.ArgumentParser(prog="python -m leansd.export.weight_map", description=main.__doc__)
    parser.add_argument("source", help="the diffusers folder or checkpoint FOLDER was exported from")
    parser.add_argument("folder", type=Path, help="a model folder written by sd-export")
    args = parser.parse_args(argv)
    try:
        print(add_to_folder(args.source, args.folder))
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
