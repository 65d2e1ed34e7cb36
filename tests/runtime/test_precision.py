"""precision="bf16": OpenVINO computes in bfloat16 on CPUs with native bf16 arithmetic, from the fp32 files.

Checked on the bundled model against its own fp32 images; on CPUs without bf16 the load is refused by name.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import leansd
from leansd import BackendError
from leansd.runtime import cpu_features
from leansd.runtime.loader import bundled_model_path

pytestmark = pytest.mark.skipif(not (bundled_model_path() / "leansd.json").is_file(), reason="no bundled model")
HAS_OPENVINO = importlib.util.find_spec("openvino") is not None
PROMPTS = ["a red circle on a blue background", "a yellow triangle on a purple background"]


def cpu_has_bf16() -> bool:
    return cpu_features.openvino_bf16()


def test_bf16_is_an_openvino_precision():
    with pytest.raises(BackendError, match="precision bf16 runs on the openvino backend; on onnxruntime use fp32 or int8"):
        leansd.load(backend="onnxruntime", precision="bf16")


@pytest.mark.skipif(not HAS_OPENVINO, reason="needs openvino")
def test_bf16_images_are_close_to_fp32_where_the_cpu_has_bf16():
    if not cpu_has_bf16():
        with pytest.raises(BackendError, match="no native bfloat16 arithmetic"):
            leansd.load(backend="openvino", precision="bf16")
        return
    fp32 = leansd.load(backend="openvino")
    bf16 = leansd.load(backend="openvino", precision="bf16")
    for k, prompt in enumerate(PROMPTS):
        exact = fp32(prompt, seed=1_000_000 + k, output_type="np").images
        approx = bf16(prompt, seed=1_000_000 + k, output_type="np").images
        psnr = 10 * np.log10(1.0 / float(np.mean((exact - approx) ** 2)))
        # bf16 keeps 8 mantissa bits: the images differ (so this is not fp32 run twice) but stay close.
        assert 0 < float(np.abs(exact - approx).max()) and psnr > 35, psnr
