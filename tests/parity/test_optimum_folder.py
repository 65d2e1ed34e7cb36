"""leansd loads folders written by Optimum's exporter and gives diffusers' images from them."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")
pytest.importorskip("optimum.exporters.onnx")

import leansd  # noqa: E402

pytestmark = pytest.mark.needs_torch


@pytest.fixture(scope="module")
def optimum_onnx_dir(tiny_sd_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("optimum") / "tiny-sd-onnx"
    cli = shutil.which("optimum-cli") or str(Path(sys.executable).with_name("optimum-cli"))
    result = subprocess.run(
        [cli, "export", "onnx", "--model", str(tiny_sd_dir), "--task", "text-to-image", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return out


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("scheduler", [None, "euler_a"])
def test_optimum_onnx_export_gives_diffusers_images(tiny_sd_dir, optimum_onnx_dir, backend, scheduler):
    import diffusers

    assert not (optimum_onnx_dir / "leansd.json").exists()
    ref = diffusers.StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    if scheduler == "euler_a":
        ref.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(ref.scheduler.config)
    kwargs = dict(prompt="a blue square", num_inference_steps=4, guidance_scale=7.5, height=32, width=32)
    with torch.no_grad():
        expected = ref(**kwargs, generator=torch.Generator("cpu").manual_seed(9), output_type="np").images
    # OpenVINO reads the ONNX files of an ONNX-only folder directly.
    pipe = leansd.load(optimum_onnx_dir, backend=backend)
    got = pipe(**kwargs, seed=9, scheduler=scheduler, output_type="np").images
    assert float(np.abs(got - expected).max()) < 1e-4
