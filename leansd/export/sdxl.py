"""What SDXL adds to an export: a second text encoder, every hidden state of both encoders, and the UNet's added
conditioning.

    text_encoder    input_ids -> last_hidden_state, pooler_output, hidden_states.0 ... hidden_states.L
    text_encoder_2  input_ids -> text_embeds, last_hidden_state, hidden_states.0 ... hidden_states.L
    unet            sample, timestep, encoder_hidden_states, text_embeds, time_ids -> out_sample

The names are Optimum's for its SDXL exports. SDXL conditions on the penultimate hidden states of each encoder
(`hidden_states.{L-1}`; clip skip reaches further back), concatenated, and on the second encoder's projected pooled
embedding (`text_embeds`) and the micro-conditioning `time_ids` (6 numbers for the base model: original size, crop
corner, target size; 5 for the refiner, whose last is an aesthetic score). The refiner has the second encoder only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

TEXT_ENCODER_2 = "text_encoder_2"


@dataclass(frozen=True)
class TextTime:
    """The numbers an SDXL export needs beyond SD's, read from the configs."""

    pooled_width: int  # text_embeds: the second encoder's projection
    time_ids: int  # 6 (base) or 5 (refiner)
    first_encoder_layers: int | None  # hidden layers of text_encoder (None: the refiner has none)
    second_encoder_layers: int
    second_encoder_width: int


def text_time(unet: dict[str, Any], text_encoder: dict[str, Any] | None, text_encoder_2: dict[str, Any] | None) -> TextTime | None:
    """The SDXL numbers of a model, or None for a model without SDXL's added conditioning."""
    if unet.get("addition_embed_type") != "text_time" or text_encoder_2 is None:
        return None
    pooled = int(text_encoder_2.get("projection_dim") or text_encoder_2["hidden_size"])
    added = int(unet["projection_class_embeddings_input_dim"]) - pooled
    return TextTime(
        pooled_width=pooled,
        time_ids=added // int(unet["addition_time_embed_dim"]),
        first_encoder_layers=None if text_encoder is None else int(text_encoder.get("num_hidden_layers", 12)),
        second_encoder_layers=int(text_encoder_2.get("num_hidden_layers", 32)),
        second_encoder_width=int(text_encoder_2["hidden_size"]),
    )


def hidden_state_names(layers: int) -> list[str]:
    """The outputs holding the embeddings (0) and each layer's hidden states (1 ... layers)."""
    return [f"hidden_states.{i}" for i in range(layers + 1)]


def wrap_text_encoder(model: Any, projected: bool) -> Any:
    """A text encoder returning its usual outputs (pooler_output, or text_embeds when `projected`) and every
    hidden state, in the order of `components.IO`."""
    import torch

    class TextEncoderWithHiddenStates(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
            out = self.model(input_ids=input_ids, output_hidden_states=True, return_dict=True)
            first = (out.text_embeds, out.last_hidden_state) if projected else (out.last_hidden_state, out.pooler_output)
            return (*first, *out.hidden_states)

    return TextEncoderWithHiddenStates().eval()


def wrap_unet(model: Any) -> Any:
    """The UNet taking its added conditioning as two named inputs (diffusers takes them in `added_cond_kwargs`)."""
    import torch

    class TextTimeUNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                    text_embeds: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
            added = {"text_embeds": text_embeds, "time_ids": time_ids}
            return self.model(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[0]

    return TextTimeUNet().eval()
