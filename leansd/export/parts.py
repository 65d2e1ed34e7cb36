"""Weight-streaming parts of exported components: cut a model into parts, check the streamed chain, record it.

The exporter cuts the fp32 ONNX UNet and SDXL's second text encoder (`manifest.PARTS_OF`) when they keep their
weights in an external data file (over 2 GB), or into as many parts as it is told (`--unet-parts`,
`--text-encoder-parts`), and checks the chain against PyTorch (`split_and_check`). A folder exported before a
component could be cut is upgraded in place, without re-exporting:

    python -m leansd.export.parts FOLDER [--component text_encoder_2] [--parts N]

cuts that component's fp32 ONNX file (`streaming.split`), runs the streamed parts and the whole file on the exporter's
verification inputs, holds them to the exporter's tolerance (max-rel), and adds the parts index, the parity and the
new files' hashes to `leansd.json` (written to a temporary file, then renamed over it). The cut itself is in
`leansd.export.streaming`; low-memory mode streams what it finds (`leansd.runtime.backends.component_opener`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from leansd.export import components as comp
from leansd.export import layout, model_folder, quantize, streaming, verify
from leansd.export.errors import ExportError, ParityError
from leansd.runtime.errors import LeanSDError
from leansd.runtime.manifest import MANIFEST, PARTS_OF, TEXT_ENCODER_2, UNET, fused_whole_file

# The exporter's option that sets each component's part count, and how messages name the component.
OPTION = {UNET: "--unet-parts", TEXT_ENCODER_2: "--text-encoder-parts"}
LABEL = {UNET: "UNet", TEXT_ENCODER_2: "second text encoder (text_encoder_2)"}
PROG = "python -m leansd.export.parts"


def check_count(component: str, count: int | None) -> None:
    """Refuse a part count that cannot be cut: 1, or below 0 (None: the default, 0: no parts)."""
    if count is not None and (int(count) < 0 or int(count) == 1):
        raise ExportError(f"{OPTION[component]} {count}: use 0 (no parts) or 2 and more")


def chosen_count(onnx_path: Path, forced: int | None) -> int:
    """The part count asked for, else the default for the file (none when its weights are inside it)."""
    return int(forced) if forced is not None else streaming.default_parts(onnx_path)


def split_and_check(component: str, onnx_path: Path, count: int, feeds: Mapping[str, np.ndarray],
                    reference: Mapping[str, np.ndarray], tolerance: float, *, against: str = "PyTorch",
                    fix: str | None = None) -> dict[str, Any]:
    """Cut the ONNX file into `count` parts and run them as low-memory mode does, and run the whole graph with fused
    attention when the cut wrote one; compare both with `reference` (the outputs of `against`) like model.onnx.
    Returns the parity entry; raises `ParityError` ending with `fix` (default: export without parts) past `tolerance`."""
    from leansd.runtime.backends import open_streamed_session

    index = streaming.split(onnx_path, count)
    session = open_streamed_session(index)
    outputs = session.run({spec.name: feeds[spec.name] for spec in session.inputs})
    parity = verify.measure(reference, outputs, tolerance)
    result = {**parity.to_json(), "parts": count}
    whole = fused_whole_file(index)
    if whole is not None:
        fused = verify.measure(reference, verify.run_onnxruntime(whole, feeds), tolerance)
        result["whole_fused"] = fused.to_json()
        if not fused.passed:
            parity = fused
    if not parity.passed:
        raise ParityError(
            f"the {LABEL.get(component, component)}'s ONNX Runtime files (streaming parts, fused attention) differ from {against} "
            f"by {parity.max_rel:.3g} (relative), over the tolerance {tolerance:g}, though model.onnx passed; nothing was written. "
            + (fix or f"Export with {OPTION.get(component, '--unet-parts')} 0 and report this")
        )
    return result


def split_int8_unet(int8_path: Path, info: comp.ModelInfo, static: Mapping[str, int] | None, count: int) -> tuple[Path, dict[str, Any]]:
    """Cut the int8 ONNX UNet like the fp32 one and hold the chain and the fused whole graph to the int8 gate.

    They are not compared with the whole int8 file at a float tolerance: dynamic int8 quantizes activations per call,
    and ONNX Runtime's fused int8 kernels (full optimisation) round differently from the unfused ones the parts run
    with, so two correct int8 executions already differ by about 1 % (relative). Each is measured against the fp32
    file instead, like the int8 file itself, and must pass the UNet's int8 gate (`quantize.GATES`).
    """
    from leansd.runtime.backends import open_streamed_session

    feeds = verify.verification_inputs(UNET, info, static)
    fp32 = verify.run_onnxruntime(int8_path.with_name("model.onnx"), feeds)
    gate = quantize.GATES[UNET].min_psnr_db
    index = streaming.split(int8_path, count)
    session = open_streamed_session(index)
    runs = {"whole_int8": verify.run_onnxruntime(int8_path, feeds),
            "parts": session.run({spec.name: feeds[spec.name] for spec in session.inputs})}
    fused_path = fused_whole_file(index)
    if fused_path is not None:
        runs["whole_fused"] = verify.run_onnxruntime(fused_path, feeds)
    measured = {name: verify.measure(fp32, out, 1.0) for name, out in runs.items()}
    for name in ("parts", "whole_fused"):
        if name in measured and measured[name].psnr_db < gate:
            raise ParityError(
                f"the int8 UNet's {name.replace('_', ' ')} reach {measured[name].psnr_db} dB against fp32 (the int8 file: "
                f"{measured['whole_int8'].psnr_db} dB), under the {gate:g} dB gate; nothing was written. "
                "Export with --unet-parts 0 and report this")
    result = {**{k: v for k, v in measured["parts"].to_json().items() if k != "tolerance"}, "parts": count,
              "reference": "the fp32 model.onnx", "min_psnr_db": gate}
    result.update({f"{name}_psnr_db": m.psnr_db for name, m in measured.items() if name != "parts"})
    return index, result


def add_parts(folder: str | os.PathLike[str], component: str = TEXT_ENCODER_2, count: int | None = None,
              tolerance: float = verify.DEFAULT_TOLERANCE) -> Path:
    """Cut `component`'s fp32 ONNX file in an exported model folder into parts (None: the exporter's default count),
    check the streamed chain against the whole file, record it in leansd.json; return the parts index's path."""
    root = Path(folder).expanduser()
    manifest = model_folder.read_manifest(root)
    onnx_path, key = _cuttable(root, manifest, component)
    if count is not None and int(count) < 2:
        raise ExportError(f"--parts {count}: a model is cut into 2 parts or more")
    count = chosen_count(onnx_path, count)
    if not count:
        raise ExportError(f"{onnx_path} keeps its weights inside the file (under 2 GB), so it is not cut by default; "
                          "pass --parts N (2 or more) to cut it anyway")
    feeds = verify.verification_inputs(component, model_folder.model_info(root), model_folder.static_shapes(manifest))
    reference = verify.run_onnxruntime(onnx_path, feeds)
    before = set(onnx_path.parent.iterdir())
    try:
        entry = split_and_check(component, onnx_path, count, feeds, reference, tolerance, against=f"the whole {onnx_path.name}",
                                fix="Leave this component whole and report this")
    except BaseException:
        for path in set(onnx_path.parent.iterdir()) - before:  # the parts written before the check failed
            path.unlink(missing_ok=True)
        raise
    index = streaming.index_path(onnx_path)
    manifest["components"][key] = {"onnx": {"fp32": index.relative_to(root).as_posix()}}
    parity = manifest.get("parity") if isinstance(manifest.get("parity"), dict) else {}
    parity[key] = {"onnx": {"fp32": {**entry, "reference": f"the whole {onnx_path.relative_to(root).as_posix()} (ONNX Runtime)"}}}
    manifest["parity"] = parity
    if isinstance(manifest.get("files"), dict):
        for path in _written(index):
            manifest["files"][path.relative_to(root).as_posix()] = {"sha256": layout.sha256_file(path), "bytes": path.stat().st_size}
    layout.write_json(root / MANIFEST, manifest)
    return index


def _cuttable(root: Path, manifest: Mapping[str, Any], component: str) -> tuple[Path, str]:
    """(the component's fp32 ONNX file, its parts key) after checking that it can be cut and is not cut yet."""
    if component not in PARTS_OF:
        raise ExportError(f"--component {component}: only {' and '.join(PARTS_OF)} can be cut into parts")
    key, components = PARTS_OF[component], manifest["components"]
    rel = ((components.get(component) or {}).get("onnx") or {}).get("fp32")
    if rel is None or not (root / rel).is_file():
        raise ExportError(f"{root} has no fp32 ONNX {component}"
                          f"{' (SD 1.x and 2.x models have one text encoder)' if component == TEXT_ENCODER_2 else ''}; "
                          "pass a folder that has one, or another --component")
    if key in components:
        raise ExportError(f"{root}: {component} is already cut into parts ({components[key]['onnx']['fp32']}); nothing to do")
    return root / rel, key


def _written(index: Path) -> list[Path]:
    """The files a cut wrote: the index, the parts and the whole graph with fused attention (if any)."""
    entry = json.loads(index.read_text(encoding="utf-8"))
    names = [p["file"] for p in entry["parts"]] + ([entry["whole"]] if entry.get("whole") else [])
    return [index] + [index.parent / name for name in names]


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: cut a component of an exported model folder into weight-streaming parts."""
    p = argparse.ArgumentParser(prog=PROG, description=(
        "Cut a component of a model folder written by sd-export into weight-streaming parts (low-memory mode on onnxruntime "
        "then loads one part at a time), check them against the whole file, and record them in leansd.json."))
    p.add_argument("folder", help="the model folder (with leansd.json)")
    p.add_argument("--component", default=TEXT_ENCODER_2, choices=sorted(PARTS_OF), help="what to cut (default: %(default)s)")
    p.add_argument("--parts", type=int, metavar="N", help="how many parts (default: sd-export's: 8, or more so that none holds "
                   "much over 640 MB, for files over 2 GB)")
    args = p.parse_args(argv)
    try:
        index = add_parts(args.folder, args.component, args.parts)
    except (ExportError, LeanSDError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    manifest = json.loads((Path(args.folder).expanduser() / MANIFEST).read_text(encoding="utf-8"))
    entry = manifest["parity"][PARTS_OF[args.component]]["onnx"]["fp32"]
    print(f"{args.component}: {entry['parts']} parts ({index}); max_rel {entry['max_rel']:g} against the whole file")
    return 0


if __name__ == "__main__":
    sys.exit(main())
