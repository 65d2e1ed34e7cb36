"""precision="auto": bf16 on OpenVINO where the CPU has native bf16 and the export measured it within its gate, else
int8 files that passed their gates, else fp32 — with the reason on the pipeline and in the PNG metadata.

The rules are checked on copies of the bundled model whose leansd.json records different measurements, with the
CPU's features given explicitly (so both kinds of CPU are covered on either); the end-to-end load uses this machine.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import leansd
from leansd.runtime import cli, cpu_features, precision_choice
from leansd.runtime.bundle import ModelBundle
from leansd.runtime.cpu_features import CpuFeatures
from leansd.runtime.loader import bundled_model_path

pytestmark = pytest.mark.skipif(not (bundled_model_path() / "leansd.json").is_file(), reason="no bundled model")
BF16_CPU = CpuFeatures(bf16=True)
AVX2_CPU = CpuFeatures(bf16=False)
COMPONENTS = ("text_encoder", "unet", "vae_encoder", "vae_decoder")


def _copy_with(tmp_path: Path, bf16: dict[str, bool] | None) -> ModelBundle:
    """The bundled model with a bf16 measurement per component (passed or not), or none recorded."""
    folder = tmp_path / "model"
    shutil.copytree(bundled_model_path(), folder)
    manifest = json.loads((folder / "leansd.json").read_text())
    for component in COMPONENTS:
        entry = manifest["parity"][component].setdefault("openvino", {})
        entry.pop("bf16", None)
        if bf16 is not None:
            entry["bf16"] = {"psnr_db": 40.0 if bf16[component] else 20.0, "min_psnr_db": 24.0, "passed": bf16[component]}
    (folder / "leansd.json").write_text(json.dumps(manifest))
    return ModelBundle.open(folder)


def test_bf16_is_picked_on_openvino_only_where_the_cpu_has_it_and_the_export_passed_it(tmp_path):
    pytest.importorskip("openvino")
    bundle = _copy_with(tmp_path, {c: True for c in COMPONENTS})
    chosen = precision_choice.choose(bundle, "openvino", BF16_CPU)
    assert chosen.precision == "bf16" and "native bf16" in chosen.reason
    assert precision_choice.preferred_backend(bundle, BF16_CPU) == "openvino"
    without = precision_choice.choose(bundle, "openvino", AVX2_CPU)
    assert without.precision == "fp32" and "no native bfloat16" in without.reason
    assert precision_choice.preferred_backend(bundle, AVX2_CPU) is None
    # ONNX Runtime has no bf16 CPU kernels: never bf16 there, whatever the CPU; nor on a GPU device (no CPU given).
    assert precision_choice.choose(bundle, "onnxruntime", BF16_CPU).precision == "fp32"
    assert precision_choice.choose(bundle, "openvino", None).precision == "fp32"


def test_bf16_is_not_picked_when_a_component_missed_its_gate_or_was_not_measured(tmp_path):
    pytest.importorskip("openvino")
    missed = _copy_with(tmp_path / "missed", {**{c: True for c in COMPONENTS}, "vae_decoder": False})
    chosen = precision_choice.choose(missed, "openvino", BF16_CPU)
    assert chosen.precision == "fp32" and "missed its quality gate at export (vae_decoder)" in chosen.reason
    unmeasured = _copy_with(tmp_path / "unmeasured", None)
    chosen = precision_choice.choose(unmeasured, "openvino", BF16_CPU)
    assert chosen.precision == "fp32" and "did not measure bf16" in chosen.reason


def test_int8_is_picked_only_when_its_files_exist_and_passed(tmp_path):
    bundle = _copy_with(tmp_path, None)
    chosen = precision_choice.choose(bundle, "onnxruntime", AVX2_CPU)
    assert chosen.precision == "fp32" and "no int8 files" in chosen.reason
    # An int8 UNet file recorded in the manifest, measured and passed (the copy of the fp32 file stands in for it).
    folder = bundle.root
    manifest = json.loads((folder / "leansd.json").read_text())
    for component in COMPONENTS:
        shutil.copyfile(folder / component / "model.onnx", folder / component / "model_int8.onnx")
        manifest["components"][component]["onnx"]["int8"] = f"{component}/model_int8.onnx"
        manifest["parity"][component]["onnx"]["int8"] = {"psnr_db": 50.0, "min_psnr_db": 24.0, "passed": component != "unet"}
    (folder / "leansd.json").write_text(json.dumps(manifest))
    chosen = precision_choice.choose(ModelBundle.open(folder), "onnxruntime", AVX2_CPU)
    assert chosen.precision == "fp32" and "int8 missed its quality gate at export (unet)" in chosen.reason
    manifest["parity"]["unet"]["onnx"]["int8"]["passed"] = True
    (folder / "leansd.json").write_text(json.dumps(manifest))
    chosen = precision_choice.choose(ModelBundle.open(folder), "onnxruntime", AVX2_CPU)
    assert chosen.precision == "int8" and "static" not in chosen.reason  # no recipe recorded: a dynamic-int8 folder


def test_a_static_int8_unet_is_picked_on_every_cpu_and_the_reason_says_whether_this_one_has_int8_dot_products(tmp_path):
    """The static recipe computes correctly everywhere (7-bit weights), so auto keeps picking it; the reason records
    whether the CPU has the VNNI/AMX instructions it was made for, so a slow AVX2 result can be told from a fault."""
    folder = _copy_with(tmp_path, None).root
    manifest = json.loads((folder / "leansd.json").read_text())
    for component in COMPONENTS:
        shutil.copyfile(folder / component / "model.onnx", folder / component / "model_int8.onnx")
        manifest["components"][component]["onnx"]["int8"] = f"{component}/model_int8.onnx"
        manifest["parity"][component]["onnx"]["int8"] = {"psnr_db": 30.0, "min_psnr_db": 24.0, "passed": True}
    manifest["int8"] = {**(manifest.get("int8") or {}), "onnx_unet_recipe": "static"}
    (folder / "leansd.json").write_text(json.dumps(manifest))
    bundle = ModelBundle.open(folder)
    assert precision_choice.onnx_unet_recipe(bundle) == "static"
    vnni = precision_choice.choose(bundle, "onnxruntime", CpuFeatures(bf16=False, int8_dot=True))
    assert vnni.precision == "int8" and "with this CPU's int8 dot products" in vnni.reason
    plain = precision_choice.choose(bundle, "onnxruntime", AVX2_CPU)
    assert plain.precision == "int8" and "made for CPUs with int8 dot products (VNNI/AMX), which this one lacks" in plain.reason


def test_int8_dot_products_are_read_from_the_cpu_flags_and_ignore_a_onednn_cap(monkeypatch):
    """VNNI/AMX int8 are what ONNX Runtime's own kernels dispatch on, so a oneDNN cap (a proxy for AVX2 in OpenVINO) does
    not hide them, while it does hide bf16."""
    for flags, expected in ((["avx2", "avx512_vnni"], True), (["avx2", "avx_vnni"], True), (["amx_int8"], True),
                            (["avx2", "fma"], False)):
        monkeypatch.setattr(cpu_features, "_linux_flags", lambda flags=flags: set(flags))
        monkeypatch.setattr(cpu_features, "_openvino_capabilities", lambda: set())
        for cap in ("", "AVX2"):
            monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
            cpu_features.detect.cache_clear()
            assert cpu_features.detect().int8_dot is expected, (flags, cap)
    monkeypatch.setattr(cpu_features, "_linux_flags", lambda: {"avx512_bf16", "avx512_vnni"})
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    cpu_features.detect.cache_clear()
    assert cpu_features.detect() == CpuFeatures(bf16=False, int8_dot=True)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    cpu_features.detect.cache_clear()
    assert cpu_features.detect() == CpuFeatures(bf16=True, int8_dot=True)
    cpu_features.detect.cache_clear()  # the next test reads this machine again


def test_auto_load_on_this_machine_reports_its_choice(tmp_path):
    pytest.importorskip("openvino")
    bundle = _copy_with(tmp_path, {c: True for c in COMPONENTS})
    cpu = cpu_features.detect()
    pipe = leansd.load(bundle.root, precision="auto")
    expected = "bf16" if cpu.bf16 else "fp32"
    assert (pipe.backend, pipe.precision) == ("openvino" if cpu.bf16 else pipe.backend, expected)
    assert pipe.precision_reason.startswith("auto:")
    out = pipe("a red circle on a blue background", seed=3, num_inference_steps=4, output_type="np")
    assert out.precision == expected
    assert cli.main(["a red circle", "--model", str(bundle.root), "--precision", "auto", "--steps", "2", "-o", str(tmp_path / "a.png"),
                     "-q"]) == 0
    with Image.open(tmp_path / "a.png") as img:
        assert f"{pipe.backend} {expected} (auto)" in img.text["parameters"]
    exact = leansd.load(bundle.root, backend=pipe.backend)("a red circle on a blue background", seed=3, num_inference_steps=4,
                                                           output_type="np")
    gap = float(np.abs(exact.images - out.images).max())
    # bf16 gives a different but close image; fp32 the same image.
    assert (0 < gap < 0.2) if expected == "bf16" else gap == 0.0, gap


def test_unknown_precision_names_the_choices():
    with pytest.raises(leansd.LeanSDError, match="unknown precision 'fp16': choose fp32, int8, bf16 or auto"):
        leansd.load(precision="fp16")


def test_an_isa_cap_below_bf16_counts_as_no_bf16(monkeypatch):
    """ONEDNN_MAX_CPU_ISA=AVX2 leaves OpenVINO no bf16 kernels though it still reports BF16: no bf16 hint then."""
    pytest.importorskip("openvino")
    from leansd.runtime.backends.openvino import cpu_precision_hint

    for cap, capped in (("AVX2", True), ("avx512_core_vnni", True), ("AVX512_CORE_BF16", False), ("", False)):
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        assert cpu_features.capped_below_bf16() is capped, cap
        if capped:
            assert not cpu_features.openvino_bf16()
            assert cpu_precision_hint("bf16-if-native") == "f32"
            with pytest.raises(leansd.LeanSDError, match=f"ONEDNN_MAX_CPU_ISA={cap.upper()} leaves OpenVINO no bfloat16 kernels"):
                cpu_precision_hint("bf16")


def test_auto_and_bf16_in_a_process_capped_to_avx2(tmp_path):
    """In a process that caps oneDNN to AVX2 (how AVX2 behaviour is checked on a newer CPU) auto runs fp32, the same
    image as an uncapped process within float rounding, and bf16 is refused by name instead of failing to compile."""
    pytest.importorskip("openvino")
    bundle = _copy_with(tmp_path, {c: True for c in COMPONENTS})
    script = f"""
import numpy as np, leansd
pipe = leansd.load({str(bundle.root)!r}, backend="openvino", precision="auto")
out = pipe("a red circle on a blue background", seed=3, num_inference_steps=3, output_type="np")
np.save({str(tmp_path / 'capped.npy')!r}, out.images)
print("auto:", pipe.precision)
try:
    leansd.load({str(bundle.root)!r}, backend="openvino", precision="bf16")("a red circle", num_inference_steps=1)
except leansd.LeanSDError as exc:
    print("bf16:", exc)
"""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "auto: fp32" in done.stdout
    assert "bf16: ONEDNN_MAX_CPU_ISA=AVX2 leaves OpenVINO no bfloat16 kernels" in done.stdout, done.stdout
    uncapped = leansd.load(bundle.root, backend="openvino")("a red circle on a blue background", seed=3, num_inference_steps=3,
                                                             output_type="np")
    assert np.abs(np.load(tmp_path / "capped.npy") - uncapped.images).max() < 1e-4
