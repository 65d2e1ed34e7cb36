"""The int8 stage of an export, and the same stage added in place to a folder exported in fp32 only.

`sd-export --precision fp32,int8` runs `stage` (calibration, quantization, held-out measurement and gates: see
`leansd.export.quantize`) on the fp32 files it has just written. A folder exported without int8 (the full-size
exports are slow to redo) gets the same int8 files, parity entries and settings without re-exporting:

    python -m leansd.export.int8 FOLDER [--backend onnx|openvino|all] [--size N] [--force-int8] [--int8-unet auto|hybrid|weights]
                                        [--int8-unet-onnx dynamic|static]

It also writes the deep-cache parts' int8 files for each backend (when the folder has unet_deep/unet_shallow) and,
for ONNX, cuts the int8 UNet into as many streaming parts as the fp32 one has. leansd.json gets the entries where a fresh
`--precision fp32,int8` export puts them and is replaced atomically (temporary file, then rename). Any refusal or
gate miss leaves the folder as it was: the files it wrote are removed and leansd.json is restored.
"""
from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from leansd.export import components as comp
from leansd.export import deepcache, layout, model_folder, parts, quantize, verify
from leansd.export.errors import ExportError, ParityError
from leansd.export.progress import bar as progress_bar
from leansd.runtime.errors import LeanSDError
from leansd.runtime.manifest import MANIFEST, UNET, UNET_PARTS

PROG = "python -m leansd.export.int8"
BACKENDS = ("onnx", "openvino")
METRIC = ("; int8 entries compare the int8 file with the fp32 file of the same backend on held-out inputs (worst call), "
          "gated at min_psnr_db; pipeline.<backend>.int8 compares whole held-out generations (final latents, images in [0, 1])")


def static_entry(static: Mapping[str, int] | None, info: comp.ModelInfo) -> dict[str, int] | None:
    """The manifest's static_shapes: the export's batch and size, and the UNet's batch (twice, for guidance, unless the
    UNet takes its guidance as an input)."""
    return None if static is None else {**static, "unet_batch": info.unet_batch(static["batch"])}


def stage(root: Path, backends: Sequence[str], plan: quantize.RunPlan, components: Sequence[str], force: bool,
          progress: bool | None, provisional: Callable[[dict[str, dict[str, str]]], None], desc: str = "sd-export int8",
          unet_recipe: str = "auto", onnx_unet_recipe: str = "dynamic") -> quantize.Int8Result:
    """`quantize.build` under a progress bar: one step per recording, per component and backend, per whole generation.
    `unet_recipe`: how the OpenVINO UNet is quantized (`quantize.UNET_RECIPES`; "auto" decided by its size);
    `onnx_unet_recipe`: how the ONNX UNet is (`quantize.ONNX_UNET_RECIPES`)."""
    recipe = quantize.openvino_unet_recipe(root, unet_recipe)
    onnx_unet_recipe = quantize.check_onnx_unet_recipe(onnx_unet_recipe, root if "onnx" in backends else None)  # UNet size
    total = quantize.calibrates(backends, recipe, onnx_unet_recipe) + 1 + len(backends) * (len(components) + 1)  # see the step() calls in build()
    bar = progress_bar(total, desc, progress)
    done = [False]

    def step(what: str) -> None:
        if done[0]:
            bar.update()
        done[0] = True
        bar.set_postfix_str(what)

    try:
        result = quantize.build(root, backends, plan, components=components, force=force, unet_recipe=recipe,
                                onnx_unet_recipe=onnx_unet_recipe, step=step,
                                write_provisional_manifest=provisional)
        bar.update()
        return result
    finally:
        bar.close()


def deep_cache_int8(root: Path, part: str, info: comp.ModelInfo, static: Mapping[str, int] | None,
                    force: bool, backend: str = "onnx") -> tuple[str, dict[str, Any]]:
    """The int8 variant of a deep-cache part for `backend`, held to the UNet's int8 gate.

    ONNX gets dynamic int8, as its UNet (int8 MatMul weights, activations quantized at run time, convolutions float).
    OpenVINO gets the hybrid recipe's uncalibrated half: int8 MatMul and embedding weights, float convolutions
    (`quantize.openvino_matmul_weights_int8` says why not every weight). Calibrating the convolutions as the UNet's
    recipe does would need the recorded generations replayed through the deep part and two more NNCF passes over a
    whole UNet (about 13 min each for SD 1.5 at 512x512 on 2 cores). The OpenVINO int8 file is measured as the runtime
    runs it (its float operations in bf16 on a CPU with native bf16).

    The deep part is compared with its fp32 file; the shallow part is compared with its fp32 file on the int8
    deep part's features, i.e. the whole int8 chain against the fp32 chain, which is what a generation runs.
    """
    fp32_name, int8_name = quantize.FILES[backend]
    src, dst = root / part / fp32_name, root / part / int8_name
    floats = quantize.int8_float_precision() if backend == "openvino" else "f32"
    quantize.quantize_component(part, backend, src, dst, calibration=[])  # not calibrated: see above
    run_fp32 = verify.RUNNERS[backend]
    run_int8 = functools.partial(verify.run_openvino, inference_precision=floats) if backend == "openvino" else run_fp32
    feeds = verify.verification_inputs(UNET, info, static)
    if part == deepcache.PARTS[1]:
        deep = root / deepcache.PARTS[0]
        feeds = {**feeds, "deep_features": run_fp32(deep / fp32_name, feeds)["deep_features"]}
        int8_feeds = {**feeds, "deep_features": run_int8(deep / int8_name, feeds)["deep_features"]}
    else:
        int8_feeds = feeds
    measured = verify.measure(run_fp32(src, feeds), run_int8(dst, int8_feeds), 1.0)
    gate = quantize.GATES[UNET].min_psnr_db
    passed = measured.psnr_db >= gate
    if not passed and not force:
        raise ParityError(
            f"the int8 {part} ({backend}) reaches {measured.psnr_db:.1f} dB against fp32, under the UNet's {gate:g} dB gate; nothing "
            "was written. Export fp32 only, or pass --force-int8 to keep int8 files below the gate")
    entry = {k: v for k, v in measured.to_json().items() if k != "tolerance"}
    extra = {"float_operations_in": floats} if backend == "openvino" else {}
    return f"{part}/{int8_name}", {**entry, "min_psnr_db": gate, "passed": passed, "uses": "int8",
                                   "method": quantize.method(part, backend), **extra}


def deep_cache_parts_int8(root: Path, files: dict[str, Any], parity: dict[str, Any], backends: Sequence[str],
                          info: comp.ModelInfo, static: Mapping[str, int] | None, force: bool, progress: bool | None = False,
                          desc: str = "sd-export int8") -> None:
    """`deep_cache_int8` for every deep-cache part that `files` (the manifest's components) lists for each of
    `backends`, under a progress bar; each int8 file and parity entry is recorded in `files` and `parity` where a
    fresh export puts them. The deep part goes first: the shallow part's check reads the int8 deep part."""
    todo = [(backend, part) for backend in backends for part in deepcache.PARTS if backend in (files.get(part) or {})]
    if not todo:
        return
    bar = progress_bar(len(todo), desc, progress)
    try:
        for backend, part in todo:
            bar.set_postfix_str(f"{part}: {backend} int8")
            files[part][backend]["int8"], parity.setdefault(part, {}).setdefault(backend, {})["int8"] = deep_cache_int8(
                root, part, info, static, force, backend)
            bar.update()
    finally:
        bar.close()


def add_int8(folder: str | Path, backend: str = "onnx", size: int | None = None, force: bool = False,
             progress: bool | None = None, unet_recipe: str = "auto", onnx_unet_recipe: str = "dynamic") -> dict[str, Any]:
    """Add the int8 variants (`backend`: onnx, openvino or all of the folder's) to a model folder exported in fp32;
    `size` is the calibration / held-out image size (default: the export's); `unet_recipe` how the OpenVINO UNet is
    quantized ("auto", "hybrid" or "weights"), `onnx_unet_recipe` the ONNX UNet ("dynamic" or "static"; see
    `leansd.export.quantize`). Returns the new leansd.json."""
    root = Path(folder).expanduser()
    manifest = model_folder.read_manifest(root)
    info = model_folder.model_info(root)
    static = model_folder.static_shapes(manifest)
    plan = _plan(info, static, size)
    backends = _backends(root, manifest, backend)
    quantize.check_unet_recipe(unet_recipe)  # a wrong name fails before any slow step
    quantize.check_onnx_unet_recipe(onnx_unet_recipe)
    quantize.check_available(backends)
    if info.class_embeddings:
        raise ExportError("int8 is not available for the x4 upscaler yet; use its fp32 files")
    names = list(manifest["components"])
    before = {p for p in root.rglob("*")}
    original = (root / MANIFEST).read_bytes()
    try:
        merged = _quantize_and_merge(root, manifest, names, info, static, backends, plan, force, progress, unet_recipe,
                                    onnx_unet_recipe)
        for path in sorted(p for p in root.rglob("*") if p.is_file() and p not in before and p.name != MANIFEST):
            if isinstance(merged.get("files"), dict):
                merged["files"][path.relative_to(root).as_posix()] = {"sha256": layout.sha256_file(path), "bytes": path.stat().st_size}
        layout.write_json(root / MANIFEST, merged)
        return merged
    except BaseException:
        _restore(root, before, original)
        raise


def _quantize_and_merge(root: Path, manifest: dict[str, Any], names: list[str], info: comp.ModelInfo,
                        static: Mapping[str, int] | None, backends: tuple[str, ...], plan: quantize.RunPlan, force: bool,
                        progress: bool | None, unet_recipe: str = "auto", onnx_unet_recipe: str = "dynamic") -> dict[str, Any]:
    """Write and measure the int8 files; return `manifest` with them where a fresh fp32,int8 export records them."""
    files = json.loads(json.dumps(manifest["components"]))  # a deep copy: the original stays for a restore
    components = [n for n in quantize.GATES if n in files]

    def provisional(int8_files: dict[str, dict[str, str]]) -> None:
        # The folder's manifest plus the int8 files, so the runtime can load the int8 variant for the whole-pipeline check.
        both = {**files, **{n: {**files[n], **{b: {**files[n][b], "int8": int8_files[n][b]} for b in backends}} for n in components}}
        layout.write_json(root / MANIFEST, {**manifest, "components": both})

    int8 = stage(root, backends, plan, components, force, progress, provisional, desc=f"{PROG} {root.name}", unet_recipe=unet_recipe,
                 onnx_unet_recipe=onnx_unet_recipe)
    parity = json.loads(json.dumps(manifest.get("parity") or {}))
    for name, per_backend in int8.components.items():
        for backend, rel in per_backend.items():
            files[name][backend]["int8"] = rel
            parity.setdefault(name, {}).setdefault(backend, {}).update(int8.parity[name].get(backend, {}))
    parity["pipeline"] = {**parity.get("pipeline", {}), **int8.parity["pipeline"]}
    int8_unet = int8.components.get(UNET, {}).get("onnx")
    deep_cache_parts_int8(root, files, parity, backends, info, static, force, progress, f"{PROG} {root.name}")
    if "onnx" in (files.get(UNET_PARTS) or {}) and int8_unet and int8_unet.endswith(quantize.FILES["onnx"][1]):
        count = len(json.loads((root / files[UNET_PARTS]["onnx"]["fp32"]).read_text(encoding="utf-8"))["parts"])
        index, parity.setdefault(UNET_PARTS, {}).setdefault("onnx", {})["int8"] = parts.split_int8_unet(root / int8_unet, info, static, count)
        files[UNET_PARTS]["onnx"]["int8"] = index.relative_to(root).as_posix()
    merged = {**manifest, "components": files, "parity": parity}
    if METRIC not in str(merged.get("parity_metric", "")):
        merged["parity_metric"] = str(merged.get("parity_metric", "")) + METRIC
    merged = _insert_after(merged, "parity_metric", "int8", int8.settings)
    provenance = dict(merged.get("provenance") or {})
    nncf = sys.modules.get("nncf")  # loaded only when it quantized something
    provenance.update({**({"nncf": nncf.__version__} if nncf is not None else {}), "int8_added_at": layout.now_iso()})
    merged["provenance"] = provenance
    return merged


def _backends(root: Path, manifest: Mapping[str, Any], backend: str) -> tuple[str, ...]:
    """The backends to quantize, after checking that each has fp32 files and no int8 files yet."""
    if backend not in (*BACKENDS, "all"):
        raise ExportError(f"--backend {backend}: choose onnx, openvino or all")
    unet = manifest["components"].get(UNET) or {}
    have = [b for b in BACKENDS if (unet.get(b) or {}).get("fp32") and (root / unet[b]["fp32"]).is_file()]
    chosen = tuple(have if backend == "all" else [b for b in have if b == backend])
    with_int8 = [b for b in have if any("int8" in (entry.get(b) or {}) for entry in manifest["components"].values())]
    if not chosen:
        others = [b for b in have if b not in with_int8]
        if others:  # the other backend's fp32 files are there: quantizing those is the likelier intent
            raise ExportError(f"{root} has no fp32 {backend} files for the UNet, only {others[0]} files; pass "
                              f"--backend {others[0]}, or export the model again with sd-export --backend {backend}")
        raise ExportError(f"{root} has no fp32 {'files' if backend == 'all' else backend + ' files'} for the UNet; "
                          "pass a folder exported by sd-export" + (f" with --backend {backend}" if backend != "all" else ""))
    present = [b for b in chosen if b in with_int8]
    if present:
        raise ExportError(f"{root} already has int8 files for {' and '.join(present)}; nothing to do"
                          + ("" if backend != "all" else " (pass --backend with the other one)"))
    return chosen


def _plan(info: comp.ModelInfo, static: Mapping[str, int] | None, size: int | None) -> quantize.RunPlan:
    """The recorded generations' size: a static export's own, else `size`, else the model's default (what sd-export uses)."""
    if size is not None and (int(size) < 16 or int(size) % 8):
        raise ExportError(f"--size {size}: use a multiple of 8, at least 16 (e.g. 512)")
    if static is not None:
        if size is not None and (int(size), int(size)) != (static["height"], static["width"]):
            raise ExportError(f"--size {size}: this export has static shapes ({static['height']}x{static['width']}), "
                              "so it calibrates at that size; leave --size out")
        return quantize.RunPlan(height=static["height"], width=static["width"], batch=static["batch"])
    side = int(size) if size is not None else info.default_size
    return quantize.RunPlan(height=side, width=side)


def _insert_after(data: dict[str, Any], after: str, key: str, value: Any) -> dict[str, Any]:
    """`data` with `key` set, placed after `after` when it is new (the order a fresh export writes)."""
    if key in data or after not in data:
        return {**data, key: value}
    out: dict[str, Any] = {}
    for k, v in data.items():
        out[k] = v
        if k == after:
            out[key] = value
    return out


def _restore(root: Path, before: set[Path], original: bytes) -> None:
    """Remove what the upgrade wrote and put the original leansd.json back: the folder ends as it was."""
    for path in sorted((p for p in root.rglob("*") if p not in before), key=lambda p: len(p.parts), reverse=True):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    current = root / MANIFEST
    if not current.is_file() or current.read_bytes() != original:
        temp = root / f".{MANIFEST}.tmp"
        temp.write_bytes(original)
        temp.replace(current)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: add int8 variants to a model folder exported in fp32."""
    p = argparse.ArgumentParser(prog=PROG, description=(
        "Add int8 variants to a model folder written by sd-export in fp32 only, as `sd-export --precision fp32,int8` "
        "would have written them (calibrated, measured against fp32 and gated); leansd.json is updated in place."))
    p.add_argument("folder", help="the model folder (with leansd.json)")
    p.add_argument("--backend", default="onnx", choices=(*BACKENDS, "all"), help="which files to quantize (default: %(default)s)")
    p.add_argument("--size", type=int, metavar="N", help="image size of the calibration and held-out generations (default: the "
                   "model's; large models at their native size take hours on a small CPU, --size 512 takes minutes)")
    p.add_argument("--force-int8", action="store_true", help="keep int8 files that miss their quality gate")
    p.add_argument("--int8-unet", default="auto", choices=quantize.UNET_RECIPES, help=quantize.UNET_RECIPE_HELP)
    p.add_argument("--int8-unet-onnx", default="dynamic", choices=quantize.ONNX_UNET_RECIPES, help=quantize.ONNX_UNET_RECIPE_HELP)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        manifest = add_int8(args.folder, args.backend, args.size, args.force_int8, progress=False if args.quiet else None,
                            unet_recipe=args.int8_unet, onnx_unet_recipe=args.int8_unet_onnx)
    except (ExportError, LeanSDError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    for name, per_backend in manifest["parity"].items():
        for backend, entry in per_backend.items():
            if name != "pipeline" and "int8" in entry and "psnr_db" in entry["int8"]:
                print(f"{name} ({backend}): int8 {entry['int8']['psnr_db']:.1f} dB against fp32")
    return 0


if __name__ == "__main__":
    sys.exit(main())
