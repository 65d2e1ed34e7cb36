"""OpenVINO sessions compile for the shapes they are called with; a guidance cutoff, which switches the UNet between
two batch sizes in every image, gets one model compiled for both (batch 1..2), once per pipeline."""
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
@pytest.mark.parametrize("low_memory, unet_batches", [(False, ["1..2"]), (True, ["1"])])
def test_a_guidance_cutoff_compiles_each_unet_shape_once(monkeypatch, low_memory, unet_batches):
    from leansd.runtime.backends import openvino as backend

    real, compiled = backend.core(), []

    class CountingCore:
        def __getattr__(self, name):
            return getattr(real, name)

        def compile_model(self, model, *args, **kwargs):
            compiled.append(tuple(str(p.get_partial_shape()) for p in model.inputs))
            return real.compile_model(model, *args, **kwargs)

    monkeypatch.setattr(backend, "core", lambda: CountingCore())
    pipe = leansd.load(backend="openvino", low_memory=low_memory)
    first = pipe(**KWARGS).images
    after_first = len(compiled)
    second = pipe(**KWARGS).images
    np.testing.assert_array_equal(first, second)
    if not low_memory:  # models stay loaded: the second image compiles nothing
        assert len(compiled) == after_first, compiled[after_first:]
    unet = [shapes[0] for shapes in compiled if len(shapes) == 3]  # sample, timestep, text: the UNet
    batches = [shape.strip("[]").split(",")[0] for shape in unet]
    assert list(dict.fromkeys(batches)) == unet_batches  # low-memory mode reopens (and recompiles) every image


def test_batch_sizes_share_one_compiled_model_only_when_announced():
    from leansd.runtime.backends.openvino import batch_key

    guided = (("sample", (2, 4, 8, 8)), ("timestep", (2,)), ("scale", ()))
    unguided = (("sample", (1, 4, 8, 8)), ("timestep", (1,)), ("scale", ()))
    taller = (("sample", (1, 4, 16, 8)), ("timestep", (1,)), ("scale", ()))
    cutoff = frozenset({1, 2})
    both = batch_key(guided, cutoff)
    assert both == (("sample", ((1, 2), 4, 8, 8)), ("timestep", ((1, 2),)), ("scale", ()))
    assert batch_key(unguided, cutoff) == both  # one compiled model for both batch sizes
    assert batch_key(taller, cutoff) == (("sample", ((1, 2), 4, 16, 8)), ("timestep", ((1, 2),)), ("scale", ()))  # sizes stay static
    assert batch_key(guided, frozenset()) == guided and batch_key(guided, frozenset({2})) == guided  # no range announced
    assert batch_key((("sample", (4, 4, 8, 8)),), cutoff) == (("sample", (4, 4, 8, 8)),)  # a batch outside the range


def _resident_bytes(folder) -> int:
    """Resident bytes of this process's mappings of files in `folder` (/proc/self/smaps)."""
    import os

    root, total, inside = os.path.realpath(folder) + os.sep, 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:  # a mapping's header line
                inside = len(fields) >= 6 and fields[5].startswith(root)
            elif inside and fields[0] == "Rss:":
                total += int(fields[1]) * 1024
    return total


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="reads /proc/self/smaps")
@pytest.mark.parametrize("announced", [frozenset(), frozenset({1, 2})], ids=["static", "batch-range"])
def test_compiled_models_give_back_the_mapped_weight_pages(tmp_path, monkeypatch, announced):
    """Static models copy their weights while compiling; a model compiled for a batch range (what a guidance cutoff
    announces) copies them during its first inference: either way the file's pages are handed back."""
    import openvino as ov

    from leansd.runtime.backends import file_pages
    from leansd.runtime.backends.openvino import OpenVinoSession
    from leansd.runtime.backends.session import SessionOptions

    # The bundled model ships ONNX only (its weights inside the file); an IR maps its weights from a .bin file.
    ir = tmp_path / "unet" / "openvino_model.xml"
    ov.save_model(ov.convert_model(str(bundled_model_path() / "unet" / "model.onnx")), str(ir), compress_to_fp16=False)
    sizes = {"sample": (2, 4, 8, 8), "timestep": (2,), "encoder_hidden_states": (2, 77, None)}

    def run_once() -> tuple[OpenVinoSession, dict, dict, int]:
        session = OpenVinoSession(ir, SessionOptions())
        session.expect_batch_sizes(announced)
        rng = np.random.default_rng(0)
        feeds = {}
        for spec in session.inputs:
            shape = [want if want is not None else got for want, got in zip(spec.shape or sizes[spec.name], sizes[spec.name])]
            feeds[spec.name] = (rng.random(shape) * (500 if spec.name == "timestep" else 1)).astype(spec.dtype)
        out = session.run(feeds)
        assert file_pages.read_only_mappings(ir.parent), "OpenVINO no longer maps the weights file; this test checks nothing"
        return session, feeds, out, _resident_bytes(ir.parent)

    with monkeypatch.context() as m:
        m.setattr(file_pages, "release", lambda folder: 0)
        kept, _, expected, resident_kept = run_once()
        kept.close()
        del kept
    session, feeds, first, resident = run_once()
    # The file's pages stay resident without the release; with it, most are handed back (the compiled model holds
    # its own copy; the few it reads directly come back from the file).
    assert resident_kept > 0.5 * ir.with_suffix(".bin").stat().st_size
    assert resident < 0.5 * resident_kept, (resident, resident_kept)
    for name, value in session.run(feeds).items():  # the same results, before and after pages come back
        np.testing.assert_array_equal(value, first[name])
        np.testing.assert_array_equal(value, expected[name])


@pytest.mark.parametrize("cap", [None, "AVX2"])
def test_a_kernel_openvino_cannot_build_is_reported_with_its_reason_and_the_fix(monkeypatch, cap):
    """OpenVINO reports a kernel it cannot build (as under ONEDNN_MAX_CPU_ISA=AVX2 on an AVX-512 CPU, for int8-compressed
    weights) only when it compiles or runs: the error keeps its reason, drops OpenVINO's source-file lines, and names
    the fix, the cap when one is set."""
    from leansd.runtime.backends import openvino as backend

    real = backend.core()
    message = ("Exception from src/inference/src/cpp/infer_request.cpp:224:\nException from src/plugins/intel_cpu/src/node.cpp:823:\n"
               "[CPU] FullyConnectedCompressed node with name 'fc' could not create a primitive descriptor.\n")

    class FailingCore:
        def __getattr__(self, name):
            return getattr(real, name)

        def compile_model(self, model, *args, **kwargs):
            raise RuntimeError(message)

    if cap:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    else:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(backend, "core", lambda: FailingCore())
    pipe = leansd.load(backend="openvino")
    with pytest.raises(leansd.LeanSDError) as caught:
        pipe(**KWARGS)
    text = str(caught.value)
    assert "[CPU] FullyConnectedCompressed node with name 'fc' could not create a primitive descriptor." in text
    assert "Exception from" not in text
    if cap:
        assert "ONEDNN_MAX_CPU_ISA=AVX2" in text and "unset ONEDNN_MAX_CPU_ISA" in text
    else:
        assert "--backend onnxruntime" in text and "ONEDNN_MAX_CPU_ISA" not in text
