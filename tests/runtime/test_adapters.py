"""Run-time LoRA and textual inversion without torch, on the bundled model: the safetensors reader, prompt tags,
switching between calls, both backends agreeing, sd-run's options and PNG fields, and every refusal's message.
(Parity with diffusers is in tests/parity/test_adapters.py.)"""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import leansd
from leansd.runtime.adapters import extract, read_embedding, read_lora
from leansd.runtime.adapters.tensor_file import TensorFile
from leansd.runtime.errors import InvalidInputError, LeanSDError, ModelFolderError
from leansd.runtime.loader import bundled_model_path
from tests.lora_files import kohya_lora_from_map, write_safetensors

BACKENDS = [b for b in ("onnxruntime", "openvino") if importlib.util.find_spec(b)]
CALL = dict(prompt="a red circle on a blue background", num_inference_steps=4, seed=11, output_type="np")


@pytest.fixture(scope="module")
def lora(tmp_path_factory) -> Path:
    return kohya_lora_from_map(bundled_model_path(), tmp_path_factory.mktemp("lora") / "tint.safetensors", seed=0)


def test_safetensors_reader_widens_bfloat16_and_refuses_damage(tmp_path):
    values = np.array([[1.0, -2.5], [0.15625, 2.0**18]], np.float32)  # exact in bfloat16
    f = TensorFile(write_safetensors(tmp_path / "a.safetensors", {"w": values}, {"k": "v"}, bf16=True))
    assert f.metadata == {"k": "v"} and f.tensor("w").dtype == np.float32
    np.testing.assert_array_equal(f.tensor("w"), values)
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "a.safetensors").read_bytes()[:-3])
    with pytest.raises(InvalidInputError, match="outside the file"):
        TensorFile(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{nope")
    with pytest.raises(InvalidInputError, match="not JSON"):
        TensorFile(tmp_path / "junk.safetensors")


def test_prompt_tags():
    assert extract("a cat <lora:style:0.8>, <LORA:b> <lyco:c:0.5:0.25>") == (
        "a cat ,  ", [extract("<lora:style:0.8>")[1][0], extract("<lora:b:1>")[1][0], extract("<lora:c:0.5:0.25>")[1][0]])
    _, (tag,) = extract("x <lora:c:te=0.5:unet=0.2>")
    assert (tag.name, tag.te, tag.unet) == ("c", 0.5, 0.2)
    with pytest.raises(InvalidInputError, match="multiplier 'abc'"):
        extract("<lora:c:abc>")
    with pytest.raises(InvalidInputError, match="not a LoRA tag"):
        extract("<lora::1>")


@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_changes_the_picture_and_switches_back_exactly(backend, lora):
    pipe = leansd.load(backend=backend)
    base = pipe(**CALL).images
    with_lora = pipe(**CALL, loras={str(lora): 1.0})
    assert np.abs(with_lora.images - base).max() > 0.02
    assert with_lora.loras[0].name == "tint" and with_lora.timings["adapters_s"] > 0
    again = pipe(**CALL, loras={str(lora): 1.0})
    np.testing.assert_array_equal(again.images, with_lora.images)
    assert again.timings["adapters_s"] < with_lora.timings["adapters_s"]  # the applied set is kept
    np.testing.assert_array_equal(pipe(**CALL, loras={}).images, base)
    np.testing.assert_array_equal(pipe(**CALL, loras={str(lora): 0}).images, base)
    tagged = leansd.load(backend=backend, lora_dir=lora.parent)(**{**CALL, "prompt": CALL["prompt"] + " <lora:tint:1>"})
    np.testing.assert_array_equal(tagged.images, with_lora.images)


def test_backends_agree_with_a_bfloat16_lora(tmp_path):
    if len(BACKENDS) < 2:
        pytest.skip("needs both backends")
    lora = kohya_lora_from_map(bundled_model_path(), tmp_path / "b.safetensors", seed=1, bf16=True)
    images = [leansd.load(backend=b)(**CALL, loras={str(lora): 0.7}).images for b in BACKENDS]
    assert np.abs(images[0] - images[1]).max() < 1e-4


def test_embedding_words_are_added_and_used(tmp_path):
    vectors = np.random.default_rng(0).standard_normal((2, 32)).astype(np.float32)
    path = write_safetensors(tmp_path / "zigzag.safetensors", {"emb_params": vectors})
    assert read_embedding(path).tokens == ["zigzag", "zigzag_1"]
    pipe = leansd.load(embeddings=[path])
    ids = pipe.models.prompt_encoder.tokenizers[0](["a ZigZag circle"])[0]
    assert list(ids[2:4]) == [49408, 49409]  # the word stands for both of its vectors (case-insensitive)
    out = pipe(**{**CALL, "prompt": "a zigzag circle"})
    assert [e.token for e in out.embeddings] == ["zigzag"]
    assert np.abs(out.images - leansd.load()(**{**CALL, "prompt": "a zigzag circle"}).images).max() > 1e-3


def test_sd_run_records_lora_and_ti_hashes(tmp_path, lora):
    from PIL import Image

    from leansd.runtime.cli import main

    emb = write_safetensors(tmp_path / "zigzag.safetensors", {"emb_params": np.ones((1, 32), np.float32)})
    out = tmp_path / "x.png"
    code = main(["a zigzag circle <lora:tint:0.5>", "--steps", "2", "--seed", "1", "-o", str(out), "-q", "--lora-dir", str(lora.parent),
                 "--embedding", str(emb)])
    assert code == 0
    text = Image.open(out).text["parameters"]
    assert text.splitlines()[0] == "a zigzag circle <lora:tint:0.5>"
    assert f'Lora hashes: "tint: {read_lora(lora).hash}"' in text
    assert f'TI hashes: "zigzag: {read_embedding(emb).hash}"' in text


def test_refusals_name_the_problem_and_the_fix(tmp_path, lora, capsys):
    folder = tmp_path / "old"
    shutil.copytree(bundled_model_path(), folder)
    (folder / "weight_map.json").unlink()
    with pytest.raises(ModelFolderError, match="without a weight map.*re-export"):
        leansd.load(folder)(**CALL, loras={str(lora): 1})
    with pytest.raises(ModelFolderError, match="without a weight map.*re-export"):
        leansd.load(folder, embeddings=[write_safetensors(tmp_path / "e.safetensors", {"emb_params": np.ones((1, 32), np.float32)})])
    loha = write_safetensors(tmp_path / "loha.safetensors", {"lora_unet_conv_in.hada_w1_a": np.ones((2, 2), np.float32)})
    with pytest.raises(InvalidInputError, match="LoHa"):
        read_lora(loha)
    foreign = write_safetensors(tmp_path / "xl.safetensors", {"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": np.ones((1, 4), np.float32),
                                                             "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": np.ones((4, 1), np.float32)})
    with pytest.raises(InvalidInputError, match="another model architecture"):
        leansd.load()(**CALL, loras={str(foreign): 1})
    (tmp_path / "emb.pt").write_bytes(b"\x80")
    with pytest.raises(InvalidInputError, match="python -m leansd.export.embeddings"):
        read_embedding(tmp_path / "emb.pt")
    wide = write_safetensors(tmp_path / "wide.safetensors", {"emb_params": np.ones((1, 768), np.float32)})
    with pytest.raises(InvalidInputError, match="768 values.*takes 32"):
        leansd.load(embeddings=[wide])
    xl = write_safetensors(tmp_path / "xl-emb.safetensors", {"clip_l": np.ones((1, 32), np.float32), "clip_g": np.ones((1, 48), np.float32)})
    with pytest.raises(InvalidInputError, match="SDXL's two text encoders"):
        leansd.load(embeddings=[xl])
    with pytest.raises(InvalidInputError, match="'nope' not found"):
        leansd.load()(**{**CALL, "prompt": "a <lora:nope>"})
    with pytest.raises(InvalidInputError, match="multiplier of LoRA"):
        leansd.load()(**CALL, loras={str(lora): float("nan")})
    with pytest.raises(InvalidInputError, match="different LoRA tags"):
        leansd.load(lora_dir=lora.parent)(**{**CALL, "prompt": ["a <lora:tint>", "b"]})


def test_sdxl_unet_names_in_stabilitys_layout():
    """kohya's SDXL LoRAs name UNet layers as Stability's UNet does; the tiny SDXL's names, written out by hand."""
    from leansd.runtime.adapters.sgm_names import SgmNames
    from tests.lora_files import SDXL_UNET_LAYERS

    sgm = SgmNames(SDXL_UNET_LAYERS)
    assert {module: sgm(module) for module in SDXL_UNET_LAYERS} == SDXL_UNET_LAYERS
    assert sgm("conv_in") == "input_blocks.0.0" and sgm("add_embedding.linear_2") == "label_emb.0.2"
    assert sgm("down_blocks.1.attentions.0.norm") == "input_blocks.3.1.norm" and sgm("encoder_hid_proj") is None


def test_int8_pipelines_refuse_loras():
    from leansd.runtime.bundle import ModelBundle
    from leansd.runtime.loader import _adapters

    adapters = _adapters(ModelBundle.open(bundled_model_path()), "onnxruntime", "int8", None)
    with pytest.raises(InvalidInputError, match="int8 files.*precision='fp32'.*sd-export --lora"):
        with adapters.using([(Path("x.safetensors"), "x", 1.0, 1.0)]):
            pass
    with adapters.using([]):  # no LoRA: nothing to refuse
        pass


def test_threads_with_different_lora_sets_get_their_own(lora):
    """Calls on several threads that want different sets wait for each other instead of mixing weights."""
    from concurrent.futures import ThreadPoolExecutor

    pipe = leansd.load(backend=BACKENDS[0])
    wanted = [{}, {str(lora): 1.0}, {str(lora): 0.5}, {}, {str(lora): 1.0}, {str(lora): 0.5}]
    alone = [pipe(**CALL, loras=w).images for w in wanted[:3]]
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(lambda w: pipe(**CALL, loras=w).images, wanted))
    for k, images in enumerate(together):
        np.testing.assert_array_equal(images, alone[k % 3])


def test_loras_given_to_load_are_applied_before_the_models_open(lora):
    pipe = leansd.load(backend=BACKENDS[0], loras={str(lora): 1.0})
    out = pipe(**CALL)
    assert out.timings["adapters_s"] < 0.05 and [a.name for a in out.loras] == ["tint"]
    np.testing.assert_array_equal(out.images, leansd.load(backend=BACKENDS[0])(**CALL, loras={str(lora): 1.0}).images)
