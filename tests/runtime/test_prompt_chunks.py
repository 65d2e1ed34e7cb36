"""Long prompts cut into 77-token chunks, and weights on hidden states, on CLIP's real vocabulary (torch-free).

tests/parity/test_prompts.py checks the same against a reference implementation and the exported text encoders.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from leansd.runtime.conditioning import PromptEncoder
from leansd.runtime.errors import InvalidInputError
from leansd.runtime.models import EncodedText
from leansd.runtime.prompt_chunks import apply_weights, chunk_prompt
from leansd.runtime.tokenizer import ClipTokenizer

CLIP = Path(__file__).resolve().parents[2] / "leansd" / "export" / "configs" / "clip"


@pytest.fixture(scope="module")
def tok() -> ClipTokenizer:
    return ClipTokenizer.from_files(CLIP / "vocab.json", CLIP / "merges.txt")


def content(chunks, row):
    """The prompt tokens of one chunk: between BOS and the first EOS."""
    ids = list(chunks.ids[row])
    return ids[1 : ids.index(49407)]


def test_a_short_plain_prompt_is_one_chunk_with_the_tokenizers_ids(tok):
    for prompt in ["a red circle on a blue background", "", "x " * 75]:
        chunks = chunk_prompt(prompt, tok)
        assert len(chunks) == 1 and not chunks.weighted
        np.testing.assert_array_equal(chunks.ids, tok(prompt))


def test_long_prompts_fill_chunks_of_75_tokens(tok):
    chunks = chunk_prompt("x " * 160, tok)  # 160 one-token words, no comma
    assert chunks.ids.shape == (3, 77)
    assert [len(content(chunks, r)) for r in range(3)] == [75, 75, 10]
    assert (chunks.ids[:, 0] == tok.bos_token_id).all() and (chunks.ids[:2, 76] == tok.eos_token_id).all()
    assert chunk_prompt("x " * 150, tok).ids.shape == (2, 77)  # exactly full: no empty third chunk


def test_a_comma_near_the_end_of_a_full_chunk_moves_the_rest_to_the_next(tok):
    x, y, comma = tok.encode("x")[0], tok.encode("y")[0], tok.encode(",")[0]
    prompt = "x " * 70 + ", " + "y " * 10  # 81 tokens: the chunk fills with 4 y after the comma
    moved = chunk_prompt(prompt, tok)
    assert content(moved, 0) == [x] * 70 + [comma] and content(moved, 1) == [y] * 10
    kept = chunk_prompt(prompt, tok, comma_backtrack=0)
    assert content(kept, 0) == [x] * 70 + [comma] + [y] * 4 and content(kept, 1) == [y] * 6
    far = chunk_prompt("x " * 50 + ", " + "y " * 30, tok)  # the comma is 25 tokens back: past the limit of 20
    assert content(far, 0) == [x] * 50 + [comma] + [y] * 24


def test_break_ends_a_chunk(tok):
    a, b = tok.encode("a")[0], tok.encode("b")[0]
    chunks = chunk_prompt("a BREAK b", tok)
    assert len(chunks) == 2 and content(chunks, 0) == [a] and content(chunks, 1) == [b]
    assert len(chunk_prompt("a BREAK", tok)) == 1
    assert [content(chunk_prompt("BREAK a BREAK BREAK b", tok), r) for r in range(4)] == [[], [a], [], [b]]


def test_weights_follow_their_tokens_across_chunks(tok):
    chunks = chunk_prompt("x " * 74 + "(red big:1.5) [blue]", tok)
    assert chunks.weights[0, 75] == pytest.approx(1.5) and chunks.weights[1, 1] == pytest.approx(1.5)
    assert chunks.weights[1, 2] == pytest.approx(1 / 1.1)
    assert (chunks.weights[:, [0, 76]] == 1).all() and (chunks.weights[1, 3:] == 1).all()
    assert content(chunks, 1) == tok.encode("big") + tok.encode("blue")


def test_padding_adds_empty_prompt_chunks(tok):
    chunks = chunk_prompt("a", tok).padded(3, tok)
    np.testing.assert_array_equal(chunks.ids[1:], np.repeat(tok(""), 2, axis=0))


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(0.1, 3.0), min_size=75, max_size=75), st.integers(0, 2**32 - 1))
def test_weights_scale_tokens_and_keep_the_chunk_mean(weights, seed):
    hidden = np.random.default_rng(seed).normal(0.3, 1.0, (2, 77, 8)).astype(np.float32)
    w = np.ones((2, 77), np.float32)
    w[1, 1:76] = weights  # BOS and EOS keep weight 1, as in every chunk
    out = apply_weights(hidden, w)
    assert np.array_equal(out[0], hidden[0])  # unweighted rows untouched
    if (w[1] == 1).all():
        return
    scaled = hidden[1] * w[1][:, None]
    factor = hidden[1].mean(dtype=np.float64) / scaled.mean(dtype=np.float64)
    np.testing.assert_allclose(out[1], scaled * factor, rtol=1e-5, atol=1e-5 * max(1.0, abs(factor)))
    assert out[1].mean(dtype=np.float64) == pytest.approx(hidden[1].mean(dtype=np.float64), rel=1e-4, abs=1e-6)


class RowEncoder:
    """A stand-in text encoder: each token's hidden state is (its id, its position) so chunks can be traced."""

    def __init__(self):
        self.calls = []

    def encode(self, ids, layer=-1, clip_skip=0):
        self.calls.append((ids.copy(), clip_skip))
        positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
        return EncodedText(np.stack([ids, positions], axis=-1).astype(np.float32), np.zeros((ids.shape[0], 2), np.float32))


def test_prompt_and_negative_get_the_same_number_of_chunks(tok):
    encoder = RowEncoder()
    cond = PromptEncoder([tok], [encoder]).condition(["x " * 100], ["blurry"], repeat=2, clip_skip=1)
    positive, negative = cond.positive["encoder_hidden_states"], cond.negative["encoder_hidden_states"]
    assert positive.shape == negative.shape == (2, 154, 2)
    np.testing.assert_array_equal(negative[0, 77:, 0], tok("")[0])  # the negative's second chunk: the empty prompt
    assert [c[1] for c in encoder.calls] == [1, 1, 1, 1]  # two chunks each, one call per chunk, clip skip passed on


def test_static_models_refuse_prompts_longer_than_one_chunk(tok):
    enc = PromptEncoder([tok], [RowEncoder()])
    enc.condition(["x " * 75], [""], 1, max_chunks=1)
    with pytest.raises(InvalidInputError, match="needs 2 chunks of 75 tokens.*static shapes"):
        enc.condition(["a"], ["x " * 76], 1, max_chunks=1)
