"""Prompts of any length, with weights: AUTOMATIC1111's chunks and its "Original" emphasis.

A prompt is parsed (`prompt_syntax`), each fragment tokenized on its own, and the tokens cut into chunks of the
text encoder's length minus two (75 for CLIP): each chunk is BOS + tokens + EOS, padded to the full length (77),
and every token keeps its fragment's weight (1 for BOS, EOS and padding). Where a chunk fills up:

* `BREAK` closes the current chunk early (padding the rest);
* when a full chunk had a comma among its last `comma_backtrack` tokens (20, the webui's default), the tokens after
  that comma move to the next chunk, so a phrase is not cut in two.

Each chunk is encoded on its own and the hidden states are joined along the sequence axis (77, 154, 231... tokens).
A prompt and its negative prompt get the same number of chunks: the shorter is padded with the encoding of the
empty prompt, as the webui does. A prompt of at most 75 tokens without weights is one chunk with exactly the ids
diffusers' tokenizer call gives, so its encoding is unchanged.

Weights ("Original" emphasis): a chunk's hidden states are multiplied token by token by the weights, then scaled
by one factor so that their mean over the chunk is what it was before. The webui takes that mean over all the
prompts encoded together; here it is taken per prompt, so an image does not depend on the other prompts of its
batch (the same numbers whenever the batch holds one prompt).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from leansd.runtime.prompt_syntax import BREAK_MARKER, parse_prompt_attention
from leansd.runtime.tokenizer import ClipTokenizer

COMMA_BACKTRACK = 20  # the webui's "prompt word wrap length limit"
COMMA = ",</w>"


@dataclass(frozen=True)
class Chunks:
    """A prompt as the text encoder takes it: `ids` (chunks, length) int64 and per-token `weights` (float32)."""

    ids: np.ndarray
    weights: np.ndarray

    def __len__(self) -> int:
        return self.ids.shape[0]

    @property
    def weighted(self) -> bool:
        return bool((self.weights != 1).any())

    def padded(self, count: int, tokenizer: ClipTokenizer) -> "Chunks":
        """These chunks followed by empty-prompt chunks up to `count`."""
        if count <= len(self):
            return self
        empty = chunk_prompt("", tokenizer)
        extra = count - len(self)
        return Chunks(np.concatenate([self.ids, np.repeat(empty.ids, extra, axis=0)]),
                      np.concatenate([self.weights, np.repeat(empty.weights, extra, axis=0)]))


def chunk_prompt(prompt: str, tokenizer: ClipTokenizer, comma_backtrack: int = COMMA_BACKTRACK) -> Chunks:
    """The chunks of one prompt (see the module docstring)."""
    room = tokenizer.max_length - 2
    comma = tokenizer.token_id(COMMA)
    done: list[tuple[list[int], list[float]]] = []
    tokens: list[int] = []
    weights: list[float] = []
    last_comma = -1  # index in `tokens` of the last comma of the current chunk

    def close() -> None:
        nonlocal tokens, weights, last_comma
        done.append((tokens, weights))
        tokens, weights, last_comma = [], [], -1

    for text, weight in parse_prompt_attention(prompt):
        if (text, weight) == BREAK_MARKER:
            close()
            continue
        for token in tokenizer.encode(text):
            if token == comma:
                last_comma = len(tokens)
            elif comma_backtrack and len(tokens) == room and last_comma >= 0 and room - last_comma <= comma_backtrack:
                cut = last_comma + 1
                moved = tokens[cut:], weights[cut:]
                tokens, weights = tokens[:cut], weights[:cut]
                close()
                tokens, weights = moved
            if len(tokens) == room:
                close()
            tokens.append(token)
            weights.append(weight)
    if tokens or not done:
        close()

    ids = np.full((len(done), room + 2), tokenizer.pad_token_id, dtype=np.int64)
    scales = np.ones((len(done), room + 2), dtype=np.float32)
    for row, (chunk_tokens, chunk_weights) in enumerate(done):
        n = len(chunk_tokens)
        ids[row, : n + 2] = [tokenizer.bos_token_id, *chunk_tokens, tokenizer.eos_token_id]
        scales[row, 1 : n + 1] = chunk_weights
    return Chunks(ids, scales)


def apply_weights(hidden: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Hidden states (batch, length, width) of one chunk per prompt, scaled token by token by `weights` (batch, length),
    each prompt's then rescaled to its original mean. Rows without weights are returned bit for bit."""
    out = hidden
    for row in np.flatnonzero((weights != 1).any(axis=1)):
        if out is hidden:
            out = hidden.copy()
        scaled = hidden[row] * weights[row, :, None].astype(np.float32)
        new_mean = scaled.mean(dtype=np.float64)
        # A mean of exactly 0 (every token weighted 0 would need BOS and EOS at 0 too) cannot be restored.
        factor = hidden[row].mean(dtype=np.float64) / new_mean if new_mean else 1.0
        out[row] = scaled * np.float32(factor)
    return out
