"""The pieces between the prompt and the UNet, on stand-in encoders and UNets (torch-free, no model files).

What these check is the bookkeeping the parity tests cannot isolate: which layer and which encoder each UNet
input comes from, the batch order under guidance, which steps are guided, and which UNet call each step makes
under feature reuse.
"""
from __future__ import annotations

import numpy as np
import pytest

from leansd.runtime.conditioning import Conditioning, PromptEncoder
from leansd.runtime.denoiser import Denoiser, Guidance
from leansd.runtime.models import EncodedText
from leansd.runtime.settings import GenerationSettings
from leansd.runtime.errors import InvalidInputError


class FakeTokenizer:
    """One token (id 7) per character; no comma in its vocabulary."""

    max_length, bos_token_id, eos_token_id, pad_token_id = 77, 1000, 1001, 1001

    def encode(self, prompt):
        return [7] * len(prompt)

    def token_id(self, token):
        return None


class FakeEncoder:
    """Hidden states whose value says (encoder, layer, prompt length); pooled = 100 * encoder + length."""

    def __init__(self, k: int, width: int):
        self.k, self.width = k, width

    def encode(self, ids, layer=-1, clip_skip=0):
        lengths = (ids == 7).sum(axis=1)
        hidden = np.stack([np.full((ids.shape[1], self.width), 10 * self.k + layer + 0.01 * n, np.float32) for n in lengths])
        return EncodedText(hidden, np.array([[100.0 * self.k + n] for n in lengths], np.float32))


def test_one_encoder_gives_its_last_hidden_states_repeated_per_image():
    enc = PromptEncoder([FakeTokenizer()], [FakeEncoder(1, 3)])
    cond = enc.condition(["ab", "abcd"], ["", "x"], repeat=2)
    hidden = cond.positive["encoder_hidden_states"]
    assert hidden.shape == (4, 77, 3) and set(cond.positive) == {"encoder_hidden_states"}  # no pooled input for SD 1.x/2.x
    np.testing.assert_allclose(hidden[:, 0, 0], [9.02, 9.02, 9.04, 9.04])  # layer -1; each prompt's images adjacent
    both = cond.half("both")["encoder_hidden_states"]
    np.testing.assert_allclose(both[:, 0, 0], [9.0, 9.0, 9.01, 9.01, 9.02, 9.02, 9.04, 9.04])  # negatives first


def test_two_encoders_concatenate_penultimate_states_and_pool_the_second():
    enc = PromptEncoder([FakeTokenizer(), FakeTokenizer()], [FakeEncoder(1, 3), FakeEncoder(2, 5)], layer=-2, pooled=True)
    inputs = enc.encode(["abc"])
    hidden = inputs["encoder_hidden_states"]
    assert hidden.shape == (1, 77, 8)
    np.testing.assert_allclose(hidden[0, 0], [8.03] * 3 + [18.03] * 5)
    np.testing.assert_allclose(inputs["text_embeds"], [[203.0]])
    # Without `pooled` (a UNet that takes no text_embeds) only the hidden states go out.
    assert set(PromptEncoder(enc.tokenizers, enc.encoders, layer=-2).encode(["abc"])) == {"encoder_hidden_states"}


def test_conditioning_extra_inputs_and_channels():
    cond = Conditioning({"h": np.ones((1, 2))}, {"h": np.zeros((1, 2))}, concat=np.full((1, 5, 4, 4), 7.0, np.float32))
    cond = cond.with_inputs(time_ids=np.arange(6.0)[None])
    assert set(cond.half("uncond")) == {"h", "time_ids"} and cond.half("both")["time_ids"].shape == (2, 6)
    sample = cond.sample(np.zeros((2, 4, 4, 4), np.float32))
    assert sample.shape == (2, 9, 4, 4) and (sample[:, 4:] == 7).all()


@pytest.mark.parametrize("scale, cutoff, total, guided", [(7.5, 1.0, 10, 10), (7.5, 0.3, 10, 4), (7.5, 0.0, 10, 1), (1.0, 1.0, 10, 0)])
def test_guidance_plan_follows_diffusers_cutoff_callback(scale, cutoff, total, guided):
    # SDCFGCutoffCallback switches guidance off at step int(total * ratio), after that step ran guided.
    plan = Guidance.plan(scale, cutoff, total)
    assert [plan.guides(i) for i in range(total)] == [i < guided for i in range(total)]


class RecordingUNet:
    def __init__(self, name, calls):
        self.name, self.calls, self.expected_batches = name, calls, None

    def expect_batch_sizes(self, sizes):
        self.expected_batches = sizes

    def predict(self, sample, t, inputs):
        self.calls.append((self.name, sample.shape[0], "deep_features" in inputs))
        out = {"out_sample": sample * 0 + inputs["encoder_hidden_states"].mean()}
        if self.name == "deep":
            out["deep_features"] = np.full((sample.shape[0], 1), float(len(self.calls)))
        return out


@pytest.mark.parametrize("split", [False, True])
def test_feature_reuse_refreshes_on_schedule_and_keeps_the_prompts_half_at_the_cutoff(split):
    calls = []
    unets = [RecordingUNet(name, calls) for name in ("whole", "deep", "shallow")]
    denoiser = Denoiser(*unets, split)
    cond = Conditioning({"encoder_hidden_states": np.ones((1, 3))}, {"encoder_hidden_states": np.zeros((1, 3))})
    run = denoiser.start(Guidance.plan(5.0, 0.4, 8), deep_cache=3)  # steps 0-3 guided (int(8 * 0.4) = 3), 4-7 not
    latents = np.zeros((1, 4, 2, 2), np.float32)
    for step in range(8):
        out = run.predict(latents, 500.0, cond, step)
        assert out.shape == latents.shape
    names = [c[0] for c in calls]
    halves = 2 if split else 1
    # Guided steps refresh every time (reuse on guided steps would multiply stale features by the scale).
    assert names[: 4 * halves] == ["deep"] * 4 * halves
    # Unguided: step 4 reuses the prompt's half of step 3's features, 6 refreshes (6 % 3 == 0), 5 and 7 reuse.
    assert names[4 * halves :] == ["shallow", "shallow", "deep", "shallow"]
    assert all(batch == 1 for _, batch, _ in calls[4 * halves :])
    assert "whole" not in names
    # The deep part is told it will run at batch 2 and 1 (one compile for both); split guidance runs batch 1 only.
    assert [u.expected_batches for u in unets] == [None, None if split else {1, 2}, None]


def test_settings_are_checked_once_with_named_errors():
    s = GenerationSettings(scheduler="euler").merged(num_inference_steps=20, guidance_scale=None)
    assert s.scheduler == "euler" and s.num_inference_steps == 20 and s.guidance_scale is None
    for bad, message in [({"num_inference_steps": 2.5}, "num_inference_steps must be a whole number"),
                         ({"deep_cache": True}, "deep_cache must be a whole number"),
                         ({"guidance_cutoff": 1.5}, "guidance_cutoff must be a fraction"),
                         ({"output_type": "jpeg"}, "output_type 'jpeg'"),
                         ({"steps": 3}, "unknown option\\(s\\) steps")]:
        with pytest.raises(InvalidInputError, match=message):
            GenerationSettings().merged(**bad)
