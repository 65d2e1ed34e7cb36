"""`sd-export --precision fp32,int8`: int8 files per backend, their gates against fp32, and the runtime running them."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from leansd.export import ExportError, ParityError
from leansd.export import quantize as q
from tests.conftest import needs_torch

COMPONENTS = ("text_encoder", "unet", "vae_encoder", "vae_decoder")
INT8_FILES = {"onnx": "model_int8.onnx", "openvino": "openvino_model_int8.xml"}
FP32_FILES = {"onnx": "model.onnx", "openvino": "openvino_model.xml"}


def test_parse_precisions():
    assert q.parse_precisions("fp32") == ("fp32",)
    assert q.parse_precisions("fp32,int8") == q.parse_precisions("int8") == q.parse_precisions(["int8", "fp32"]) == ("fp32", "int8")
    with pytest.raises(ExportError, match="unknown precision 'int4'"):
        q.parse_precisions("fp32,int4")
    with pytest.raises(ExportError, match="unknown precision"):
        q.parse_precisions("")


def test_spread_keeps_both_ends():
    assert q.spread(list(range(18)), 6) == [0, 3, 7, 10, 14, 17]
    assert q.spread([1, 2], 6) == [1, 2]


@needs_torch
def test_cli_rejects_an_unknown_precision_before_exporting(tmp_path, capsys, tiny_sd_dir):
    from leansd.export.cli import main

    assert main([str(tiny_sd_dir), str(tmp_path / "out"), "--precision", "int4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown precision 'int4'" in err[0] and "fp32,int8" in err[0]
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def int8_export(tiny_sd_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model exported for both backends with int8 variants, the ONNX UNet's streaming parts and the
    deep-cache parts."""
    from tests.export.fixtures import _export

    return _export(tiny_sd_dir, tmp_path_factory.mktemp("int8") / "tiny-sd-int8", precisions=("fp32", "int8"), unet_parts=3,
                   deep_cache=True)


@needs_torch
@pytest.mark.slow
def test_int8_files_manifest_and_hashes(int8_export):
    out = int8_export
    m = json.loads((out / "leansd.json").read_text())
    for c in COMPONENTS:
        for backend in ("onnx", "openvino"):
            entry = m["components"][c][backend]
            parity = m["parity"][c][backend]
            assert entry["fp32"] == f"{c}/{FP32_FILES[backend]}" and "max_rel" in parity["fp32"]
            int8 = parity["int8"]
            assert {"max_abs", "max_rel", "psnr_db", "min_psnr_db", "passed", "uses", "method"} <= set(int8)
            # On the tiny model every component passes its gate, so every entry points at a real int8 file.
            assert int8["passed"] and int8["uses"] == "int8" and int8["psnr_db"] >= int8["min_psnr_db"] == q.GATES[c].min_psnr_db
            assert entry["int8"] == f"{c}/{INT8_FILES[backend]}" and (out / entry["int8"]).is_file()
    for backend in ("onnx", "openvino"):
        run = m["parity"]["pipeline"][backend]["int8"]
        assert run["images"]["psnr_db"] > 25 and run["latents"]["psnr_db"] > 20
    assert m["int8"]["gates_min_psnr_db"] == {c: q.GATES[c].min_psnr_db for c in COMPONENTS}
    assert m["int8"]["unet_calibration_calls"] == len(q.CALIBRATION_PROMPTS) * (q.STEPS + 1)  # PNDM: one extra call
    on_disk = {p.relative_to(out).as_posix(): p for p in out.rglob("*") if p.is_file() and p.name != "leansd.json"}
    assert {"unet/model_int8.onnx", "unet/openvino_model_int8.xml", "unet/openvino_model_int8.bin"} <= set(on_disk)
    assert set(m["files"]) == set(on_disk), "scratch files left behind, or files missing from the manifest"
    for rel, entry in m["files"].items():
        assert entry["sha256"] == hashlib.sha256(on_disk[rel].read_bytes()).hexdigest()
    assert "nncf" in m["provenance"]


@needs_torch
@pytest.mark.slow
def test_int8_graphs_are_quantized(int8_export):
    import onnx

    ops = {n.op_type for n in onnx.load(str(int8_export / "unet" / "model_int8.onnx")).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} & ops and "ConvInteger" not in ops
    text_encoder = onnx.load(str(int8_export / "text_encoder" / "model_int8.onnx"))
    assert any(t.data_type == onnx.TensorProto.INT8 for t in text_encoder.graph.initializer)
    unet_ir = (int8_export / "unet" / "openvino_model_int8.xml").read_text()
    assert 'type="FakeQuantize"' in unet_ir and 'element_type="i8"' in unet_ir  # activations and weights
    vae_ir = (int8_export / "vae_decoder" / "openvino_model_int8.xml").read_text()
    assert 'type="FakeQuantize"' not in vae_ir and 'element_type="u8"' in vae_ir  # weights only (asymmetric)
    for c in COMPONENTS:
        fp32, int8 = ((int8_export / c / f"{stem}.bin").stat().st_size for stem in ("openvino_model", "openvino_model_int8"))
        assert int8 < fp32 / 2, c


@needs_torch
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_runtime_generates_with_int8_close_to_fp32(int8_export, backend):
    import leansd

    images = {}
    for precision in ("fp32", "int8"):
        pipe = leansd.load(int8_export, backend=backend, precision=precision)
        assert pipe.bundle.component_file("unet", backend, precision).name == (
            INT8_FILES["onnx" if backend == "onnxruntime" else "openvino"] if precision == "int8" else FP32_FILES["onnx" if backend == "onnxruntime" else "openvino"]
        )
        images[precision] = pipe("a lighthouse on a cliff", num_inference_steps=6, seed=11, output_type="np").images
        pipe.close()
    diff = np.abs(images["int8"] - images["fp32"])
    psnr = 20 * np.log10(1.0 / np.sqrt(np.mean(diff**2)))
    # int8 really ran (not bit-equal), yet the image stays close: measured 38 dB (OpenVINO hybrid), 55 dB (ONNX).
    assert diff.max() > 0 and psnr > 28 and diff.mean() < 0.02, (psnr, diff.mean())


@needs_torch
def test_openvino_int8_computes_its_float_operations_in_bf16_where_the_cpu_has_it(int8_export):
    """OpenVINO's own default on bf16 CPUs; in f32 the float half of an int8 UNet is 1.75x slower there."""
    import leansd
    from leansd.runtime import cpu_features
    from leansd.runtime.backends import SessionOptions, component_opener

    bundle = leansd.load(int8_export, backend="openvino", precision="int8").bundle
    native = cpu_features.openvino_bf16()
    for component in ("unet", "text_encoder", "vae_decoder"):
        session = component_opener(bundle, component, "openvino", "int8", SessionOptions())()
        assert session.path.name == INT8_FILES["openvino"] or component != "unet"
        assert session._config["INFERENCE_PRECISION_HINT"] == ("bf16" if native else "f32"), component
    fp32 = component_opener(bundle, "unet", "openvino", "fp32", SessionOptions())()
    assert fp32._config["INFERENCE_PRECISION_HINT"] == "f32"  # fp32 stays exact


@needs_torch
@pytest.mark.slow
def test_an_int8_folder_with_fp32_only_parts_names_the_precision_that_runs_deep_cache(int8_export, tmp_path):
    """OpenVINO-only folders exported before the parts had OpenVINO int8 files (with ONNX files beside them, OpenVINO
    reads the ONNX int8 parts): the error names the precision that works."""
    import leansd
    from leansd.runtime.errors import ModelFolderError

    folder = tmp_path / "older"
    shutil.copytree(int8_export, folder)
    m = json.loads((folder / "leansd.json").read_text())
    for part in ("unet_deep", "unet_shallow"):
        for backend in ("openvino", "onnx"):
            del m["components"][part][backend]["int8"]
    (folder / "leansd.json").write_text(json.dumps(m))
    pipe = leansd.load(folder, backend="openvino", precision="int8")
    with pytest.raises(ModelFolderError, match=r"no int8 deep-cache UNet parts for openvino; its parts are fp32 only: run deep_cache with precision fp32"):
        pipe("a lighthouse", num_inference_steps=2, deep_cache=2)
    pipe.close()


@pytest.fixture
def fp32_copy(int8_export, tmp_path) -> Path:
    """The tiny export's fp32 ONNX files and configs, without leansd.json: what the int8 stage starts from."""
    out = tmp_path / "model"
    shutil.copytree(int8_export, out, ignore=shutil.ignore_patterns("*_int8*", "openvino_model*", "leansd.json", "unet_deep", "unet_shallow"))
    return out


def _build(root: Path, gates: dict, monkeypatch, *, force: bool = False) -> q.Int8Result:
    from leansd.export import layout

    monkeypatch.setattr(q, "GATES", {c: gates.get(c, q.Gate(0.0, q.GATES[c].on_miss)) for c in COMPONENTS})

    def provisional(components):
        both = {c: {"onnx": {"fp32": f"{c}/model.onnx", "int8": components[c]["onnx"]}} for c in COMPONENTS}
        layout.write_json(root / "leansd.json", {"format": "leansd-model", "format_version": 1, "components": both})

    size = 32  # the tiny model's native size
    return q.build(root, ("onnx",), q.RunPlan(size, size), force=force, write_provisional_manifest=provisional)


@needs_torch
@pytest.mark.slow
def test_unet_under_its_gate_fails_unless_forced(fp32_copy, monkeypatch):
    with pytest.raises(ParityError, match=r"unet \(onnx\) .* dB < 200 dB.*--force-int8"):
        _build(fp32_copy, {"unet": q.Gate(200.0, "fail")}, monkeypatch)
    forced = _build(fp32_copy, {"unet": q.Gate(200.0, "fail")}, monkeypatch, force=True)
    entry = forced.parity["unet"]["onnx"]["int8"]
    assert not entry["passed"] and entry["uses"] == "int8" and forced.components["unet"]["onnx"] == "unet/model_int8.onnx"


@needs_torch
@pytest.mark.slow
def test_vae_decoder_under_its_gate_keeps_fp32(fp32_copy, monkeypatch):
    result = _build(fp32_copy, {"vae_decoder": q.Gate(200.0, "fp32")}, monkeypatch)
    entry = result.parity["vae_decoder"]["onnx"]["int8"]
    assert not entry["passed"] and entry["uses"] == "fp32" and entry["psnr_db"] < 200
    assert result.components["vae_decoder"]["onnx"] == "vae_decoder/model.onnx"
    assert not (fp32_copy / "vae_decoder" / "model_int8.onnx").exists()
    assert result.components["unet"]["onnx"] == "unet/model_int8.onnx"
    # The whole-generation check ran with the int8 UNet and the fp32 decoder.
    assert result.parity["pipeline"]["onnx"]["int8"]["images"]["psnr_db"] > 25


@needs_torch
@pytest.mark.slow
def test_hybrid_keeps_the_input_convolution_float(int8_export):
    import openvino as ov

    model = ov.Core().read_model(str(int8_export / "unet" / "openvino_model.xml"))
    assert [n.split("/")[2] for n in q._input_convolutions(model)] == ["conv_in"]
    weighted = q._weighted_matmuls(model)
    assert any("to_q" in n for n in weighted) and any("time_emb_proj" in n for n in weighted)


def test_weight_only_list_skips_products_of_activations():
    import openvino as ov
    import openvino.opset13 as ops

    x, y = ops.parameter([2, 4], np.float32, name="x"), ops.parameter([4, 3], np.float32, name="y")
    weight = ops.convert(ops.constant(np.ones((4, 3), np.float16)), np.float32)  # an fp16-stored weight
    with_weight = ops.matmul(x, weight, False, False)
    with_weight.set_friendly_name("linear")
    product = ops.matmul(ops.multiply(ops.constant(np.float32(0.5)), x), y, False, False)  # scaled activations
    product.set_friendly_name("product")
    ids = ops.parameter([2], np.int64, name="ids")
    table = ops.gather(ops.constant(np.ones((10, 4), np.float32)), ids, 0)
    table.set_friendly_name("embedding")
    shape = ops.gather(ops.shape_of(x), ops.constant(np.array([0], np.int64)), 0)
    shape.set_friendly_name("shape_index")
    model = ov.Model([with_weight, product, table, shape], [x, y, ids], "m")
    assert sorted(q._weighted_matmuls(model)) == ["embedding", "linear"]


@needs_torch
@pytest.mark.slow
def test_onnx_int8_reads_models_with_external_data(tiny_sd_dir, tmp_path):
    """The full UNet is stored with its weights in model.onnx_data; quantizing must read that layout."""
    from transformers import CLIPTextModel

    from leansd.export import components as comp
    from leansd.export.onnx import export_onnx

    info = comp.ModelInfo.from_configs(*(json.loads((tiny_sd_dir / d / "config.json").read_text()) for d in ("unet", "vae", "text_encoder")))
    wrapper = comp.wrap("text_encoder", CLIPTextModel.from_pretrained(tiny_sd_dir, subfolder="text_encoder"))
    feeds = [comp.make_inputs("text_encoder", info, batch=2, height=32, width=32, seed=s) for s in (0, 1)]
    src = tmp_path / "text_encoder" / "model.onnx"
    export_onnx("text_encoder", wrapper, feeds[0], src, external_data_threshold=0)
    q.onnx_dynamic_int8(src, src.with_name("model_int8.onnx"))
    assert sorted(p.name for p in src.parent.iterdir()) == ["model.onnx", "model.onnx_data", "model_int8.onnx"]
    figures = q.compare(q.run_all("onnx", src, feeds), q.run_all("onnx", src.with_name("model_int8.onnx"), feeds))
    assert figures["psnr_db"] >= q.GATES["text_encoder"].min_psnr_db


def test_int8_unet_streaming_parts_pass_the_int8_gate_and_run_in_low_memory_mode(int8_export):
    import leansd

    m = json.loads((int8_export / "leansd.json").read_text())
    assert m["components"]["unet_parts"]["onnx"] == {"fp32": "unet/model.parts.json", "int8": "unet/model_int8.parts.json"}
    entry = m["parity"]["unet_parts"]["onnx"]["int8"]
    assert entry["parts"] == 3 and entry["psnr_db"] >= entry["min_psnr_db"] == q.GATES["unet"].min_psnr_db
    assert entry["whole_fused_psnr_db"] >= entry["min_psnr_db"]
    kwargs = dict(prompt="a red circle", num_inference_steps=3, height=32, width=32, seed=4, output_type="np")
    low = leansd.load(int8_export, backend="onnxruntime", precision="int8", low_memory=True)
    assert low.unet.session.open().path.name == "model_int8.parts.json"  # streamed
    streamed = low(**kwargs).images
    whole = leansd.load(int8_export, backend="onnxruntime", precision="int8")(**kwargs).images
    # Two int8 executions (dynamic activation quantization, different kernels): close, not bit-equal.
    psnr = 10 * np.log10(1.0 / float(np.mean((streamed - whole) ** 2)))
    assert psnr >= 30, f"streamed int8 vs whole int8: {psnr:.1f} dB"


@needs_torch
@pytest.mark.slow
def test_int8_deep_cache_parts_pass_the_unet_gate_on_both_backends(int8_export):
    """ONNX: dynamic int8, as its UNet; OpenVINO: int8 MatMul weights, float arithmetic (the parts are not calibrated)."""
    import onnx
    import openvino as ov

    m = json.loads((int8_export / "leansd.json").read_text())
    for part in ("unet_deep", "unet_shallow"):
        for backend in ("onnx", "openvino"):
            assert m["components"][part][backend]["int8"] == f"{part}/{INT8_FILES[backend]}"
            entry = m["parity"][part][backend]["int8"]
            assert entry["passed"] and entry["psnr_db"] >= entry["min_psnr_db"] == q.GATES["unet"].min_psnr_db, (part, backend)
            assert entry["method"] == q.method(part, backend)
        ops = [n.op_type for n in onnx.load(str(int8_export / part / "model_int8.onnx")).graph.node]
        assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
        ir = (int8_export / part / "openvino_model_int8.xml").read_text()
        assert 'type="FakeQuantize"' not in ir and 'element_type="u8"' in ir  # int8 weights, float activations
        # Convolutions keep float weights: OpenVINO's CPU plugin would expand int8 ones into a float copy at compile time.
        model = ov.Core().read_model(str(int8_export / part / "openvino_model_int8.xml"))
        convolutions = [op for op in model.get_ops() if op.get_type_name() == "Convolution"]
        assert convolutions and all(op.input_value(1).get_node().get_type_name() == "Constant"
                                    and op.input_value(1).get_element_type() == ov.Type.f32 for op in convolutions), part
        fp32, int8 = ((int8_export / part / f"{stem}.bin").stat().st_size for stem in ("openvino_model", "openvino_model_int8"))
        assert int8 < fp32, part
    assert m["parity"]["unet_shallow"]["openvino"]["int8"]["float_operations_in"] in ("f32", "bf16")


@needs_torch
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_int8_deep_cache_opens_the_parts_int8_files_and_generates_close_to_fp32(int8_export, backend):
    import leansd

    kwargs = dict(prompt="a red circle", num_inference_steps=6, height=32, width=32, seed=4, output_type="np",
                  deep_cache=3, guidance_cutoff=0.3)
    images, opened = {}, {}
    for precision in ("fp32", "int8"):
        pipe = leansd.load(int8_export, backend=backend, precision=precision)
        images[precision] = pipe(**kwargs).images
        opened[precision] = [s.open().path.name for s in (pipe.models.denoiser.deep.session, pipe.models.denoiser.shallow.session)]
        pipe.close()
    files = FP32_FILES, INT8_FILES
    for precision, names in zip(("fp32", "int8"), files):
        assert opened[precision] == [names["onnx" if backend == "onnxruntime" else "openvino"]] * 2, opened
    diff = np.abs(images["int8"] - images["fp32"])
    psnr = 20 * np.log10(1.0 / np.sqrt(np.mean(diff**2)))
    assert diff.max() > 0 and psnr > 28, psnr


@needs_torch
@pytest.mark.slow
def test_gates_use_the_recorded_fp32_outputs_which_equal_a_fresh_fp32_run(fp32_copy, monkeypatch):
    """The recorder backend's fp32 models are not run again for the gates (the full-size SDXL UNet compiled a second
    time took the stage from 13.9 to 21.9 GiB): the recorded outputs are the reference, and they are what a fresh
    fp32 run of the same calls gives. Only the VAE encoder, whose inputs are made after recording, runs in fp32."""
    real_run_all, ran = q.run_all, []

    def spy(backend, path, feeds, *args):
        ran.append(Path(path).relative_to(fp32_copy).as_posix())
        return real_run_all(backend, path, feeds, *args)

    monkeypatch.setattr(q, "run_all", spy)
    _build(fp32_copy, {}, monkeypatch)
    assert [p for p in ran if "_int8" not in p] == ["vae_encoder/model.onnx"]
    assert sorted(p for p in ran if "_int8" in p) == sorted(f"{c}/model_int8.onnx" for c in COMPONENTS)

    held = q.record(fp32_copy, "onnx", "fp32", q.HELD_OUT_PROMPTS, q.HELD_OUT_SEED, q.RunPlan(32, 32))
    for component in ("text_encoder", "unet", "vae_decoder"):
        fresh = real_run_all("onnx", fp32_copy / component / "model.onnx", held.inputs[component])
        assert len(fresh) == len(held.outputs[component]) > 0
        for recorded, again in zip(held.outputs[component], fresh):
            for name, value in recorded.items():
                assert np.abs(again[name] - value).max() <= 1e-5 * max(1.0, float(np.abs(value).max())), (component, name)
