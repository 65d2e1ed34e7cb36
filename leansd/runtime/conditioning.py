"""Prompts -> everything the UNet takes besides the latents and the timestep.

A `PromptEncoder` holds one or two (tokenizer, text encoder) pairs, as the model folder has them
(`tokenizer/` + `text_encoder/`, and for SDXL-style models `tokenizer_2/` + `text_encoder_2/`). With one
encoder the UNet gets its last hidden states (SD 1.x/2.x); with two, the penultimate hidden states of each,
concatenated, and the pooled embedding of the second (diffusers' SDXL `encode_prompt`). The result is a
`Conditioning`: named UNet inputs for the prompt and, under guidance, for the negative prompt, plus channels
that some tasks append to the latents (inpainting masks, depth).
"""
from __future__ import annotations

from collections.abc import Sequence
import warnings
from dataclasses import dataclass, field

import numpy as np

from leansd.runtime.errors import LeanSDWarning
from leansd.runtime.models import TextEncoder
from leansd.runtime.tokenizer import ClipTokenizer

Inputs = dict[str, np.ndarray]


@dataclass(frozen=True)
class Conditioning:
    """The UNet's conditioning for one generation: `positive` for the prompt, `negative` for classifier-free
    guidance's unconditional half (None without guidance), `concat`: channels appended to the latents."""

    positive: Inputs
    negative: Inputs | None = None
    concat: np.ndarray | None = field(default=None)

    def half(self, which: str) -> Inputs:
        """"cond" (the prompt), "uncond" (the negative prompt) or "both" (batched as diffusers does: uncond first)."""
        if which == "cond":
            return self.positive
        assert self.negative is not None, "guidance needs the negative prompt's conditioning"
        if which == "uncond":
            return self.negative
        return {k: np.concatenate([self.negative[k], self.positive[k]]) for k in self.positive}

    def sample(self, latents: np.ndarray) -> np.ndarray:
        """The UNet's `sample`: the latents, with the task's extra channels when it has some."""
        if self.concat is None:
            return latents
        extra = np.concatenate([self.concat] * (latents.shape[0] // self.concat.shape[0]))
        return np.concatenate([latents, extra], axis=1)

    def with_inputs(self, **inputs: np.ndarray) -> "Conditioning":
        """The same conditioning with more named UNet inputs (the same for both halves, e.g. time ids)."""
        negative = None if self.negative is None else {**self.negative, **inputs}
        return Conditioning({**self.positive, **inputs}, negative, self.concat)


@dataclass(frozen=True)
class PromptEncoder:
    """Encodes prompts with the model's text encoder(s); `layer` -1 is the last hidden layer, -2 the penultimate."""

    tokenizers: Sequence[ClipTokenizer]
    encoders: Sequence[TextEncoder]
    layer: int = -1

    def encode(self, prompts: list[str], repeat: int = 1) -> Inputs:
        """UNet inputs for `prompts`, each repeated `repeat` times next to itself (as diffusers batches images)."""
        for prompt in dict.fromkeys(prompts):
            tokenizer = self.tokenizers[0]
            count, room = len(tokenizer.encode(prompt)), tokenizer.max_length - 2
            if count > room:
                warnings.warn(f"a prompt has {count} tokens; the text encoder reads the first {room} and ignores the rest "
                              f"({prompt[:40]!r}...): shorten it", LeanSDWarning, stacklevel=2)
        outputs = [encoder.encode(tokenizer(prompts), self.layer) for tokenizer, encoder in zip(self.tokenizers, self.encoders)]
        hidden = outputs[0].hidden if len(outputs) == 1 else np.concatenate([o.hidden for o in outputs], axis=-1)
        inputs = {"encoder_hidden_states": np.repeat(hidden, repeat, axis=0)}
        if len(outputs) > 1 and outputs[-1].pooled is not None:
            inputs["text_embeds"] = np.repeat(outputs[-1].pooled, repeat, axis=0)
        return inputs

    def condition(self, prompts: list[str], negatives: list[str] | None, repeat: int) -> Conditioning:
        """The conditioning of a generation; `negatives` None means no guidance."""
        positive = self.encode(prompts, repeat)
        return Conditioning(positive, None if negatives is None else self.encode(negatives, repeat))
