"""SDXL LoRA and textual inversion against diffusers' StableDiffusionXLPipeline on the tiny SDXL (tests/tiny_sdxl.py).

- run time: `leansd.load(...)` with `loras=` and prompt tags on both backends against diffusers' `load_lora_weights` +
  `set_adapters` (not fused): a kohya SDXL file (UNet layers in Stability's layout, `lora_te1_` / `lora_te2_`, alphas,
  3x3 convolutions) and a diffusers / PEFT file (`unet.`, `text_encoder.`, `text_encoder_2.`), at their scales;
- export: `export_model(..., loras=...)` against diffusers' `fuse_lora`;
- textual inversion: AUTOMATIC1111's SDXL file (`clip_l` + `clip_g`) and diffusers-style files (one per encoder) against
  `load_textual_inversion(..., text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)` and its first-encoder twin.
Images are compared max-abs in [0, 1]; measured errors are below 2e-6.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

import leansd  # noqa: E402
from leansd.runtime.errors import LeanSDWarning  # noqa: E402
from tests.lora_files import embedding_file, sdxl_embedding_file, sdxl_kohya_lora, sdxl_peft_lora  # noqa: E402
from tests.tiny_sdxl import TEXT_WIDTH, TEXT_WIDTH_2  # noqa: E402

pytestmark = pytest.mark.needs_torch

TOLERANCE = 1e-4
BACKENDS = ["onnxruntime", "openvino"]
CALL = dict(prompt="a red circle on a blue background", num_inference_steps=3, height=32, width=32)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(the tiny SDXL diffusers folder, its export): one per module."""
    from leansd.export import export_model
    from tests.tiny_sdxl import build_tiny_sdxl

    source = build_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl", seed=4)
    return source, export_model(source, tmp_path_factory.mktemp("exports") / "tiny-sdxl", progress=False)


@pytest.fixture(scope="module")
def lora_files(model, tmp_path_factory) -> dict[str, Path]:
    source, _ = model
    folder = tmp_path_factory.mktemp("loras")
    return {"kohya": sdxl_kohya_lora(source, folder / "style.safetensors", seed=1, rank=4, alpha=2.0),
            "peft": sdxl_peft_lora(source, folder / "peft.safetensors", seed=2)}


def _reference(source: Path):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(source, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(pipe, seed: int, **kwargs) -> np.ndarray:
    return pipe(**{**CALL, **kwargs}, generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images


def _with_loras(source: Path, loras: dict[Path, float | dict], fuse: bool = False):
    """diffusers with `loras` at their weights (a number, or per component {"unet": ..., "text_encoder": ...})."""
    pipe = _reference(source)
    names = []
    for k, path in enumerate(loras):
        pipe.load_lora_weights(str(path), adapter_name=f"a{k}")
        names.append(f"a{k}")
    pipe.set_adapters(names, adapter_weights=list(loras.values()))
    if fuse:
        pipe.fuse_lora(lora_scale=1.0)
    return pipe


def test_sgm_names_agree_with_diffusers_conversion(model):
    """Every linear and convolution layer of the UNet, named in Stability's layout as kohya's SDXL files do, is read
    by diffusers' own conversion as the layer leansd resolves it to."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    from leansd.runtime.adapters.sgm_names import SgmNames

    unet = UNet2DConditionModel.from_pretrained(model[0], subfolder="unet")
    modules = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    sgm = SgmNames(modules)
    block_layers = [m for m in modules if m.startswith(("down_blocks", "mid_block", "up_blocks"))]
    keys = {}
    for module in block_layers:
        name = sgm(module)
        assert name is not None, module
        key = "lora_unet_" + name.replace(".", "_")
        keys[f"{key}.lora_down.weight"] = torch.zeros(1, 1)
        keys[f"{key}.lora_up.weight"] = torch.zeros(1, 1)
    state, _ = StableDiffusionXLPipeline.lora_state_dict(keys, unet_config=unet.config)
    read = {_module(k[len("unet."):]) for k in state if k.endswith(".down.weight")}
    assert read == set(block_layers)


def _module(key: str) -> str:
    """diffusers' converted LoRA key -> the module it changes (`...attn1.processor.to_q_lora.down.weight` -> `...attn1.to_q`)."""
    module = key[: -len(".down.weight")].replace(".processor.", ".")
    module = module[: -len("_lora")] if module.endswith("_lora") else module[: -len(".lora")]
    return module[: -len("to_out")] + "to_out.0" if module.endswith("to_out") else module


def test_runtime_loras_match_diffusers(model, lora_files):
    """Both layouts at once, then one LoRA with other text-encoder and UNet multipliers (a prompt tag), then none."""
    source, exported = model
    both = {lora_files["kohya"]: 0.8, lora_files["peft"]: 0.5}
    split = {lora_files["kohya"]: {"unet": 0.4, "text_encoder": 1.2, "text_encoder_2": 1.2}}
    expected_both = _images(_with_loras(source, both), seed=7)
    expected_split = _images(_with_loras(source, split), seed=7)
    expected_none = _images(_reference(source), seed=7)
    assert np.abs(expected_both - expected_none).max() > 0.05  # the LoRAs change the picture
    assert np.abs(expected_split - expected_both).max() > 0.05
    for backend in BACKENDS:
        pipe = leansd.load(exported, backend=backend, lora_dir=lora_files["kohya"].parent)
        with warnings.catch_warnings():
            warnings.simplefilter("error", LeanSDWarning)  # every layer of both files is found in the model
            out = pipe(**CALL, seed=7, output_type="np", loras={str(p): s for p, s in both.items()})
        assert float(np.abs(out.images - expected_both).max()) < TOLERANCE, f"{backend}: both"
        tagged = pipe(**{**CALL, "prompt": CALL["prompt"] + " <lora:style:1.2:0.4>"}, seed=7, output_type="np")
        assert float(np.abs(tagged.images - expected_split).max()) < TOLERANCE, f"{backend}: tag"
        assert [(a.name, a.te, a.unet) for a in tagged.loras] == [("style", 1.2, 0.4)]
        plain = pipe(**CALL, seed=7, output_type="np")
        assert float(np.abs(plain.images - expected_none).max()) < TOLERANCE, f"{backend}: none"


def test_second_text_encoder_lora_alone(model, lora_files, tmp_path):
    """A LoRA for text_encoder_2 only changes the image as diffusers' does: leansd applies layers of that encoder."""
    from safetensors.torch import load_file, save_file

    source, exported = model
    tensors = load_file(str(lora_files["kohya"]))
    path = tmp_path / "te2.safetensors"
    save_file({k: v for k, v in tensors.items() if k.startswith("lora_te2_")}, str(path))
    expected = _images(_with_loras(source, {path: 1.0}), seed=3)
    assert np.abs(expected - _images(_reference(source), seed=3)).max() > 0.01
    for backend in BACKENDS:
        got = leansd.load(exported, backend=backend)(**CALL, seed=3, output_type="np", loras={str(path): 1.0}).images
        assert float(np.abs(got - expected).max()) < TOLERANCE, backend


def test_lora_fused_at_export_matches_diffusers_fuse_lora(model, lora_files, tmp_path):
    from leansd.export import export_model

    source, _ = model
    out = export_model(source, tmp_path / "fused", progress=False,
                       loras=[f"{lora_files['kohya']}:0.8", (lora_files["peft"], 0.5)])
    expected = _images(_with_loras(source, {lora_files["kohya"]: 0.8, lora_files["peft"]: 0.5}, fuse=True), seed=7)
    assert np.abs(expected - _images(_reference(source), seed=7)).max() > 0.05
    for backend in BACKENDS:
        got = leansd.load(out, backend=backend)(**CALL, seed=7, output_type="np").images
        assert float(np.abs(got - expected).max()) < TOLERANCE, backend
    recorded = json.loads((out / "leansd.json").read_text())["loras"]
    assert [(r["file"], r["scale"]) for r in recorded] == [("style.safetensors", 0.8), ("peft.safetensors", 0.5)]


def test_weight_map_covers_both_text_encoders(model):
    """The export's weight map locates every 2-D and 4-D weight of text_encoder_2 too, in both backends' files."""
    from transformers import CLIPTextModelWithProjection

    source, exported = model
    text_2 = CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder_2")
    params = {n for n, p in text_2.named_parameters() if p.ndim in (2, 4)}
    entries = json.loads((exported / "weight_map.json").read_text())["files"]
    for name in ("model.onnx", "openvino_model.xml"):
        entry = entries[f"text_encoder_2/{name}"]
        assert entry["component"] == "text_encoder_2" and entry["unmatched"] == [] and set(entry["weights"]) == params, name
    assert {e["component"] for e in entries.values()} == {"text_encoder", "text_encoder_2", "unet"}


def test_textual_inversion_on_both_encoders(model, tmp_path):
    """AUTOMATIC1111's SDXL file (clip_l + clip_g, 2 vectors), and a word with a diffusers-style file per encoder; plus a
    word only the second encoder knows (the first tokenizes it as text, as in diffusers)."""
    from safetensors.numpy import load_file

    source, exported = model
    a1111 = sdxl_embedding_file(tmp_path / "glossy.safetensors", vectors=2, dims=(TEXT_WIDTH, TEXT_WIDTH_2), seed=4)
    first = embedding_file(tmp_path / "blob_l.safetensors", vectors=1, dim=TEXT_WIDTH, seed=5, key="<blob>")
    second = embedding_file(tmp_path / "blob_g.safetensors", vectors=1, dim=TEXT_WIDTH_2, seed=6, key="<blob>")
    only_g = embedding_file(tmp_path / "fizz.safetensors", vectors=3, dim=TEXT_WIDTH_2, seed=7, key="fizz")
    prompt, negative = "a glossy circle on a <blob> background, fizz", "<blob>"
    pipe = _reference(source)
    encoders = {"clip_l": (pipe.text_encoder, pipe.tokenizer), "clip_g": (pipe.text_encoder_2, pipe.tokenizer_2)}
    for part, vectors in load_file(str(a1111)).items():
        pipe.load_textual_inversion(torch.from_numpy(vectors), token="glossy", text_encoder=encoders[part][0],
                                    tokenizer=encoders[part][1])
    for path, part in ((first, "clip_l"), (second, "clip_g"), (only_g, "clip_g")):
        pipe.load_textual_inversion(str(path), text_encoder=encoders[part][0], tokenizer=encoders[part][1])
    expected = _images(pipe, seed=3, prompt=prompt, negative_prompt=negative)
    plain = _images(_reference(source), seed=3, prompt=prompt, negative_prompt=negative)
    assert np.abs(expected - plain).max() > 0.01
    for backend in BACKENDS:
        ours = leansd.load(exported, backend=backend, embeddings=[a1111, first, second, only_g])
        out = ours(**{**CALL, "prompt": prompt}, negative_prompt=negative, seed=3, output_type="np")
        err = float(np.abs(out.images - expected).max())
        assert err < TOLERANCE, f"{backend}: max-abs {err:.2e}"
        assert sorted(e.token for e in out.embeddings) == ["<blob>", "<blob>", "fizz", "glossy"]


def test_weight_map_added_to_an_older_sdxl_export(model, tmp_path):
    """`python -m leansd.export.weight_map SOURCE FOLDER` writes the same map for SDXL's three mapped models."""
    import shutil

    from leansd.export.weight_map import add_to_folder

    source, exported = model
    folder = shutil.copytree(exported, tmp_path / "older")
    (folder / "weight_map.json").unlink()
    add_to_folder(str(source), folder)
    assert json.loads((folder / "weight_map.json").read_text()) == json.loads((exported / "weight_map.json").read_text())
