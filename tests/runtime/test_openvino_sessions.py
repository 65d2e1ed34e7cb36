"""OpenVINO sessions keep a compiled model per input shape (two at most; one in low-memory mode), so a guidance
cutoff, which switches the UNet between two batch sizes in every image, compiles each shape once."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import leansd
from leansd.runtime.loader import bundled_model_path

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("openvino") is None or not (bundled_model_path() / "leansd.json").is_file(),
    reason="needs openvino and the bundled model",
)
KWARGS = dict(prompt="a red circle on a blue background", num_inference_steps=4, seed=3, output_type="np", guidance_cutoff=0.5)


# Low-memory mode splits guidance into two calls of the prompt's batch, so its UNet sees one batch size anyway.
@pytest.mark.parametrize("low_memory, unet_batches", [(False, {1, 2}), (True, {1})])
def test_a_guidance_cutoff_compiles_each_unet_shape_once(monkeypatch, low_memory, unet_batches):
    from leansd.runtime.backends import openvino as backend

    real, compiled = backend.core(), []

    class CountingCore:
        def __getattr__(self, name):
            return getattr(real, name)

        def compile_model(self, model, *args, **kwargs):
            compiled.append(tuple(tuple(p.get_partial_shape().to_shape()) for p in model.inputs))
            return real.compile_model(model, *args, **kwargs)

    monkeypatch.setattr(backend, "core", lambda: CountingCore())
    pipe = leansd.load(backend="openvino", low_memory=low_memory)
    first = pipe(**KWARGS).images
    after_first = len(compiled)
    second = pipe(**KWARGS).images
    np.testing.assert_array_equal(first, second)
    if not low_memory:  # models stay loaded: the second image compiles nothing
        assert len(compiled) == after_first, compiled[after_first:]
    assert {shapes[0][0] for shapes in compiled if len(shapes) == 3} == unet_batches  # sample, timestep, text: the UNet
