"""`sd-export` of inpainting models (9-channel UNets): the folder, a single-file checkpoint, and every export option
(static shapes, deep cache, int8, UNet parts) with the UNet's 9-channel sample."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import needs_torch
from tests.parity.test_inpaint import PROMPT, init_image, square_mask

pytestmark = needs_torch


def unet_sample_shape(folder: Path) -> list:
    return json.loads((folder / "leansd.json").read_text())["io"]["unet"]["inputs"]["sample"]["shape"]


def test_inpainting_folder_exports_with_a_9_channel_sample(exported_tiny_sd_inpaint):
    out = exported_tiny_sd_inpaint
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusionInpaintPipeline"
    assert json.loads((out / "unet" / "config.json").read_text())["in_channels"] == 9
    assert unet_sample_shape(out) == ["batch_size", 9, "height", "width"]
    parity = json.loads((out / "leansd.json").read_text())["parity"]["unet"]
    assert all(parity[b]["fp32"]["max_rel"] <= parity[b]["fp32"]["tolerance"] for b in ("onnx", "openvino"))


def test_single_file_inpainting_checkpoint(tiny_sd_inpaint_dir, tiny_sd_dir, exported_tiny_sd_inpaint, tmp_path):
    """A 9-channel CompVis checkpoint read with text-to-image configs (as sd-v1-5-inpainting.ckpt with the shipped SD 1.x
    configs) becomes an inpainting export equal to the folder's."""
    from leansd.export import export_model
    from tests.export.compvis import write_checkpoint
    from tests.export.reference import run

    ckpt = tmp_path / "tiny-inpaint.safetensors"
    write_checkpoint(tiny_sd_inpaint_dir, ckpt)
    out = export_model(ckpt, tmp_path / "from-ckpt", backends="onnx", single_file_config=tiny_sd_dir, progress=False)
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusionInpaintPipeline"
    assert json.loads((out / "unet" / "config.json").read_text())["in_channels"] == 9
    feeds = {"sample": np.random.default_rng(0).standard_normal((2, 9, 16, 16)).astype(np.float32),
             "timestep": np.array([500.0, 20.0], np.float32),
             "encoder_hidden_states": np.random.default_rng(1).standard_normal((2, 77, 32)).astype(np.float32)}
    ours, folder = (run("onnx", f / "unet" / "model.onnx", feeds)["out_sample"] for f in (out, exported_tiny_sd_inpaint))
    assert float(np.abs(ours - folder).max()) <= 1e-6 * float(np.abs(folder).max())


@pytest.mark.slow
def test_export_options_take_the_9_channel_unet(tiny_sd_inpaint_dir, exported_tiny_sd_inpaint, tmp_path):
    """Deep cache, int8 (both backends: OpenVINO's calibration runs inpaint), UNet parts and static shapes."""
    import leansd
    from leansd.export import export_model
    from tests.export.fixtures import _export

    fast = _export(tiny_sd_inpaint_dir, tmp_path / "fast", deep_cache=True, precisions=("fp32", "int8"), unet_parts=2)
    static = export_model(tiny_sd_inpaint_dir, tmp_path / "static", backends="openvino", static_shapes={"height": 32, "width": 32},
                          progress=False)
    assert unet_sample_shape(static) == [2, 9, 16, 16]
    call = dict(prompt=PROMPT, image=init_image(), mask_image=square_mask(), num_inference_steps=6, seed=4, output_type="np")
    exact = leansd.load(exported_tiny_sd_inpaint, backend="onnxruntime")(**call).images
    variants = {
        "deep cache 2, onnxruntime": leansd.load(fast, backend="onnxruntime", deep_cache=2),
        "int8, onnxruntime": leansd.load(fast, backend="onnxruntime", precision="int8"),
        "int8, openvino": leansd.load(fast, backend="openvino", precision="int8"),
        "low memory (UNet parts), onnxruntime": leansd.load(fast, backend="onnxruntime", low_memory=True),
        "static, openvino": leansd.load(static, backend="openvino"),
    }
    for name, pipe in variants.items():
        got = pipe(**call).images
        psnr = 10 * np.log10(1.0 / max(float(((got - exact) ** 2).mean()), 1e-12))
        exact_modes = ("low memory", "static")
        assert (psnr > 80 if name.startswith(exact_modes) else psnr > 20), f"{name}: {psnr:.1f} dB against the exact export"
