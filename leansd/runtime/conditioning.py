"""Prompts -> everything the UNet takes besides the latents and the timestep.

A `PromptEncoder` holds one or two (tokenizer, text encoder) pairs, as the model folder has them
(`tokenizer/` + `text_encoder/`, and for SDXL-style models `tokenizer_2/` + `text_encoder_2/`). With one
encoder the UNet gets its last hidden states (SD 1.x/2.x); with two, the penultimate hidden states of each,
concatenated, and the pooled embedding of the second (diffusers' SDXL `encode_prompt`). Long and weighted prompts
are encoded in chunks, AUTOMATIC1111's way (`leansd.runtime.prompt_chunks`). The result is a
`Conditioning`: named UNet inputs for the prompt and, under guidance, for the negative prompt, plus channels
that some tasks append to the latents (inpainting masks, depth).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from leansd.runtime.errors import InvalidInputError
from leansd.runtime.models import TextEncoder
from leansd.runtime.prompt_chunks import COMMA_BACKTRACK, Chunks, apply_weights, chunk_prompt
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
    """Encodes prompts with the model's text encoder(s); `layer` -1 is the last hidden layer, -2 the penultimate.

    Prompts may be of any length and use AUTOMATIC1111's weighting syntax (`leansd.runtime.prompt_chunks`).
    `clip_skip` N (diffusers' numbering: 0 = off) takes the hidden states N layers before the one `layer` names:
    with `layer` -1, through the final layer norm (diffusers' SD 1.x/2.x pipelines); otherwise as they are (SDXL's).
    """

    tokenizers: Sequence[ClipTokenizer]
    encoders: Sequence[TextEncoder]
    layer: int = -1
    comma_backtrack: int = COMMA_BACKTRACK
    pooled: bool = False  # the UNet takes the last encoder's pooled embedding as `text_embeds` (SDXL)

    def chunks(self, prompts: list[str], prompts_2: list[str] | None = None) -> list[list[Chunks]]:
        """Each tokenizer's chunks of each prompt: the first tokenizer reads `prompts`, a second one `prompts_2`
        (default: the same prompts), as diffusers' SDXL pipelines do."""
        texts = (prompts, prompts_2 or prompts)
        return [[chunk_prompt(p, tokenizer, self.comma_backtrack) for p in texts[min(k, 1)]] for k, tokenizer in enumerate(self.tokenizers)]

    def encode(self, prompts: list[str], repeat: int = 1, clip_skip: int = 0, count: int | None = None,
               prompts_2: list[str] | None = None) -> Inputs:
        """UNet inputs for `prompts`, each repeated `repeat` times next to itself (as diffusers batches images).

        `count`: the number of chunks to encode (at least the longest prompt's; shorter prompts get empty chunks).
        `prompts_2`: what the second encoder reads (SDXL's `prompt_2`; default `prompts`).
        """
        per_tokenizer = self.chunks(prompts, prompts_2)
        count = max([count or 1, *(len(c) for chunks in per_tokenizer for c in chunks)])
        hidden, pooled = [], None
        for tokenizer, encoder, chunks in zip(self.tokenizers, self.encoders, per_tokenizer):
            chunks = [c.padded(count, tokenizer) for c in chunks]
            states = []
            for i in range(count):
                out = encoder.encode(np.stack([c.ids[i] for c in chunks]), self.layer, clip_skip)
                states.append(apply_weights(out.hidden, np.stack([c.weights[i] for c in chunks])))
                if i == 0:  # the pooled embedding of the first chunk, as the webui takes it
                    pooled = out.pooled
            hidden.append(states[0] if count == 1 else np.concatenate(states, axis=1))
        inputs = {"encoder_hidden_states": np.repeat(hidden[0] if len(hidden) == 1 else np.concatenate(hidden, axis=-1), repeat, axis=0)}
        if self.pooled and pooled is not None:
            inputs["text_embeds"] = np.repeat(pooled, repeat, axis=0)
        return inputs

    def condition(self, prompts: list[str], negatives: list[str] | None, repeat: int, clip_skip: int = 0,
                  max_chunks: int | None = None, prompts_2: list[str] | None = None,
                  negatives_2: list[str] | None = None) -> Conditioning:
        """The conditioning of a generation; `negatives` None means no guidance. Prompt and negative prompt get the
        same number of chunks. `max_chunks`: refuse prompts that need more (a UNet exported for 77 tokens only).
        `prompts_2`, `negatives_2`: what a second text encoder reads (default: `prompts`, `negatives`)."""
        negatives_2 = negatives_2 or negatives
        every = self.chunks(prompts + (negatives or []), (prompts_2 or prompts) + (negatives_2 or []))
        count = max(len(c) for chunks in every for c in chunks)
        if max_chunks is not None and count > max_chunks:
            room = self.tokenizers[0].max_length - 2
            raise InvalidInputError(
                f"the prompt or negative prompt needs {count} chunks of {room} tokens, but this model's UNet was exported "
                f"for {max_chunks} ({room} tokens, static shapes); shorten the prompt (BREAK also starts a chunk), or "
                "re-export the model without --height/--width/--batch"
            )
        positive = self.encode(prompts, repeat, clip_skip, count, prompts_2)
        return Conditioning(positive, None if negatives is None else self.encode(negatives, repeat, clip_skip, count, negatives_2))
