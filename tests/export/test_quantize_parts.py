"""Dynamic int8 of a large ONNX model part by part (`leansd.export.quantize_parts`): the same graph, weights and outputs
as the whole-file quantizer, chosen for models whose external weights pass the threshold, and the int8 UNet still cut
into streaming parts and gated afterwards."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from leansd.export import quantize as q
from leansd.export import quantize_parts as qp
from tests.conftest import needs_torch

pytestmark = [needs_torch, pytest.mark.slow]


def _info(tiny_sd_dir: Path):
    from leansd.export import components as comp

    return comp.ModelInfo.from_configs(*(json.loads((tiny_sd_dir / d / "config.json").read_text()) for d in ("unet", "vae", "text_encoder")))


def _export_external(tiny_sd_dir: Path, component: str, folder: Path) -> tuple[Path, list[dict[str, np.ndarray]]]:
    """`component` of the tiny model exported with its weights in model.onnx_data (the layout of models over 2 GB),
    and two seeded inputs."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from leansd.export import components as comp
    from leansd.export.onnx import export_onnx
    from leansd.export.verify import verification_inputs

    info = _info(tiny_sd_dir)
    model = (UNet2DConditionModel if component == "unet" else CLIPTextModel).from_pretrained(tiny_sd_dir, subfolder=component)
    src = folder / component / "model.onnx"
    feeds = [verification_inputs(component, info, None)]
    feeds.append({k: np.ascontiguousarray(v[::-1]) if v.dtype == np.float32 else v for k, v in feeds[0].items()})
    export_onnx(component, comp.wrap(component, model.eval(), info), feeds[0], src, external_data_threshold=0)
    return src, feeds


def _graph(path: Path) -> tuple[Counter, dict[str, np.ndarray]]:
    """The model's nodes (without their names, as a multiset: the order of independent nodes may differ) and weights."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    return Counter(qp._signature(n) for n in model.graph.node), {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.fixture
def recorded_calls(monkeypatch) -> list[str]:
    """The files each `quantize_dynamic` call quantizes (the real quantizer still runs)."""
    import onnxruntime.quantization as ortq

    calls: list[str] = []
    real = ortq.quantize_dynamic

    def recording(model_input, model_output, **kwargs):
        calls.append(Path(model_input).name)
        return real(model_input, model_output, **kwargs)

    monkeypatch.setattr(ortq, "quantize_dynamic", recording)
    return calls


@pytest.mark.parametrize("component", ["unet", "text_encoder"])
def test_partwise_int8_is_the_whole_file_int8(component, tiny_sd_dir, tmp_path, monkeypatch, recorded_calls):
    src, feeds = _export_external(tiny_sd_dir, component, tmp_path)
    whole = tmp_path / "whole" / "model_int8.onnx"
    monkeypatch.setattr(qp, "PARTWISE_BYTES", 2**40)
    q.onnx_dynamic_int8(src, whole)
    assert recorded_calls == ["model.onnx"]
    monkeypatch.setattr(qp, "PARTWISE_BYTES", 0)
    parted = src.with_name("model_int8.onnx")
    q.onnx_dynamic_int8(src, parted)
    # No parts index: the exporter's default count for a model with external data.
    assert recorded_calls[1:] == [f".model.int8-part{i}.onnx" for i in range(qp.streaming.DEFAULT_PARTS)]
    assert sorted(p.name for p in src.parent.iterdir()) == ["model.onnx", "model.onnx_data", "model_int8.onnx"]

    # Each part's shape inference names unknown dimensions on its own; kept in the joined graph, names that collide
    # across parts made ONNX Runtime reuse buffers of different sizes (the full-size SDXL UNet failed so).
    import onnx

    joined = onnx.load(str(parted), load_external_data=False)
    assert not [d.dim_param for v in joined.graph.value_info for d in v.type.tensor_type.shape.dim if d.dim_param]
    whole_nodes, whole_weights = _graph(whole)
    parted_nodes, parted_weights = _graph(parted)
    assert parted_nodes == whole_nodes  # the same graph: every activation quantized once, no node lost or doubled
    assert parted_weights.keys() == whole_weights.keys()
    int8 = [n for n, w in whole_weights.items() if w.dtype == np.int8]
    assert len(int8) > 3 and all(np.array_equal(parted_weights[n], w) for n, w in whole_weights.items())
    for feed in feeds:
        a, b = (q.run_all("onnx", path, [feed])[0] for path in (whole, parted))
        for name in a:  # the same arithmetic; without the parts' dimension names ONNX Runtime may order sums differently
            np.testing.assert_allclose(b[name], a[name], rtol=1e-5, atol=1e-5, err_msg=name)


def test_partwise_follows_the_parts_index_and_the_int8_unet_is_still_cut_and_gated(tiny_sd_dir, tmp_path, monkeypatch, recorded_calls):
    from leansd.export import parts, streaming

    src, _ = _export_external(tiny_sd_dir, "unet", tmp_path)
    streaming.split(src, 3)
    monkeypatch.setattr(qp, "PARTWISE_BYTES", streaming.external_bytes(src) - 1)
    dst = src.with_name("model_int8.onnx")
    q.onnx_dynamic_int8(src, dst)
    assert recorded_calls == [f".model.int8-part{i}.onnx" for i in range(3)]
    assert not list(src.parent.glob(".*")), "scratch files left behind"
    index, entry = parts.split_int8_unet(dst, _info(tiny_sd_dir), None, 3)
    assert len(json.loads(index.read_text())["parts"]) == 3 and entry["psnr_db"] >= entry["min_psnr_db"]
    assert entry["whole_int8_psnr_db"] >= q.GATES["unet"].min_psnr_db


def test_models_at_or_under_the_threshold_are_quantized_whole(tiny_sd_dir, tmp_path, monkeypatch, recorded_calls):
    src, _ = _export_external(tiny_sd_dir, "text_encoder", tmp_path)
    monkeypatch.setattr(qp, "PARTWISE_BYTES", qp.streaming.external_bytes(src))
    q.onnx_dynamic_int8(src, src.with_name("model_int8.onnx"))
    assert recorded_calls == ["model.onnx"]
