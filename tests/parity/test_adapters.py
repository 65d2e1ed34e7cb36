"""LoRA and textual inversion against diffusers on the tiny model (tests/lora_files.py makes the files).

- run time: `leansd.load(..., loras=...)`, prompt tags and `embeddings=` on both backends against diffusers'
  `load_lora_weights` + `set_adapters` (not fused) and `load_textual_inversion`, same seed;
- export: `export_model(..., loras=...)` against diffusers' `load_lora_weights` + `fuse_lora`;
- the layout of models over 2 GB (external weights, streaming parts, fused attention), forced on the tiny model.
Images are compared max-abs in [0, 1]; measured errors are about 2e-6.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

import leansd  # noqa: E402
from leansd.runtime.errors import InvalidInputError  # noqa: E402
from tests.lora_files import embedding_file, kohya_lora, peft_lora  # noqa: E402
from tests.parity.test_pipeline import reference_images, reference_pipeline  # noqa: E402

pytestmark = pytest.mark.needs_torch

TOLERANCE = 1e-4
BACKENDS = ["onnxruntime", "openvino"]
CALL = dict(prompt="a red circle on a blue background", num_inference_steps=3, guidance_scale=7.5, height=32, width=32)


@pytest.fixture(scope="module")
def lora_files(tiny_sd_dir, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("loras")
    return {
        "kohya": kohya_lora(tiny_sd_dir, folder / "style.safetensors", seed=1, rank=4, alpha=2.0),
        # bf16 storage and no alpha (scale 1), as many community files are
        "kohya_bf16": kohya_lora(tiny_sd_dir, folder / "detail.safetensors", seed=3, rank=3, alpha=None, dtype="bfloat16"),
        "peft": peft_lora(tiny_sd_dir, folder / "peft.safetensors", seed=2),
    }


def _diffusers_with(tiny_sd_dir, loras: dict[Path, float], fuse: bool = False):
    pipe = reference_pipeline(tiny_sd_dir)
    names = []
    for k, path in enumerate(loras):
        pipe.load_lora_weights(str(path), adapter_name=f"a{k}")
        names.append(f"a{k}")
    pipe.set_adapters(names, adapter_weights=list(loras.values()))
    if fuse:
        pipe.fuse_lora(lora_scale=1.0)
    return pipe


@pytest.fixture(scope="module")
def pipes(exported_tiny_sd):
    return {backend: leansd.load(exported_tiny_sd, backend=backend) for backend in BACKENDS}


def test_runtime_loras_match_diffusers_and_switch_between_calls(tiny_sd_dir, pipes, lora_files):
    both = {lora_files["kohya"]: 0.8, lora_files["peft"]: 0.5}
    expected_both = reference_images(_diffusers_with(tiny_sd_dir, both), seed=7, **CALL)
    expected_one = reference_images(_diffusers_with(tiny_sd_dir, {lora_files["kohya_bf16"]: 1.3}), seed=7, **CALL)
    expected_none = reference_images(reference_pipeline(tiny_sd_dir), seed=7, **CALL)
    assert np.abs(expected_both - expected_none).max() > 0.05  # the LoRAs change the picture
    for backend, pipe in pipes.items():
        for loras, expected in (({str(p): s for p, s in both.items()}, expected_both), ({}, expected_none),
                                ({str(lora_files["kohya_bf16"]): 1.3}, expected_one), ({str(lora_files["kohya"]): 0.0}, expected_none)):
            out = pipe(**CALL, seed=7, output_type="np", loras=loras)
            err = float(np.abs(out.images - expected).max())
            assert err < TOLERANCE, f"{backend} with {loras}: max-abs {err:.2e}"
            assert [a.path for a in out.loras] == [Path(p) for p, s in loras.items() if s]


def test_prompt_tags_name_loras_in_a_folder(exported_tiny_sd, tiny_sd_dir, lora_files):
    both = {lora_files["kohya"]: 0.8, lora_files["peft"]: 0.5}
    expected = reference_images(_diffusers_with(tiny_sd_dir, both), seed=7, **CALL)
    for backend in BACKENDS:
        pipe = leansd.load(exported_tiny_sd, backend=backend, lora_dir=lora_files["kohya"].parent)
        prompt = f"{CALL['prompt']} <lora:style:0.8><lora:peft:0.5>"
        out = pipe(**{**CALL, "prompt": prompt}, seed=7, output_type="np")
        assert float(np.abs(out.images - expected).max()) < TOLERANCE
        assert out.settings.prompt == prompt  # the recorded prompt keeps its tags, as AUTOMATIC1111 does
        assert [(a.name, a.te, a.unet) for a in out.loras] == [("style", 0.8, 0.8), ("peft", 0.5, 0.5)]
        with pytest.raises(InvalidInputError, match="'missing' not found"):
            pipe(**{**CALL, "prompt": "a <lora:missing:1>"}, seed=7)


def test_textual_inversion_matches_diffusers(exported_tiny_sd, tiny_sd_dir, tmp_path):
    a1111 = embedding_file(tmp_path / "shiny-style.safetensors", vectors=3, dim=32, seed=4)  # emb_params, named by its file
    single = embedding_file(tmp_path / "learned_embeds.safetensors", vectors=1, dim=32, seed=5, key="<blob>")
    prompt = "a shiny-style circle on a <blob> background"
    pipe = reference_pipeline(tiny_sd_dir)
    pipe.load_textual_inversion(str(a1111), token="shiny-style")
    pipe.load_textual_inversion(str(single))
    expected = reference_images(pipe, seed=3, **{**CALL, "prompt": prompt, "negative_prompt": "<blob>"})
    plain = reference_images(reference_pipeline(tiny_sd_dir), seed=3, **{**CALL, "prompt": prompt, "negative_prompt": "<blob>"})
    assert np.abs(expected - plain).max() > 0.01
    for backend in BACKENDS:
        ours = leansd.load(exported_tiny_sd, backend=backend, embeddings=[a1111, single])
        out = ours(**{**CALL, "prompt": prompt, "negative_prompt": "<blob>"}, seed=3, output_type="np")
        err = float(np.abs(out.images - expected).max())
        assert err < TOLERANCE, f"{backend}: max-abs {err:.2e}"
        assert sorted(e.token for e in out.embeddings) == ["<blob>", "shiny-style"]


def test_lora_fused_at_export_matches_diffusers_fuse_lora(tiny_sd_dir, lora_files, tmp_path):
    from leansd.export import export_model

    scales = {lora_files["kohya"]: 0.8, lora_files["peft"]: 0.5}
    out = export_model(tiny_sd_dir, tmp_path / "fused", progress=False,
                       loras=[f"{lora_files['kohya']}:0.8", (lora_files["peft"], 0.5)])
    expected = reference_images(_diffusers_with(tiny_sd_dir, scales, fuse=True), seed=7, **CALL)
    for backend in BACKENDS:
        got = leansd.load(out, backend=backend)(**CALL, seed=7, output_type="np").images
        assert float(np.abs(got - expected).max()) < TOLERANCE, backend
    recorded = json.loads((out / "leansd.json").read_text())["loras"]
    assert [(r["file"], r["scale"]) for r in recorded] == [("style.safetensors", 0.8), ("peft.safetensors", 0.5)]
    assert all(len(r["sha256"]) == 12 for r in recorded)


def test_large_model_layout_streamed_and_fused_attention(tiny_sd_dir, lora_files, tmp_path, monkeypatch, pipes):
    """External weights (models over 2 GB), streaming parts and fused attention, forced on the tiny model: ONNX
    Runtime injects the patched weights as external data (whole graph) or replaces initializers (parts)."""
    import leansd.export.onnx as onnx_export
    from leansd.export import export_model

    relocate = onnx_export._relocate
    monkeypatch.setattr(onnx_export, "_relocate", lambda src, dst, threshold: relocate(src, dst, 0))
    out = export_model(tiny_sd_dir, tmp_path / "large", progress=False, backends="onnx", unet_parts=3)
    assert (out / "unet" / "model.onnx_data").is_file() and (out / "unet" / "model.parts.json").is_file()
    loras = {str(lora_files["kohya"]): 0.8}
    expected = pipes["openvino"](**CALL, seed=7, output_type="np", loras=loras).images
    for low_memory in (False, True):
        got = leansd.load(out, backend="onnxruntime", low_memory=low_memory)(**CALL, seed=7, output_type="np", loras=loras).images
        assert float(np.abs(got - expected).max()) < TOLERANCE, f"low_memory={low_memory}"


def test_pickled_embedding_converts_to_what_diffusers_reads(tmp_path):
    from leansd.export.embeddings import convert
    from leansd.runtime.adapters import read_embedding

    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(0))
    torch.save({"string_to_param": {"*": vectors}, "name": "blotch", "step": 500}, tmp_path / "blotch.pt")
    converted = read_embedding(convert(tmp_path / "blotch.pt", tmp_path / "blotch.safetensors"))
    assert converted.tokens == ["blotch", "blotch_1"]
    np.testing.assert_array_equal(converted.vectors, vectors.numpy())


def test_loras_reach_the_deep_cache_parts(tiny_sd_dir, exported_tiny_sd_deepcache, lora_files):
    """The deep and shallow UNet parts get the LoRA too: equal to diffusers with the LoRA, cached by DeepCache."""
    from tests.parity.test_deepcache import deepcache_reference

    kwargs = dict(CALL, num_inference_steps=4)
    expected = reference_images(deepcache_reference(_diffusers_with(tiny_sd_dir, {lora_files["kohya"]: 0.8}), 2), seed=11, **kwargs)
    for backend in BACKENDS:
        pipe = leansd.load(exported_tiny_sd_deepcache, backend=backend)
        got = pipe(**kwargs, seed=11, deep_cache=2, output_type="np", loras={str(lora_files["kohya"]): 0.8}).images
        assert float(np.abs(got - expected).max()) < TOLERANCE, backend


def test_weight_map_locates_every_weight(exported_tiny_sd, tiny_sd_dir):
    """Every 2-D and 4-D weight of the text encoder and UNet is found in each exported file, and the bytes the map
    points at are PyTorch's values (in PyTorch's layout once un-transposed)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from leansd.runtime.adapters import WeightMap

    modules = {"unet": UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet"),
               "text_encoder": CLIPTextModel.from_pretrained(tiny_sd_dir, subfolder="text_encoder")}
    weight_map = WeightMap.read(exported_tiny_sd)
    entries = json.loads((exported_tiny_sd / "weight_map.json").read_text())["files"]
    assert set(entries) == {f"{c}/{f}" for c in modules for f in ("model.onnx", "openvino_model.xml")}
    for rel, entry in entries.items():
        params = {n: p for n, p in modules[entry["component"]].named_parameters() if p.ndim in (2, 4)}
        assert entry["unmatched"] == [] and set(entry["weights"]) == set(params), rel
        graph = weight_map.graph(exported_tiny_sd / rel)
        # ONNX stores linear weights transposed (in x out); OpenVINO's IR folds that back to PyTorch's layout
        assert any(w.transposed for w in graph.weights.values()) == rel.endswith(".onnx"), rel
        for name, param in params.items():
            np.testing.assert_array_equal(graph.base(name), param.detach().numpy(), err_msg=f"{rel}: {name}")


def test_lora_saved_by_diffusers_with_its_alpha(exported_tiny_sd, tiny_sd_dir, tmp_path):
    """A LoRA as diffusers' training scripts save it: PEFT layers on the attention projections (lora_alpha 8 at rank
    4, so scale 2), converted to diffusers' key names (`to_k.lora.down.weight`) and written by `save_lora_weights`
    with the adapter's config in the file's `lora_adapter_metadata`."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    unet.add_adapter(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=layers, safe_serialization=True,
                                              unet_lora_adapter_metadata=config.to_dict())
    path = tmp_path / "pytorch_lora_weights.safetensors"
    from leansd.runtime.adapters import read_lora

    assert {pair.scale for pair in read_lora(path).layers.values()} == {2.0}  # alpha / rank from the metadata
    expected = reference_images(_diffusers_with(tiny_sd_dir, {path: 0.7}), seed=5, **CALL)
    assert np.abs(expected - reference_images(reference_pipeline(tiny_sd_dir), seed=5, **CALL)).max() > 0.05
    for backend in BACKENDS:
        got = leansd.load(exported_tiny_sd, backend=backend)(**CALL, seed=5, output_type="np", loras={str(path): 0.7}).images
        assert float(np.abs(got - expected).max()) < TOLERANCE, backend
