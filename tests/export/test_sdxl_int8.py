"""`sd-export --precision fp32,int8` on SDXL: both text encoders, the UNet with its added conditioning and the VAE
get int8 files on both backends, each measured against its fp32 file with the same gates as SD's; the refiner,
which has the second text encoder only, too. The runtime then generates with them, close to fp32 but not equal."""
from __future__ import annotations

import json

import numpy as np
import pytest

from leansd.export import quantize as q

pytest.importorskip("diffusers")
pytestmark = [pytest.mark.needs_torch, pytest.mark.slow]

INT8_FILES = {"onnx": "model_int8.onnx", "openvino": "openvino_model_int8.xml"}
BACKENDS = {"onnx": "onnxruntime", "openvino": "openvino"}


def _export(tmp_path_factory, name: str, **kwargs):
    from leansd.export import export_model
    from tests.tiny_sdxl import build_tiny_sdxl

    source = build_tiny_sdxl(tmp_path_factory.mktemp("models") / name, **kwargs)
    return export_model(source, tmp_path_factory.mktemp("exports") / name, precisions=("fp32", "int8"), progress=False)


@pytest.fixture(scope="module")
def base_int8(tmp_path_factory):
    return _export(tmp_path_factory, "tiny-sdxl-int8")


@pytest.fixture(scope="module")
def refiner_int8(tmp_path_factory):
    return _export(tmp_path_factory, "tiny-sdxl-refiner-int8", refiner=True)


@pytest.mark.parametrize("kind, components", [
    ("base", ("text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder")),
    ("refiner", ("text_encoder_2", "unet", "vae_encoder", "vae_decoder")),
])
def test_every_sdxl_component_gets_a_gated_int8_file(kind, components, request):
    out = request.getfixturevalue(f"{kind}_int8")
    m = json.loads((out / "leansd.json").read_text())
    assert m["int8"]["gates_min_psnr_db"] == {c: q.GATES[c].min_psnr_db for c in components}
    for c in components:
        for backend, int8_file in INT8_FILES.items():
            figures = m["parity"][c][backend]["int8"]
            assert figures["passed"] and figures["psnr_db"] >= q.GATES[c].min_psnr_db, (c, backend, figures)
            assert m["components"][c][backend]["int8"] == f"{c}/{int8_file}" and (out / c / int8_file).is_file()
    assert "text_encoder" not in m["components"] or kind == "base"
    ir = (out / "text_encoder_2" / "openvino_model_int8.xml").read_text()
    assert 'element_type="u8"' in ir  # the second encoder's weights really are int8
    for backend in INT8_FILES:
        assert m["parity"]["pipeline"][backend]["int8"]["images"]["psnr_db"] > 20


@pytest.mark.parametrize("backend", ["onnx", "openvino"])
def test_sdxl_generates_with_int8_close_to_fp32(base_int8, backend):
    import leansd

    images = {}
    for precision in ("fp32", "int8"):
        pipe = leansd.load(base_int8, backend=BACKENDS[backend], precision=precision)
        assert pipe.bundle.component_file("text_encoder_2", BACKENDS[backend], precision).name == (
            INT8_FILES[backend] if precision == "int8" else INT8_FILES[backend].replace("_int8", ""))
        images[precision] = pipe("a lighthouse on a cliff", num_inference_steps=4, seed=5, output_type="np").images
        pipe.close()
    diff = np.abs(images["int8"] - images["fp32"])
    psnr = 20 * np.log10(1.0 / np.sqrt(np.mean(diff**2)))
    assert diff.max() > 0 and psnr > 25, psnr  # int8 ran, and stayed close to fp32
