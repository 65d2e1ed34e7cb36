"""sd-serve --lora-dir / --embedding: AUTOMATIC1111 prompts with <lora:NAME:WEIGHT> and embedding words, over HTTP.

The server's image must equal the same generation in-process with the same LoRA folder and embedding, and differ
from the plain model's; /sdapi/v1/loras and /sdapi/v1/embeddings list what was given.
"""
from __future__ import annotations

import numpy as np
import pytest

import leansd
from leansd.runtime.loader import bundled_model_path
from leansd.server.app import create_app
from leansd.server.registry import ModelRegistry
from tests.lora_files import kohya_lora_from_map, write_safetensors
from tests.server.conftest import call, decode_png, pixels, serving

BODY = {"steps": 4, "seed": 21, "width": 64, "height": 64, "cfg_scale": 7.5, "sampler_name": "DDIM"}


@pytest.fixture(scope="module")
def adapter_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapters")
    loras = folder / "loras"
    loras.mkdir()
    kohya_lora_from_map(bundled_model_path(), loras / "tint.safetensors", seed=0)
    vectors = np.random.default_rng(0).standard_normal((2, 32)).astype(np.float32)
    embedding = write_safetensors(folder / "zigzag.safetensors", {"emb_params": vectors})
    return loras, embedding


@pytest.fixture(scope="module")
def adapter_registry(adapter_files):
    loras, embedding = adapter_files
    registry = ModelRegistry.load([None], lora_dir=loras, embeddings=[embedding])
    yield registry
    registry.close()


def test_loras_and_embeddings_are_listed_and_used(adapter_files, adapter_registry):
    loras, embedding = adapter_files
    with serving(create_app(adapter_registry)) as server:
        listed = call("GET", f"{server.url}/sdapi/v1/loras").json()
        assert [(e["name"], e["alias"]) for e in listed] == [("tint", "tint")]
        loaded = call("GET", f"{server.url}/sdapi/v1/embeddings").json()["loaded"]
        assert loaded == {"zigzag": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": 32, "vectors": 2}}

        prompt = "a zigzag red circle on a blue background <lora:tint:0.9>"
        reply = call("POST", f"{server.url}/sdapi/v1/txt2img", {**BODY, "prompt": prompt})
        assert reply.status == 200, reply.body[:300]
        served = decode_png(reply.json()["images"][0])
        assert "Lora hashes: \"tint: " in served.text["parameters"] and "TI hashes: \"zigzag: " in served.text["parameters"]

    own = leansd.load(lora_dir=loras, embeddings=[embedding])
    expected = own(prompt, num_inference_steps=4, seed=21, guidance_scale=7.5, scheduler="ddim").images[0]
    np.testing.assert_array_equal(pixels(served), pixels(expected))
    plain = leansd.load()("a red circle on a blue background", num_inference_steps=4, seed=21, guidance_scale=7.5,
                          scheduler="ddim").images[0]
    assert np.abs(pixels(served).astype(int) - pixels(plain).astype(int)).max() > 10
