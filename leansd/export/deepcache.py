"""The UNet cut in two for feature reuse across steps (the DeepCache approach, arXiv 2312.00858).

Adjacent denoising steps change the UNet's deep features little. The UNet is exported as two graphs:

    unet_deep     sample, timestep, encoder_hidden_states                 -> out_sample, deep_features
    unet_shallow  sample, timestep, encoder_hidden_states, deep_features  -> out_sample

`deep_features` is the hidden state entering the second-to-last layer of the last up block: everything
below the first layer of the first down block, and everything above, is "deep". `unet_deep` is the whole
UNet with that hidden state as a second output, so a step that refreshes the cache is one plain UNet call.
`unet_shallow` recomputes only the shallow branch (conv_in, the first down layer, the last two up layers, the
output head), so a step that reuses cached features costs a fraction of a full step.

Why not a deep graph that stops at the cut, with refresh = deep then shallow: that repeats conv_in and the
first down layer (a top-resolution attention block) on every refresh, 0.107 TFLOP of SD 1.5's 1.607 per
guided step, plus a second session call. The two graphs still hold one UNet's weights plus the shallow
branch's (about 2 % of SD 1.5's). SD 1.x / 2.x UNets and SDXL's (whose added conditioning, `text_embeds` and
`time_ids`, both parts take as two more inputs) are supported; other added embeddings are refused.
"""
from __future__ import annotations

from typing import Any

from leansd.export.errors import ExportError
from leansd.runtime.manifest import UNET_DEEP, UNET_SHALLOW

PARTS = (UNET_DEEP, UNET_SHALLOW)
TEXT_TIME = "text_time"  # SDXL's added conditioning


def _conditioning(unet: Any, extra: tuple) -> tuple[dict[str, Any] | None, Any]:
    """The inputs after the part's own, as diffusers takes them: SDXL's `added_cond_kwargs` (text_embeds, time_ids),
    or an LCM-distilled UNet's `timestep_cond` (the guidance embedding); (None, None) for SD's."""
    if unet.config.addition_embed_type == TEXT_TIME:
        text_embeds, time_ids = extra
        return {"text_embeds": text_embeds, "time_ids": time_ids}, None
    return None, (extra[0] if unet.config.time_cond_proj_dim is not None else None)


def check_supported(config: dict[str, Any]) -> None:
    """Raise `ExportError` naming the reason when this UNet cannot be split for feature reuse."""
    problems = []
    if not isinstance(config.get("layers_per_block", 2), int):
        problems.append("per-block layers_per_block")
    for key in ("class_embed_type", "num_class_embeds", "addition_embed_type", "encoder_hid_dim_type"):
        if config.get(key) is not None and not (key == "addition_embed_type" and config[key] == TEXT_TIME):
            problems.append(key)
    if len(config.get("block_out_channels", ())) < 2:
        problems.append("a single-level UNet")
    if problems:
        raise ExportError(
            f"--deep-cache supports SD 1.x/2.x and SDXL UNets; this one has {', '.join(problems)}; export without --deep-cache"
        )


def feature_channels(config: dict[str, Any]) -> int:
    """Channels of `deep_features` (0 if the UNet cannot be split): the output width of the block before the
    last up block when that block has one layer (layers_per_block 1), else the last up block's own width."""
    channels = list(config.get("block_out_channels", ()))
    layers = config.get("layers_per_block", 2)
    if not isinstance(layers, int) or len(channels) < 2:
        return 0
    return channels[1] if layers == 1 else channels[0]


def _layers(unet: Any) -> int:
    return len(unet.up_blocks[-1].resnets) - 1  # the last up block has layers_per_block + 1 layers


def _attention(block: Any, index: int, hidden: Any, context: Any) -> Any:
    attentions = getattr(block, "attentions", None)
    if not attentions:
        return hidden
    return attentions[index](hidden, encoder_hidden_states=context, return_dict=False)[0]


def wrap_deep(unet: Any) -> Any:
    """A module: (sample, timestep, encoder_hidden_states[, text_embeds, time_ids | timestep_cond]) -> (out_sample,
    deep_features), diffusers' own forward (SDXL's UNet takes its added conditioning as the two last inputs, an
    LCM-distilled UNet its guidance embedding as the last).

    The feature is read with a hook on the layer that consumes it, so the whole graph is diffusers' code path,
    shape-dependent upsampling included.
    """
    import torch

    check_supported(dict(unet.config))
    layers = _layers(unet)
    skip_channels = unet.config.block_out_channels[0]
    consumer = unet.up_blocks[-1].resnets[layers - 1]

    class UNetDeep(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = unet

        def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                    *extra: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            captured: list[torch.Tensor] = []

            def grab(_module: Any, args: tuple) -> None:
                # The consumer's input is cat([deep features, skip]); keep the deep half.
                captured.append(args[0][:, : args[0].shape[1] - skip_channels])

            handle = consumer.register_forward_pre_hook(grab)
            try:
                added, timestep_cond = _conditioning(self.model, extra)
                (out,) = self.model(sample, timestep, encoder_hidden_states, timestep_cond=timestep_cond, added_cond_kwargs=added,
                                    return_dict=False)
            finally:
                handle.remove()
            return out, captured[0]

    return UNetDeep().eval()


def wrap_shallow(unet: Any) -> Any:
    """A module: (sample, timestep, encoder_hidden_states, deep_features[, text_embeds, time_ids | timestep_cond]) -> out_sample."""
    import torch

    check_supported(dict(unet.config))
    layers = _layers(unet)

    class UNetShallow(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = unet

        def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor, deep_features: torch.Tensor,
                    *extra: torch.Tensor) -> torch.Tensor:
            m = self.model
            added, timestep_cond = _conditioning(m, extra)
            emb = m.time_embedding(m.get_time_embed(sample=sample, timestep=timestep), timestep_cond)
            if added is not None:  # SDXL: the pooled text and size embeddings join the time embedding, as in forward()
                emb = emb + m.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added)
            if m.time_embed_act is not None:
                emb = m.time_embed_act(emb)
            first = m.conv_in(sample)
            down = m.down_blocks[0]
            skip = _attention(down, 0, down.resnets[0](first, emb), encoder_hidden_states)
            up = m.up_blocks[-1]
            hidden = deep_features
            # The last up block's final two layers consume the first down layer's output, then conv_in's.
            for index, res in ((layers - 1, skip), (layers, first)):
                hidden = up.resnets[index](torch.cat([hidden, res], dim=1), emb)
                hidden = _attention(up, index, hidden, encoder_hidden_states)
            if m.conv_norm_out is not None:
                hidden = m.conv_act(m.conv_norm_out(hidden))
            return m.conv_out(hidden)

    return UNetShallow().eval()
