"""Long and weighted prompts, and clip skip, against a reference on the same tiny weights.

The reference is the `diffusion-prompt-embedder` package (pinned in requirements/dev.txt), which carries
AUTOMATIC1111's `parse_prompt_attention` unchanged and, driving transformers' CLIPTextModel, tokenizes each
fragment, groups the tokens in 75-token chunks wrapped in BOS/EOS and padded to 77, encodes each chunk (with the
webui's clip skip) and multiplies the hidden states by the weights. Three of the webui's rules it does not apply;
the reference below adds them, each in a few lines written from the webui's behaviour:

* BREAK: the reference parser emits the webui's break marker; chunks restart there (a trailing empty chunk is
  dropped, as the webui does);
* "Original" emphasis: after the multiplication, each chunk is rescaled to its unweighted mean;
* prompt and negative prompt padded to the same number of chunks with the empty prompt's encoding.

The webui's fourth rule, moving the words after a comma near a chunk's end into the next chunk, is off in the
corpus comparison (`comma_backtrack=0`); tests/runtime/test_prompt_chunks.py checks it, and the pipeline test
below uses prompts whose chunk ends have no comma near them, so it runs with the default.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")
dpe = pytest.importorskip("diffusion_prompt_embedder")
from diffusion_prompt_embedder.clip.tokenization import group_tokens_and_weights  # noqa: E402
from diffusion_prompt_embedder.core.embedding import encode_prompt_chunks_batched  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402

import leansd  # noqa: E402
from leansd.runtime.errors import InvalidInputError  # noqa: E402
from leansd.runtime.prompt_syntax import parse_prompt_attention  # noqa: E402
from tests.parity.prompt_corpus import CORPUS  # noqa: E402

pytestmark = pytest.mark.needs_torch

BACKENDS = ["onnxruntime", "openvino"]
TOLERANCE = 1e-4  # embeddings (hidden states of order 1); measured errors are about 1e-6
IMAGE_TOLERANCE = 1e-4  # float images in [0, 1], as tests/parity/test_pipeline.py


# ---------------------------------------------------------------- the parser


def test_corpus_is_varied_enough():
    assert len(CORPUS) >= 50
    assert sum("BREAK" in p for p in CORPUS) >= 8 and sum("\\" in p for p in CORPUS) >= 6


@pytest.mark.parametrize("prompt", CORPUS)
def test_parser_equals_the_reference(prompt):
    assert parse_prompt_attention(prompt) == [(text, weight) for text, weight in dpe.parse_prompt_attention(prompt)]


PIECES = ["(", ")", "[", "]", "\\", "\\(", "\\]", ":", ":1.5)", ":-0.3 )", ":.)", ":1.2.3)", "1.5", ".", " ", "a", "b c",
          "BREAK", "BREAK ", ",", "\n", "é"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=30).map("".join))
def test_parser_equals_the_reference_on_random_prompts(prompt):
    try:
        expected = [(text, weight) for text, weight in dpe.parse_prompt_attention(prompt)]
    except ValueError:  # a weight that is not a number: both refuse it
        with pytest.raises(InvalidInputError):
            parse_prompt_attention(prompt)
        return
    assert parse_prompt_attention(prompt) == expected


# ---------------------------------------------------------------- the embeddings


@pytest.fixture(scope="module")
def reference(tiny_sd_dir):
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd_dir / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(tiny_sd_dir / "text_encoder").eval()
    return tokenizer, encoder


def reference_chunks(prompt: str, tokenizer) -> tuple[list[list[int]], list[list[float]]]:
    """The reference's 77-token chunks of `prompt`, restarted at each BREAK."""
    segments: list[list[tuple[str, float]]] = [[]]
    for text, weight in dpe.parse_prompt_attention(prompt):
        if text == "BREAK" and weight == -1:
            segments.append([])
        else:
            segments[-1].append((text, weight))
    groups, weights = [], []
    for k, segment in enumerate(segments):
        tokens, scales = [], []
        for text, weight in segment:  # each fragment tokenized on its own, as the reference and the webui do
            ids = tokenizer(text, truncation=False).input_ids[1:-1]
            tokens += ids
            scales += [weight] * len(ids)
        if not tokens and k == len(segments) - 1 and k > 0:
            continue  # a BREAK at the very end starts no chunk
        g, w = group_tokens_and_weights(tokens, scales, pad_last_block=True)
        groups += g
        weights += w
    return groups, weights


def reference_embeddings(prompt: str, reference, clip_skip: int, count: int) -> np.ndarray:
    """(1, 77 x count, width): the reference's weighted chunks, rescaled to their unweighted means, padded with
    the empty prompt's chunk. `clip_skip` in diffusers' numbering (the reference takes the webui's: one more)."""
    tokenizer, encoder = reference
    groups, weights = reference_chunks(prompt, tokenizer)
    empty, _ = reference_chunks("", tokenizer)
    groups += empty * (count - len(groups))
    weights += [[1.0] * 77] * (count - len(weights))
    ones = [[1.0] * len(w) for w in weights]
    with torch.no_grad():
        weighted = encode_prompt_chunks_batched(encoder, [groups], [weights], "cpu", torch.float32, clip_skip + 1)
        plain = encode_prompt_chunks_batched(encoder, [groups], [ones], "cpu", torch.float32, clip_skip + 1)
    chunks = []
    for k, w in enumerate(weights):
        z, zw = plain[:, 77 * k : 77 * (k + 1)], weighted[:, 77 * k : 77 * (k + 1)]
        chunks.append(zw * (z.mean() / zw.mean()) if any(x != 1 for x in w) else zw)
    return torch.cat(chunks, dim=1).numpy()


@pytest.fixture(scope="module")
def pipes(exported_tiny_sd):
    return {b: leansd.load(exported_tiny_sd, backend=b) for b in BACKENDS}


@pytest.fixture(scope="module")
def encoders(pipes):
    """Each backend's prompt encoder, without the comma rule the reference lacks (see the module docstring)."""
    return {b: dataclasses.replace(pipe.models.prompt_encoder, comma_backtrack=0) for b, pipe in pipes.items()}


@pytest.mark.parametrize("clip_skip", [0, 1])
def test_embeddings_equal_the_reference_on_the_corpus(encoders, reference, clip_skip):
    worst = {b: 0.0 for b in BACKENDS}
    chunk_counts = set()
    for prompt in CORPUS:
        ours = {b: e.encode([prompt], clip_skip=clip_skip)["encoder_hidden_states"] for b, e in encoders.items()}
        count = ours[BACKENDS[0]].shape[1] // 77
        chunk_counts.add(count)
        expected = reference_embeddings(prompt, reference, clip_skip, count)
        for backend, got in ours.items():
            assert got.shape == expected.shape, (backend, prompt[:60])
            err = float(np.abs(got - expected).max())
            worst[backend] = max(worst[backend], err)
            assert err < TOLERANCE, f"{backend}, clip skip {clip_skip}, {prompt[:60]!r}: max-abs {err:.2e}"
    assert {1, 2, 3, 5} <= chunk_counts, chunk_counts  # short, long and > 300-token prompts were all compared
    print(f"clip_skip={clip_skip}: worst max-abs error over {len(CORPUS)} prompts: {worst}")


def test_a_longer_negative_prompt_pads_the_prompt_with_empty_chunks(encoders, reference):
    prompt, negative = "a (red:1.3) circle", "blurry BREAK ugly BREAK deformed, [low quality]"
    for encoder in encoders.values():
        cond = encoder.condition([prompt], [negative], repeat=1)
        for got, text in ((cond.positive, prompt), (cond.negative, negative)):
            np.testing.assert_allclose(got["encoder_hidden_states"], reference_embeddings(text, reference, 0, 3), atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_plain_short_prompts_encode_exactly_as_before(pipes, backend):
    """One chunk without weights: the same ids and the same single text-encoder call as before long prompts."""
    encoder = pipes[backend].models.prompt_encoder
    tokenizer, text_encoder = encoder.tokenizers[0], encoder.encoders[0]
    prompts = ["a red circle on a blue background", "", "x " * 75, "a photo: of (literally) nothing"[:9]]
    for prompt in prompts:
        before = text_encoder.encode(tokenizer([prompt])).hidden
        assert np.array_equal(encoder.encode([prompt])["encoder_hidden_states"], before), prompt


# ---------------------------------------------------------------- whole pipelines


@pytest.fixture(scope="module")
def diffusers_pipe(tiny_sd_dir):
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_long_weighted_prompts_through_the_pipeline(diffusers_pipe, pipes, reference):
    """diffusers fed the reference's embeddings equals leansd fed the prompts (default settings, comma rule on:
    these prompts have no comma near a chunk's end)."""
    prompt = ("a (tall:1.3) lighthouse on a [rocky] cliff above a stormy sea " * 8) + "BREAK ((golden hour light)) (film grain:0.8)"
    negative = "blurry [[low quality]] " * 12
    kwargs = dict(num_inference_steps=3, guidance_scale=7.5, height=32, width=32)
    count = max(len(reference_chunks(text, reference[0])[0]) for text in (prompt, negative))
    assert count == 3  # two chunks of words, then the BREAK's; the negative needs 1
    with torch.no_grad():
        expected = diffusers_pipe(prompt_embeds=torch.from_numpy(reference_embeddings(prompt, reference, 0, count)),
                        negative_prompt_embeds=torch.from_numpy(reference_embeddings(negative, reference, 0, count)),
                        generator=torch.Generator("cpu").manual_seed(4), output_type="np", **kwargs).images
    for backend, ours in pipes.items():
        got = ours(prompt, negative_prompt=negative, seed=4, output_type="np", **kwargs).images
        err = float(np.abs(got - expected).max())
        print(f"long prompt pipeline on {backend}: max-abs {err:.2e}")
        assert err < IMAGE_TOLERANCE, f"{backend}: max-abs {err:.2e}"


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_clip_skip_equals_diffusers(diffusers_pipe, pipes, clip_skip):
    """Without guidance: diffusers' own call. With guidance, diffusers encodes the negative prompt from the last
    layer whatever clip_skip says; leansd, as AUTOMATIC1111, skips layers for both, so diffusers gets both halves
    from its `encode_prompt(..., clip_skip=N)`."""
    pipe = diffusers_pipe
    prompt, negative = "a red circle on a blue background", "a green square"
    common = dict(num_inference_steps=3, height=32, width=32)
    with torch.no_grad():
        unguided = pipe(prompt, guidance_scale=1.0, clip_skip=clip_skip, generator=torch.Generator("cpu").manual_seed(9),
                        output_type="np", **common).images
        embeds = [pipe.encode_prompt(text, "cpu", 1, False, clip_skip=clip_skip)[0] for text in (prompt, negative)]
        guided = pipe(prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], guidance_scale=7.5,
                      generator=torch.Generator("cpu").manual_seed(9), output_type="np", **common).images
    for backend, ours in pipes.items():
        for expected, extra in ((unguided, dict(guidance_scale=1.0)), (guided, dict(negative_prompt=negative, guidance_scale=7.5))):
            got = ours(prompt, clip_skip=clip_skip, seed=9, output_type="np", **common, **extra).images
            plain = ours(prompt, seed=9, output_type="np", **common, **extra).images
            assert float(np.abs(plain - expected).max()) > 10 * IMAGE_TOLERANCE  # clip skip changes the image
            err = float(np.abs(got - expected).max())
            print(f"clip_skip={clip_skip} on {backend}, guidance {extra['guidance_scale']}: max-abs {err:.2e}")
            assert err < IMAGE_TOLERANCE, f"clip_skip {clip_skip} on {backend}, {extra}: max-abs {err:.2e}"


def test_clip_skip_past_the_first_layer_is_refused(pipes):
    pipe = pipes["onnxruntime"]
    with pytest.raises(InvalidInputError, match="clip_skip 3 is more than this text encoder's 2 layers allow"):
        pipe("a cat", num_inference_steps=1, height=32, width=32, clip_skip=3)
