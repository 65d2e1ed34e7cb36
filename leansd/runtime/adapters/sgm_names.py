"""The UNet's module names in Stability's generative-models (SGM / LDM) layout, which kohya's SDXL LoRAs use.

kohya trains SDXL on its own copy of Stability's UNet, so its SDXL LoRA files name layers like
`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q` or `lora_unet_output_blocks_0_0_in_layers_2`
rather than diffusers' `down_blocks_1_attentions_0_...` / `up_blocks_0_resnets_0_conv1`. This module gives, for
a diffusers UNet module name, its name in that layout, so such files resolve against the model's own names.

The layout numbers blocks in one flat list per direction:
- input_blocks: 0 is conv_in; then, per down block i, layer j (resnet j at `.0`, its attention at `.1`) is
  `1 + i * (L + 1) + j`, and the downsampler (`.0.op`) takes the slot after the block's L layers;
- middle_block: 0 resnet, 1 attention, 2 resnet;
- output_blocks: per up block i, layer j (L + 1 of them) is `i * (L + 1) + j`, its upsampler (`.conv`) sitting
  in the block's last slot after the resnet and, when the block has one, the attention;
with L the UNet's layers per block. Inside resnets: in_layers.2 = conv1, emb_layers.1 = time_emb_proj,
out_layers.3 = conv2, skip_connection = conv_shortcut; transformer internals keep diffusers' names.
"""
from __future__ import annotations

import re
from collections.abc import Iterable

_RESNET = {"conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "conv2": "out_layers.3", "conv_shortcut": "skip_connection",
           "norm1": "in_layers.0", "norm2": "out_layers.0"}
_TOP = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "conv_norm_out": "out.0",
        "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)(?:\.(.*))?$")
_MID = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)(?:\.(.*))?$")


class SgmNames:
    """Maps diffusers UNet module names to SGM names; built from the model's own parameter names."""

    def __init__(self, modules: Iterable[str]):
        modules = list(modules)
        down_resnets = {int(m.split(".")[3]) for m in modules if m.startswith("down_blocks.0.resnets.")}
        self.layers = max(down_resnets) + 1 if down_resnets else 0
        self._up_attentions = {int(m.split(".")[1]) for m in modules if re.match(r"^up_blocks\.\d+\.attentions\.", m)}

    def __call__(self, module: str) -> str | None:
        """The SGM name of a diffusers module (`down_blocks.1.attentions.0.proj_in` -> `input_blocks.4.1.proj_in`),
        or None when the module has none."""
        if module in _TOP:
            return _TOP[module]
        if not self.layers:
            return None
        match = _MID.match(module)
        if match:
            kind, index, rest = match.groups()
            slot = 1 if kind == "attentions" else 2 * int(index)
            return _join(f"middle_block.{slot}", kind, rest)
        match = _BLOCK.match(module)
        if match is None:
            return None
        direction, block, kind, index, rest = match.groups()
        block, index, size = int(block), int(index), self.layers + 1
        if direction == "down_blocks":
            if kind == "downsamplers":
                return _join(f"input_blocks.{(block + 1) * size}.0", kind, "op" if rest == "conv" else rest)
            return _join(f"input_blocks.{1 + block * size + index}.{int(kind == 'attentions')}", kind, rest)
        if kind == "upsamplers":
            after = 2 if block in self._up_attentions else 1
            return _join(f"output_blocks.{block * size + self.layers}.{after}", kind, rest)
        return _join(f"output_blocks.{block * size + index}.{int(kind == 'attentions')}", kind, rest)


def _join(prefix: str, kind: str, rest: str | None) -> str:
    if rest is None:
        return prefix
    if kind == "resnets":
        rest = _RESNET.get(rest, rest)
    return f"{prefix}.{rest}"
