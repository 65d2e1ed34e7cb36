"""ONNX Runtime sessions: the optimized-graph cache (`cache_dir`: a later load opens the saved graphs and gives
the same images; a changed, damaged or unwritable cache never gives a wrong result or an error) and the VAE's
arena, returned after each call."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

import leansd
from leansd.runtime.backends import graph_cache
from leansd.runtime.loader import bundled_model_path

pytestmark = pytest.mark.skipif(
    not (bundled_model_path() / "leansd.json").is_file(), reason="the bundled default model is not in this checkout"
)
pytest.importorskip("onnxruntime")

KWARGS = dict(prompt="a red circle on a blue background", num_inference_steps=2, seed=3, output_type="np")


def opened_from(pipe) -> dict[str, object]:
    return {
        "text_encoder": pipe.models.prompt_encoder.encoders[0].session.open().opened_from,
        "unet": pipe.unet.session.open().opened_from,
        "vae_decoder": pipe.models.vae_decoder.session.open().opened_from,
    }


def entries(cache) -> list:
    return sorted((cache / "onnxruntime").iterdir())


@pytest.fixture(scope="module")
def plain_images():
    return leansd.load(backend="onnxruntime")(**KWARGS).images


def test_a_later_load_opens_the_saved_graphs_and_draws_the_same(tmp_path, plain_images):
    cache = tmp_path / "cache"
    first = leansd.load(backend="onnxruntime", cache_dir=cache)
    np.testing.assert_array_equal(first(**KWARGS).images, plain_images)
    assert all(not str(p).startswith(str(cache)) for p in opened_from(first).values())
    saved = entries(cache)
    assert len(saved) == 3 and all((e / graph_cache.MODEL).is_file() and (e / "key.json").is_file() for e in saved)
    assert not list((cache / "onnxruntime").glob("*.partial"))

    second = leansd.load(backend="onnxruntime", cache_dir=cache)
    assert all(str(p).startswith(str(cache)) for p in opened_from(second).values())
    np.testing.assert_array_equal(second(**KWARGS).images, plain_images)
    assert entries(cache) == saved


def test_a_changed_model_file_replaces_its_entry(tmp_path, plain_images):
    model, cache = tmp_path / "model", tmp_path / "cache"
    shutil.copytree(bundled_model_path(), model)
    leansd.load(model, backend="onnxruntime", cache_dir=cache)
    before = entries(cache)
    onnx_file = next((model / "unet").glob("*.onnx"))
    os.utime(onnx_file, ns=(onnx_file.stat().st_atime_ns, onnx_file.stat().st_mtime_ns + 10**9))  # as a re-export would
    pipe = leansd.load(model, backend="onnxruntime", cache_dir=cache)
    assert not str(pipe.unet.session.open().opened_from).startswith(str(cache))  # re-optimized, not the stale copy
    assert entries(cache) == before  # same source path: its entry was replaced, not added to
    again = leansd.load(model, backend="onnxruntime", cache_dir=cache)
    assert str(again.unet.session.open().opened_from).startswith(str(cache))
    np.testing.assert_array_equal(again(**KWARGS).images, plain_images)


def test_a_damaged_entry_is_rebuilt(tmp_path, plain_images):
    cache = tmp_path / "cache"
    leansd.load(backend="onnxruntime", cache_dir=cache)
    for entry in entries(cache):
        (entry / graph_cache.MODEL).write_bytes(b"truncated")
    pipe = leansd.load(backend="onnxruntime", cache_dir=cache)
    np.testing.assert_array_equal(pipe(**KWARGS).images, plain_images)
    again = leansd.load(backend="onnxruntime", cache_dir=cache)
    assert all(str(p).startswith(str(cache)) for p in opened_from(again).values())


def test_an_unwritable_cache_folder_is_skipped(tmp_path, plain_images):
    not_a_folder = tmp_path / "cache"
    not_a_folder.write_text("a file where the cache folder would go")
    pipe = leansd.load(backend="onnxruntime", cache_dir=not_a_folder)
    np.testing.assert_array_equal(pipe(**KWARGS).images, plain_images)


def test_vae_sessions_return_their_arena_after_each_call(plain_images):
    """Normal mode: the VAE keeps an arena during a decode and shrinks it after; low-memory mode has no arena."""
    pipe = leansd.load(backend="onnxruntime")
    session = pipe.models.vae_decoder.session.open()
    assert session._run_options.get_run_config_entry("memory.enable_memory_arena_shrinkage") == "cpu:0"
    assert pipe.unet.session.open()._run_options is None  # the UNet runs every step: it keeps its arena
    np.testing.assert_array_equal(pipe(**KWARGS).images, plain_images)
    low = leansd.load(backend="onnxruntime", low_memory=True)
    assert low.models.vae_decoder.session.open()._run_options is None
