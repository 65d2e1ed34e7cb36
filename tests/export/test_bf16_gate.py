"""sd-export measures bf16 (OpenVINO computing the fp32 files in bfloat16) against PyTorch on CPUs that have native
bf16, and records the figure and its gate in leansd.json: what precision="auto" reads before it picks bf16.

On a CPU without bf16 nothing is recorded, and auto cannot pick bf16 for that folder (the reason says why).
"""
from __future__ import annotations

import json

import pytest

from leansd.export import quantize, verify

COMPONENTS = ("text_encoder", "unet", "vae_encoder", "vae_decoder")


def test_bf16_is_measured_and_gated_where_the_cpu_has_it(exported_tiny_sd):
    pytest.importorskip("openvino")
    parity = json.loads((exported_tiny_sd / "leansd.json").read_text())["parity"]
    if not verify.bf16_capable():
        assert all("bf16" not in parity[c].get("openvino", {}) for c in COMPONENTS)
        return
    for component in COMPONENTS:
        entry = parity[component]["openvino"]["bf16"]
        assert entry["min_psnr_db"] == quantize.GATES[component].min_psnr_db
        assert entry["passed"] == (entry["psnr_db"] >= entry["min_psnr_db"])
        # bf16 arithmetic really ran (fp32 OpenVINO measures ~130 dB here) and stayed close to PyTorch.
        assert entry["psnr_db"] < parity[component]["openvino"]["fp32"]["psnr_db"] - 20, (component, entry)
        assert entry["passed"], (component, entry)



def test_an_onnx_only_int8_export_records_bf16_beside_int8(tiny_sd_dir, tmp_path):
    """OpenVINO reads the ONNX file when no IR is written, so bf16 is measured for ONNX-only exports too, and the
    int8 figures are merged beside it."""
    from tests.export.fixtures import _export

    out = _export(tiny_sd_dir, tmp_path / "onnx-int8", backends="onnx", precisions="fp32,int8", force_int8=True)
    parity = json.loads((out / "leansd.json").read_text())["parity"]
    assert parity["unet"]["onnx"]["int8"]["passed"] in (True, False)
    assert ("bf16" in parity["unet"].get("openvino", {})) == verify.bf16_capable()
