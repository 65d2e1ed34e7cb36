"""LoRA and textual-inversion files made in the tests: random low-rank pairs for a tiny model's layers, saved in
the layouts people bring (kohya / AUTOMATIC1111, diffusers' PEFT), so parity tests need nothing downloaded."""
from __future__ import annotations

from pathlib import Path

import numpy as np

# Layers of the tiny UNet (tests/tiny_models.py) a LoRA changes: attention (linear), 1x1 and 3x3 convolutions, and
# the resnet's time projection (linear); and text-encoder attention and MLP layers.
UNET_LAYERS = (
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0",
    "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "up_blocks.0.attentions.1.transformer_blocks.0.attn1.to_v",
    "down_blocks.1.attentions.0.proj_in",  # 1x1 convolution
    "up_blocks.0.attentions.0.proj_out",  # 1x1 convolution
    "down_blocks.0.resnets.0.conv1",  # 3x3 convolution (LoCon)
    "up_blocks.1.resnets.1.conv2",  # 3x3 convolution (LoCon)
    "up_blocks.0.resnets.0.conv_shortcut",  # 1x1 convolution
    "mid_block.resnets.0.time_emb_proj",
)
TEXT_LAYERS = (
    "text_model.encoder.layers.0.self_attn.q_proj",
    "text_model.encoder.layers.1.self_attn.out_proj",
    "text_model.encoder.layers.1.mlp.fc1",
)


# The tiny SDXL's (tests/tiny_sdxl.py, 1 layer per block) layers a LoRA changes, with their names in Stability's layout,
# which kohya's SDXL LoRAs use (written out by hand from that layout, independently of leansd's mapping): attention
# (linear, in blocks with 2 transformer layers), linear projections, 3x3 and 1x1 convolutions, the resnets' time
# projections, the downsampler and the upsampler.
SDXL_UNET_LAYERS = {
    "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q": "input_blocks.3.1.transformer_blocks.1.attn1.to_q",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": "input_blocks.3.1.transformer_blocks.0.attn2.to_k",
    "down_blocks.1.attentions.0.proj_in": "input_blocks.3.1.proj_in",
    "down_blocks.0.resnets.0.conv1": "input_blocks.1.0.in_layers.2",
    "down_blocks.0.downsamplers.0.conv": "input_blocks.2.0.op",
    "down_blocks.1.resnets.0.time_emb_proj": "input_blocks.3.0.emb_layers.1",
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0": "middle_block.1.transformer_blocks.0.attn2.to_out.0",
    "mid_block.resnets.1.conv2": "middle_block.2.out_layers.3",
    "up_blocks.0.resnets.0.conv_shortcut": "output_blocks.0.0.skip_connection",
    "up_blocks.0.attentions.1.transformer_blocks.1.ff.net.0.proj": "output_blocks.1.1.transformer_blocks.1.ff.net.0.proj",
    "up_blocks.0.attentions.0.proj_out": "output_blocks.0.1.proj_out",
    "up_blocks.0.upsamplers.0.conv": "output_blocks.1.2.conv",
    "up_blocks.1.resnets.1.conv1": "output_blocks.3.0.in_layers.2",
}
SDXL_TEXT_LAYERS = ("text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.2.self_attn.out_proj",
                    "text_model.encoder.layers.1.mlp.fc2")


def _shapes(folder: Path, sdxl: bool = False) -> dict[str, dict[str, tuple[int, ...]]]:
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    with torch.no_grad():
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
        text = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
        if not sdxl:
            return {"unet": {n: tuple(unet.get_submodule(n).weight.shape) for n in UNET_LAYERS},
                    "text_encoder": {n: tuple(text.get_submodule(n).weight.shape) for n in TEXT_LAYERS}}
        text_2 = CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2")
        return {"unet": {n: tuple(unet.get_submodule(n).weight.shape) for n in SDXL_UNET_LAYERS},
                "text_encoder": {n: tuple(text.get_submodule(n).weight.shape) for n in SDXL_TEXT_LAYERS},
                "text_encoder_2": {n: tuple(text_2.get_submodule(n).weight.shape) for n in SDXL_TEXT_LAYERS}}


def _pair(rng: np.random.Generator, shape: tuple[int, ...], rank: int) -> tuple[np.ndarray, np.ndarray]:
    out, inp = shape[0], shape[1]
    kernel = shape[2:]
    down = rng.standard_normal((rank, inp, *kernel)).astype(np.float32) * 0.3
    up = rng.standard_normal((out, rank, *([1] * len(kernel)))).astype(np.float32) * 0.3
    return up, down


def _save(tensors: dict[str, np.ndarray], path: Path, dtype: str = "float32", metadata: dict | None = None) -> Path:
    """Save with safetensors' torch writer, so that bfloat16 (which numpy lacks) can be written too."""
    import torch
    from safetensors.torch import save_file

    cast = getattr(torch, dtype)
    save_file({k: torch.from_numpy(np.ascontiguousarray(v)).to(cast if v.ndim else torch.float32) for k, v in tensors.items()},
              str(path), metadata=metadata)
    return path


def kohya_lora(folder: Path, path: Path, seed: int, rank: int = 4, alpha: float | None = 2.0, text: bool = True,
               dtype: str = "float32") -> Path:
    """A kohya / AUTOMATIC1111 LoRA for the tiny model in `folder`: `lora_unet_..._to_q.lora_down.weight` etc.,
    stored in `dtype` (float32, float16, bfloat16)."""
    rng = np.random.default_rng(seed)
    tensors = {}
    shapes = _shapes(folder)
    for prefix, part in (("lora_unet_", "unet"), ("lora_te_", "text_encoder")):
        if part == "text_encoder" and not text:
            continue
        for module, shape in shapes[part].items():
            up, down = _pair(rng, shape, rank)
            name = prefix + module.replace(".", "_")
            tensors[f"{name}.lora_down.weight"] = down
            tensors[f"{name}.lora_up.weight"] = up
            if alpha is not None:
                tensors[f"{name}.alpha"] = np.array(alpha, dtype=np.float32)
    return _save(tensors, path, dtype, metadata={"ss_network_dim": str(rank)})


def peft_lora(folder: Path, path: Path, seed: int, rank: int = 2) -> Path:
    """A diffusers (PEFT) LoRA: `unet.<module>.lora_A.weight` / `.lora_B.weight`, `text_encoder.<module>...`, no alphas."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for part, layers in _shapes(folder).items():
        for module, shape in layers.items():
            up, down = _pair(rng, shape, rank)
            tensors[f"{part}.{module}.lora_A.weight"] = down
            tensors[f"{part}.{module}.lora_B.weight"] = up
    return _save(tensors, path)


def sdxl_kohya_lora(folder: Path, path: Path, seed: int, rank: int = 4, alpha: float | None = 2.0, dtype: str = "float32") -> Path:
    """A kohya SDXL LoRA for the tiny SDXL in `folder`: UNet layers in Stability's layout (`lora_unet_input_blocks_3_1_...`),
    `lora_te1_` / `lora_te2_` for the two text encoders."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for part, layers in _shapes(folder, sdxl=True).items():
        prefix = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}[part]
        for module, shape in layers.items():
            up, down = _pair(rng, shape, rank)
            name = prefix + (SDXL_UNET_LAYERS[module] if part == "unet" else module).replace(".", "_")
            tensors[f"{name}.lora_down.weight"] = down
            tensors[f"{name}.lora_up.weight"] = up
            if alpha is not None:
                tensors[f"{name}.alpha"] = np.array(alpha, dtype=np.float32)
    return _save(tensors, path, dtype, metadata={"ss_network_dim": str(rank), "ss_base_model_version": "sdxl_base_v1-0"})


def sdxl_peft_lora(folder: Path, path: Path, seed: int, rank: int = 2) -> Path:
    """A diffusers (PEFT) SDXL LoRA: `unet.`, `text_encoder.` and `text_encoder_2.` layers with lora_A / lora_B."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for part, layers in _shapes(folder, sdxl=True).items():
        for module, shape in layers.items():
            up, down = _pair(rng, shape, rank)
            tensors[f"{part}.{module}.lora_A.weight"] = down
            tensors[f"{part}.{module}.lora_B.weight"] = up
    return _save(tensors, path)


def sdxl_embedding_file(path: Path, vectors: int, dims: tuple[int, int], seed: int) -> Path:
    """An AUTOMATIC1111 SDXL textual-inversion file: `clip_l` (vectors x dims[0]) and `clip_g` (vectors x dims[1])."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    save_file({"clip_l": rng.standard_normal((vectors, dims[0])).astype(np.float32),
               "clip_g": rng.standard_normal((vectors, dims[1])).astype(np.float32)}, str(path))
    return path


def embedding_file(path: Path, vectors: int, dim: int, seed: int, key: str | None = None) -> Path:
    """A textual-inversion file: diffusers' layout ({token: vectors}) when `key` is given, else AUTOMATIC1111's
    (`emb_params`)."""
    from safetensors.numpy import save_file

    values = np.random.default_rng(seed).standard_normal((vectors, dim)).astype(np.float32)
    save_file({key or "emb_params": values if vectors > 1 or key is None else values[0]}, str(path))
    return path


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None,
                      bf16: bool = False) -> Path:
    """Write a `.safetensors` file with numpy alone (for the torch-free tests); `bf16` stores float tensors as
    bfloat16 (their upper 16 bits: values with zero low bits round-trip exactly)."""
    import json
    import struct

    header: dict = {"__metadata__": metadata} if metadata else {}
    blobs, offset = [], 0
    for name, value in tensors.items():
        value = np.ascontiguousarray(value, dtype=np.float32)
        raw = (value.view(np.uint32) >> 16).astype("<u2").tobytes() if bf16 and value.ndim else value.astype("<f4").tobytes()
        header[name] = {"dtype": "BF16" if bf16 and value.ndim else "F32", "shape": list(value.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))
    return path


def kohya_lora_from_map(folder: Path, path: Path, seed: int, rank: int = 2, scale: float = 0.3, bf16: bool = False,
                        layers: int = 8, pick=None) -> Path:
    """A kohya LoRA for an exported folder, its layers chosen from the folder's weight_map.json (no torch needed):
    the first `layers` 2-D and 4-D UNet weights and two text-encoder layers, or every weight `pick(component, name)`
    accepts."""
    import json

    files = json.loads((folder / "weight_map.json").read_text())["files"]
    rng = np.random.default_rng(seed)
    tensors = {}
    for component, prefix, count in (("unet", "lora_unet_", layers), ("text_encoder", "lora_te_", 2)):
        entry = next(e for e in files.values() if e["component"] == component)
        params = [p for p in entry["weights"] if "layers" in p or component == "unet"]
        params = [p for p in params if pick(component, p)] if pick is not None else params[:count]
        for param in params:
            _, transposed, _, shape = entry["weights"][param]
            shape = tuple(reversed(shape)) if transposed else tuple(shape)
            up, down = _pair(rng, shape, rank)
            name = prefix + param[: -len(".weight")].replace(".", "_")
            tensors[f"{name}.lora_down.weight"] = down * scale
            tensors[f"{name}.lora_up.weight"] = up
            tensors[f"{name}.alpha"] = np.array(float(rank), np.float32)
    return write_safetensors(path, tensors, {"ss_network_dim": str(rank)}, bf16=bf16)
