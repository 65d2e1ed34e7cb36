"""The export flow: check inputs -> per component: trace to ONNX, verify, convert to OpenVINO, verify
-> configs -> [int8: calibrate on the fp32 files, quantize, measure against fp32 (`quantize`)] -> leansd.json -> commit.

Everything is written into a temporary sibling of the output folder, which is renamed into place only after
every component passed verification (see `layout.StagingFolder`).
"""
from __future__ import annotations

import dataclasses
import gc
import os
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

from leansd.export import components as comp
from leansd.export import (attention, deepcache, depth_estimator, layout, parts, quantize, safety_checker, sdxl,
                           streaming, tiny_vae, token_merging, verify, weight_map)
from leansd.export import int8 as int8_stage
from leansd.export import lora as lora_fusion
from leansd.export.errors import ExportError
from leansd.export.onnx import DEFAULT_OPSET, export_onnx
from leansd.export.openvino import XML, convert_openvino
from leansd.export.progress import bar as progress_bar
from leansd.export.provenance import provenance
from leansd.export.sources import Source, copy_assets, optimum_model_index, resolve_source
from leansd.runtime import guidance_embedding
from leansd.runtime.manifest import PARTS_OF, TEXT_ENCODER_2, UNET, UNET_PARTS

BACKENDS = ("onnx", "openvino")
# Torch modules in export order, with the components cut from each; one module is in memory at a time.
MODULE_ORDER = (("text_encoder", ("text_encoder",)), ("unet", ("unet",)), ("vae", ("vae_encoder", "vae_decoder")))
# With --deep-cache, the UNet's two halves are cut from the same loaded module.
MODULE_ORDER_DEEP_CACHE = (("text_encoder", ("text_encoder",)), ("unet", ("unet", *comp.DEEP_CACHE_COMPONENTS)),
                           ("vae", ("vae_encoder", "vae_decoder")))
CONFIG_FROM = {"text_encoder": "text_encoder", sdxl.TEXT_ENCODER_2: sdxl.TEXT_ENCODER_2, "unet": "unet", "vae_encoder": "vae",
               "vae_decoder": "vae"}
TRACE_SEED = 0
# What diffusers' StableDiffusionUpscalePipeline uses when a call gives no steps or guidance.
UPSCALER_DEFAULTS = {"num_inference_steps": 75, "guidance_scale": 9.0}
# diffusers' StableDiffusionXL pipelines' defaults (text-to-image and image-to-image / refiner).
SDXL_DEFAULTS = {"guidance_scale": 5.0, "strength": 0.3, "inpaint_strength": 0.9999}
SDXL_INPAINT_DEFAULTS = {"guidance_scale": 7.5, "inpaint_strength": 0.9999}  # StableDiffusionXLInpaintPipeline's


def parse_backends(backends: str | Sequence[str]) -> tuple[str, ...]:
    names = [backends] if isinstance(backends, str) else list(backends)
    if names == ["all"]:
        return BACKENDS
    unknown = [b for b in names if b not in BACKENDS]
    if unknown or not names:
        raise ExportError(f"unknown backend {unknown[0] if unknown else '(none)'!r}; choose onnx, openvino or all")
    return tuple(b for b in BACKENDS if b in names)


def parse_tolerance(tolerance: float | Mapping[str, float] | None) -> dict[str, float]:
    """One relative tolerance per component, from a number (all components) or a {component: number} map."""
    table = dict.fromkeys((*comp.COMPONENTS, sdxl.TEXT_ENCODER_2), verify.DEFAULT_TOLERANCE)
    if tolerance is None:
        return table
    given = {c: tolerance for c in table} if isinstance(tolerance, (int, float)) else dict(tolerance)
    for name, value in given.items():
        if name not in table:
            raise ExportError(f"--tolerance names unknown component {name!r}; use one of {', '.join(comp.COMPONENTS)}")
        if not isinstance(value, (int, float)) or value < 0:
            raise ExportError(f"--tolerance for {name} must be a number >= 0, got {value!r}")
        table[name] = float(value)
    return table


def parse_static(static: Mapping[str, int] | None, info: comp.ModelInfo) -> dict[str, int] | None:
    """Fill in and check static shapes: sizes default to the model's native size, batch to 1."""
    if not static or all(v is None for v in static.values()):
        return None
    unknown = set(static) - {"height", "width", "batch"}
    if unknown:
        raise ExportError(f"unknown static shape key(s) {sorted(unknown)}; use height, width and batch")
    f = info.vae_scale_factor
    out = {"height": static.get("height") or info.default_size, "width": static.get("width") or info.default_size, "batch": static.get("batch") or 1}
    for key in ("height", "width"):
        value = int(out[key])
        if value <= 0 or value % f:
            low, high = max(f, value - value % f), value - value % f + f
            raise ExportError(f"--{key} {value} is not a positive multiple of {f}, this model's VAE scale factor; use {low} or {high}")
    if int(out["batch"]) < 1:
        raise ExportError(f"--batch must be at least 1, got {out['batch']}")
    return {k: int(v) for k, v in out.items()}


def family(source: Source) -> str:
    """`sdxl` for models with SDXL's added conditioning, `sd2` for OpenCLIP models (1024-wide cross-attention, or an
    OpenCLIP text encoder: GELU, where OpenAI CLIP's is quick GELU), else `sd1`."""
    if source.config("unet").get("addition_embed_type") == "text_time":
        return "sdxl"
    openclip = source.config("text_encoder").get("hidden_act") == "gelu"
    return "sd2" if openclip or int(source.config("unet").get("cross_attention_dim", 768)) == 1024 else "sd1"


def module_order(info: comp.ModelInfo, deep_cache: bool, merging: bool = False) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Torch modules in export order, with the components cut from each; one module is in memory at a time."""
    order = MODULE_ORDER_DEEP_CACHE if deep_cache else MODULE_ORDER
    if merging:  # the token-merged UNet graphs are traced from the same loaded UNet
        order = tuple((m, token_merging.with_merged(names) if m == "unet" else names) for m, names in order)
    xl = info.text_time
    if xl is None:
        return order
    text = [] if xl.first_encoder_layers is None else [order[0]]
    return (*text, (sdxl.TEXT_ENCODER_2, (sdxl.TEXT_ENCODER_2,)), *order[1:])


def export(
    source_spec: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    *,
    backends: str | Sequence[str] = "all",
    static_shapes: Mapping[str, int] | None = None,
    opset: int = DEFAULT_OPSET,
    overwrite: bool = False,
    tolerance: float | Mapping[str, float] | None = None,
    single_file_config: str | os.PathLike[str] | None = None,
    progress: bool | None = None,
    precisions: str | Sequence[str] = "fp32",
    force_int8: bool = False,
    deep_cache: bool = False,
    tiny_vae_source: str | os.PathLike[str] | None = None,
    unet_parts: int | None = None,
    text_encoder_parts: int | None = None,
    prediction_type: str | None = None,
    image_size: int | None = None,
    loras: Sequence[str | os.PathLike[str] | tuple] | None = None,
    token_merging_ratio: float | None = None,
    int8_unet: str = "auto",
    int8_unet_onnx: str = "dynamic",
) -> Path:
    """See `leansd.export.export_model`."""
    fused = lora_fusion.parse(loras)  # before any slow step: a missing file fails now
    merging = None if token_merging_ratio is None else token_merging.check_ratio(token_merging_ratio)
    forced_parts = {UNET: unet_parts, TEXT_ENCODER_2: text_encoder_parts}
    for component, count in forced_parts.items():
        parts.check_count(component, count)
    chosen = parse_backends(backends)
    wanted = quantize.parse_precisions(precisions)
    quantize.check_unet_recipe(int8_unet)
    quantize.check_onnx_unet_recipe(int8_unet_onnx)
    if "int8" in wanted:
        quantize.check_available(chosen)
    tolerances = parse_tolerance(tolerance)
    if not 14 <= int(opset) <= 20:
        raise ExportError(f"--opset {opset} is outside the supported range 14..20; use {DEFAULT_OPSET}")
    target = Path(output_dir).expanduser().absolute()
    layout.check_output(target, overwrite=overwrite)  # before any slow step
    source = resolve_source(source_spec, single_file_config=single_file_config, prediction_type=prediction_type, image_size=image_size)
    try:
        if source.kind != "single_file" and target.resolve() == source.config_dir.resolve():
            raise ExportError("the output folder is the source folder; choose another output folder")
        info = comp.ModelInfo.from_configs(source.config("unet"), source.config("vae"), source.optional_config("text_encoder"),
                                           source.optional_config(sdxl.TEXT_ENCODER_2))
        static = parse_static(static_shapes, info)
        if info.class_embeddings and "int8" in wanted:
            # Calibration runs text-to-image generations, which a class-conditioned UNet (the upscaler) cannot.
            raise ExportError("int8 is not available for the x4 upscaler yet; export it with --precision fp32")
        if deep_cache:
            deepcache.check_supported(source.config("unet"))
        if merging is not None:
            token_merging.check_supported(source.config("unet"))
        order = module_order(info, deep_cache, merging is not None)
        loaders = {}
        if tiny_vae_source is not None:
            tiny = tiny_vae.load(tiny_vae_source)  # small: load it now, so a bad path fails before the slow steps
            tiny_vae.check_compatible(dict(tiny.config), source.config("vae"))
            info = dataclasses.replace(info, tiny_vae_scaling_factor=float(tiny.config.get("scaling_factor", 1.0)))
            order = (*order, (tiny_vae.MODULE, (tiny_vae.COMPONENT,)))
            loaders[tiny_vae.MODULE] = lambda name: tiny
        for module_name in lora_fusion.COMPONENTS if fused else ():
            loaders[module_name] = lora_fusion.fusing_loader(source.load, fused, sdxl=info.text_time is not None)
        names = [n for _, members in order for n in members]
        tolerances.update({n: tolerances["unet"] for n in (*comp.DEEP_CACHE_COMPONENTS, *token_merging.BASE)})
        tolerances[tiny_vae.COMPONENT] = tolerances["vae_decoder"]
        with layout.StagingFolder(target, overwrite=overwrite) as staging:
            prints: dict[str, weight_map.Fingerprints] = {}
            parity = _export_components(source, staging.path, info, chosen, static, int(opset), tolerances, progress, order, loaders,
                                        forced_parts, prints, merging)
            # The safety checker, when the source has one (fp32 only; a CLIP vision tower, held to the text encoder's tolerance).
            checker = (safety_checker.export(source, staging.path, chosen, int(opset), tolerances["text_encoder"])
                       if safety_checker.present(source) else None)
            estimator = (depth_estimator.export(source, staging.path, chosen, int(opset), tolerances["unet"])
                         if depth_estimator.present(source) else None)
            _write_weight_map(staging.path, chosen, prints)
            _write_configs(source, staging.path, names)
            if tiny_vae.MODULE in loaders:
                tiny.save_config(staging.path / tiny_vae.COMPONENT)  # the runtime reads its scaling factor there
                del loaders[tiny_vae.MODULE], tiny
            files = {n: {b: {"fp32": f"{n}/{quantize.FILES[b][0]}"} for b in chosen} for n in names}
            if checker is not None:
                files[safety_checker.COMPONENT], parity[safety_checker.COMPONENT] = checker
            if estimator is not None:
                files[depth_estimator.COMPONENT], parity[depth_estimator.COMPONENT] = estimator
            for component, key in PARTS_OF.items():
                if key in parity:
                    files[key] = {"onnx": {"fp32": _relative(staging.path, streaming.index_path(staging.path / component / "model.onnx"))}}
            int8 = None
            if "int8" in wanted:
                int8 = _export_int8(staging.path, info, chosen, static, files, force_int8, progress, int8_unet, int8_unet_onnx)
                for name, per_backend in int8.components.items():
                    for backend, rel in per_backend.items():
                        files[name][backend]["int8"] = rel
                    parity[name] = {b: {**parity[name][b], **int8.parity[name].get(b, {})} for b in parity[name]}
                parity["pipeline"] = int8.parity["pipeline"]
                int8_unet = int8.components.get("unet", {}).get("onnx")
                int8_stage.deep_cache_parts_int8(staging.path, files, parity, chosen, info, static, force_int8, progress)
                if UNET_PARTS in parity and int8_unet:
                    count = parity[UNET_PARTS]["onnx"]["fp32"]["parts"]
                    index, parity[UNET_PARTS]["onnx"]["int8"] = parts.split_int8_unet(staging.path / int8_unet, info, static, count)
                    files[UNET_PARTS]["onnx"]["int8"] = _relative(staging.path, index)
            _write_manifest(source, staging.path, info, files, static, int(opset), parity, int8, names, [f.record() for f in fused], merging)
            return staging.commit()
    finally:
        source.close()


def _export_components(source, root: Path, info, backends, static, opset, tolerances, progress, order=MODULE_ORDER, loaders=None,
                       forced_parts: Mapping[str, int | None] | None = None, prints: dict | None = None,
                       merging: float | None = None) -> dict[str, Any]:
    """Trace, verify and convert every component; cut the ones in `manifest.PARTS_OF` into streaming parts (the counts in
    `forced_parts`, else each file's default); return the parity entries. `merging`: the token-merged graphs' ratio."""
    per_component = 1 + (1 if "onnx" in backends else 0) + (2 if "openvino" in backends else 0)
    bar = progress_bar(sum(len(names) for _, names in order) * per_component, "sd-export", progress)
    parity: dict[str, Any] = {}
    scratch = root / ".onnx-scratch"  # the ONNX files of an OpenVINO-only export
    try:
        for module_name, names in order:
            bar.set_postfix_str(f"loading {module_name}")
            module = (loaders or {}).get(module_name, source.load)(module_name)
            if prints is not None and module_name in MAPPED_MODULES:
                found = weight_map.fingerprints(module)  # for weight_map.json: run-time LoRA finds weights by them
                prints.update({name: found for name in names})
            traced = [_trace(name, module, root if "onnx" in backends else scratch, info, static, opset, bar, merging) for name in names]
            # The PyTorch weights are no longer needed: free them before ONNX Runtime and OpenVINO load theirs.
            del module
            gc.collect()
            for name, onnx_path, feeds, reference in traced:
                parity[name] = _verify_and_convert(name, onnx_path, feeds, reference, root, backends, tolerances[name], bar)
                if token_merging.kind(name) in comp.DEEP_CACHE_COMPONENTS and "onnx" in backends:
                    parity[name]["onnx"]["fp32"]["fused_attention"] = _fuse_and_check(name, onnx_path, feeds, reference, tolerances[name])
                if name in PARTS_OF and "onnx" in backends:
                    count = parts.chosen_count(onnx_path, (forced_parts or {}).get(name))
                    if count:
                        bar.set_postfix_str(f"{name}: {count} streaming parts")
                        parity[PARTS_OF[name]] = {"onnx": {"fp32": parts.split_and_check(name, onnx_path, count, feeds, reference,
                                                                                         tolerances[name])}}
    finally:
        bar.close()
        shutil.rmtree(scratch, ignore_errors=True)
    return parity


# The modules whose weights run-time adapters change (LoRA, textual inversion): the map covers their files.
MAPPED_MODULES = ("text_encoder", "text_encoder_2", "unet")


def _write_weight_map(root: Path, backends, prints: dict[str, weight_map.Fingerprints]) -> None:
    """weight_map.json for the fp32 files of the text encoder and UNet (and its deep-cache parts)."""
    files = {}
    for name, found in prints.items():
        for backend in backends:
            path = root / name / quantize.FILES[backend][0]
            if path.is_file():
                files[_relative(root, path)] = (name, found)
    weight_map.write(root, files)


def _trace(name, module, folder: Path, info, static, opset, bar, merging: float | None = None):
    """Export one component to ONNX; return (name, file, verification inputs, PyTorch's outputs for them). A
    token-merged graph is traced as its plain component with the merging applied to the module meanwhile."""
    if token_merging.kind(name) != name:
        with token_merging.applied(module, merging):  # set whenever the order holds merged graphs
            return _trace_as(token_merging.kind(name), name, module, folder, info, static, opset, bar)
    return _trace_as(name, name, module, folder, info, static, opset, bar)


def _trace_as(kind: str, name: str, module, folder: Path, info, static, opset, bar):
    wrapper = comp.wrap(kind, module, info)
    if static:
        trace = {"batch": static["batch"], "height": static["height"], "width": static["width"]}
    else:
        h, w = comp.trace_size(kind, info)
        trace = {"batch": 2, "height": h, "width": w}
    feeds = _verification_inputs(kind, info, static)
    reference = verify.run_torch(kind, wrapper, feeds, info)
    bar.set_postfix_str(f"{name}: ONNX export")
    onnx_path = folder / name / "model.onnx"
    export_onnx(kind, wrapper, comp.make_inputs(kind, info, seed=TRACE_SEED, **trace), onnx_path, opset=opset, dynamic=static is None,
                info=info)
    bar.update()
    return name, onnx_path, feeds, reference


_verification_inputs = verify.verification_inputs


def _verify_and_convert(name, onnx_path: Path, feeds, reference, root: Path, backends, tolerance, bar) -> dict[str, Any]:
    """Check the ONNX file, convert it to OpenVINO IR and check that; return the parity entries."""
    result: dict[str, Any] = {}
    if "onnx" in backends:
        bar.set_postfix_str(f"{name}: verify ONNX")
        result["onnx"] = {"fp32": verify.check(name, "onnx", onnx_path, feeds, reference, tolerance).to_json()}
        bar.update()
    if "openvino" in backends:
        bar.set_postfix_str(f"{name}: OpenVINO IR")
        xml = root / name / XML
        xml.parent.mkdir(parents=True, exist_ok=True)
        convert_openvino(onnx_path, xml)
        bar.update()
        bar.set_postfix_str(f"{name}: verify OpenVINO")
        result["openvino"] = {"fp32": verify.check(name, "openvino", xml, feeds, reference, tolerance).to_json()}
        bar.update()
    if token_merging.kind(name) in quantize.GATES and verify.bf16_capable():
        # OpenVINO reads the ONNX file when no IR was written, so bf16 is measured whichever backend was exported.
        bar.set_postfix_str(f"{name}: measure bf16")
        path = root / name / XML if "openvino" in backends else onnx_path
        result.setdefault("openvino", {})["bf16"] = verify.measure_bf16(path, feeds, reference, quantize.GATES[token_merging.kind(name)].min_psnr_db)
    if "onnx" not in backends:
        shutil.rmtree(onnx_path.parent, ignore_errors=True)
    return result


def _fuse_and_check(name: str, onnx_path: Path, feeds, reference, tolerance: float) -> dict[str, Any]:
    """Give a deep-cache part (read only by ONNX Runtime, and already converted to OpenVINO) fused attention, and
    check it against PyTorch again."""
    fused = attention.fuse_file(onnx_path)
    parity = verify.check(name, "onnx", onnx_path, feeds, reference, tolerance) if fused else None
    return {"blocks": fused, **({"max_rel": parity.max_rel, "psnr_db": parity.psnr_db} if parity else {})}


def _relative(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def _export_int8(root: Path, info, backends, static, files, force: bool, progress, unet_recipe: str,
                 onnx_unet_recipe: str) -> quantize.Int8Result:
    """Calibrate on the fp32 files just written, write and measure the int8 files (see `leansd.export.quantize`)."""
    size = (static["height"], static["width"]) if static else (info.default_size, info.default_size)
    plan = quantize.RunPlan(height=size[0], width=size[1], batch=static["batch"] if static else 1)
    components = [n for n in quantize.GATES if n in files]  # SDXL adds text_encoder_2; its refiner has no text_encoder

    def provisional(int8_files: dict[str, dict[str, str]]) -> None:
        # Just enough manifest for the runtime to load the int8 variant; replaced by the real one at the end.
        both = {n: {b: {**files[n][b], "int8": int8_files[n][b]} for b in backends} for n in components}
        layout.write_json(root / layout.MANIFEST, {"format": layout.FORMAT, "format_version": layout.FORMAT_VERSION, "components": both,
                                                   "static_shapes": int8_stage.static_entry(static, info)})

    try:
        return int8_stage.stage(root, backends, plan, components, force, progress, provisional, unet_recipe=unet_recipe,
                               onnx_unet_recipe=onnx_unet_recipe)
    finally:
        (root / layout.MANIFEST).unlink(missing_ok=True)


def _write_configs(source: Source, root: Path, names: Sequence[str] = comp.COMPONENTS) -> None:
    """Configs, tokenizer, scheduler and model_index.json: what the runtime needs beside the model files."""
    for name in (n for n in names if n in CONFIG_FROM):
        shutil.copyfile(source.config_dir / CONFIG_FROM[name] / "config.json", root / name / "config.json")
    copy_assets(source, root)
    layout.write_json(root / "model_index.json", optimum_model_index(source))


def _write_manifest(source: Source, root: Path, info, files, static, opset, parity, int8: quantize.Int8Result | None,
                    names: Sequence[str] = comp.COMPONENTS, loras: Sequence[dict] = (), merging: float | None = None) -> None:
    """leansd.json, written last: it hashes every other file."""
    metric = "max_rel = max|export - torch| / max|torch| <= tolerance; psnr_db = 20 log10(max|torch| / rms error)"
    if int8 is not None:
        metric += int8_stage.METRIC
    layout.write_manifest(
        root,
        {
            "name": Path(source.spec).stem if source.kind == "single_file" else Path(source.spec).name,
            "family": family(source),
            "prediction_type": str(source.config("scheduler").get("prediction_type", "epsilon")),
            "components": files,
            "static_shapes": int8_stage.static_entry(static, info),
            "files": None,
            "parity": parity,
            "parity_metric": metric,
            **({"int8": int8.settings} if int8 is not None else {}),
            **({"defaults": UPSCALER_DEFAULTS} if info.class_embeddings else {}),
            **({"defaults": guidance_embedding.DEFAULTS} if info.guidance_embedding else {}),
            **({"defaults": SDXL_INPAINT_DEFAULTS if info.unet_in_channels > info.latent_channels else SDXL_DEFAULTS}
               if info.text_time is not None else {}),
            "io": {n: comp.io_manifest(token_merging.kind(n), static, info) for n in names},
            **({"token_merging": token_merging.settings(merging)} if merging is not None else {}),
            "opset": opset,
            **({"loras": list(loras)} if loras else {}),  # fused into the weights: file, hashes, scale
            "provenance": provenance(source),
        },
    )
