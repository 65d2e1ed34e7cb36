"""The denoiser: one verb, `predict`, over the UNet, with classifier-free guidance applied.

Variants are chosen at load and per call, never by branches in the loop:
- guidance batched (one UNet call on [negative, prompt]) or split (two calls of half the batch: half the
  activation memory, the same result) — a load-time choice of the memory policy;
- the whole UNet every step, or feature reuse (DeepCache: the deep features are refreshed every N steps by
  `unet_deep`, the steps between run only `unet_shallow`) — the call's `deep_cache` interval;
- the exact UNet graphs, or their token-merged twins (`sd-export --token-merging`) — the call's `token_merging`.
Weight streaming is not a variant here: the backend runs the UNet's parts behind the same session.

`Denoiser.start()` returns a `DenoiserRun` that holds one generation's state (the feature cache), so a
loaded pipeline stays immutable and can serve several threads.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from leansd.runtime.conditioning import Conditioning, Inputs
from leansd.runtime.errors import ModelFolderError
from leansd.runtime.models import UNet, prediction


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance for one generation: its scale, and how many of the first steps it applies to."""

    scale: float
    guided_steps: int  # steps 0 .. guided_steps - 1 are guided
    total_steps: int

    @classmethod
    def plan(cls, scale: float, cutoff: float, total_steps: int) -> "Guidance":
        """Guidance applies when `scale` > 1 (as in diffusers); with `cutoff` < 1 it stops after step
        int(total * cutoff), as diffusers' `SDCFGCutoffCallback(cutoff_step_ratio=cutoff)`."""
        if scale <= 1.0:
            return cls(scale, 0, total_steps)
        steps = total_steps if cutoff >= 1.0 else min(total_steps, int(total_steps * cutoff) + 1)
        return cls(scale, steps, total_steps)

    def guides(self, step: int) -> bool:
        return step < self.guided_steps

    @property
    def reuse_when_guided(self) -> bool:
        # When some steps are unguided, deep features are reused on those only: guidance multiplies the error of
        # stale features by the guidance scale (on the bundled model, reuse every 3 steps on guided steps cost
        # points of accuracy; on unguided steps, none).
        return self.guided_steps == self.total_steps


class WholeUNet:
    """Every step runs the whole UNet; nothing is kept between steps."""

    def __init__(self, unet: UNet):
        self.unet = unet

    def __call__(self, sample: np.ndarray, t: float, inputs: Inputs, step: int, branch: str, reuse: bool) -> np.ndarray:
        return prediction(self.unet.predict(sample, t, inputs))

    def expect_batch_sizes(self, sizes: frozenset[int]) -> None:
        self.unet.expect_batch_sizes(sizes)


class FeatureReuse:
    """DeepCache: the deep features of each guidance branch are refreshed every `interval` steps, and on every
    step where `reuse` is False; steps in between run only the shallow layers on the cached features."""

    def __init__(self, deep: UNet, shallow: UNet, interval: int):
        self.deep, self.shallow, self.interval = deep, shallow, interval
        self.cache: dict[str, np.ndarray] = {}  # deep features per branch: "both", "uncond" or "cond"

    def __call__(self, sample: np.ndarray, t: float, inputs: Inputs, step: int, branch: str, reuse: bool) -> np.ndarray:
        if branch == "cond" and "cond" not in self.cache and "both" in self.cache:
            self.cache["cond"] = np.split(self.cache.pop("both"), 2)[1]  # guidance stopped: keep the prompt's half
        if not reuse or step % self.interval == 0 or branch not in self.cache:
            out = self.deep.predict(sample, t, inputs)
            if "out_sample" not in out:
                raise ModelFolderError(
                    "the model folder's unet_deep is a deep-cache part from an older sd-export (features only); "
                    "re-export the model with sd-export --deep-cache"
                )
            self.cache[branch] = out["deep_features"]
            return out["out_sample"]
        return self.shallow.predict(sample, t, {**inputs, "deep_features": self.cache[branch]})["out_sample"]

    def expect_batch_sizes(self, sizes: frozenset[int]) -> None:
        # Guided steps refresh the features, so only the deep part sees both batch sizes; the shallow part
        # runs on unguided steps only (or on guided ones only, when every step is guided).
        self.deep.expect_batch_sizes(sizes)


@dataclass(frozen=True)
class Denoiser:
    """The load-time choice of how the UNet runs; `start()` begins one generation."""

    unet: UNet
    deep: UNet | None = None
    shallow: UNet | None = None
    split_guidance: bool = False
    fused_attention: bool = False  # the UNet's files compute attention blockwise (no score matrices in memory)
    streamed_bytes: int = 0  # weights a low-memory generation opens while denoising (0: loaded at load time)
    merged: "Denoiser | None" = None  # the same UNet graphs with token merging, when the folder has them

    def variant(self, token_merging: bool) -> "Denoiser":
        """The denoiser a call runs: the token-merged one when asked for (checked by the pipeline), else this one."""
        return self.merged if token_merging and self.merged is not None else self

    def start(self, guidance: Guidance, deep_cache: int = 1) -> "DenoiserRun":
        if deep_cache > 1:
            assert self.deep is not None and self.shallow is not None, "deep_cache > 1 needs the deep-cache parts"
            return DenoiserRun(FeatureReuse(self.deep, self.shallow, deep_cache), guidance, self.split_guidance)
        return DenoiserRun(WholeUNet(self.unet), guidance, self.split_guidance)

    def models(self, deep_cache: int) -> tuple[UNet, ...]:
        """The UNet files a generation with this deep-cache interval runs."""
        return (self.deep, self.shallow) if deep_cache > 1 else (self.unet,)  # type: ignore[return-value]


class DenoiserRun:
    """One generation's denoiser: `predict` returns the guided model output for a step."""

    def __init__(self, evaluate: WholeUNet | FeatureReuse, guidance: Guidance, split_guidance: bool):
        self.evaluate, self.guidance, self.split = evaluate, guidance, split_guidance
        self.hinted = False

    def predict(self, latents: np.ndarray, t: float, cond: Conditioning, step: int) -> np.ndarray:
        """The model output for the scaled `latents` at step `step` (timestep `t`)."""
        if not self.hinted and not self.split:  # (split guidance runs batch B throughout)
            self.hinted = True
            cutoff = 0 < self.guidance.guided_steps < self.guidance.total_steps  # batch 2B, then B
            self.evaluate.expect_batch_sizes(frozenset({latents.shape[0], 2 * latents.shape[0]}) if cutoff else frozenset())
        if not self.guidance.guides(step):
            return self.evaluate(cond.sample(latents), t, cond.positive, step, "cond", True)
        reuse = self.guidance.reuse_when_guided
        if self.split:
            sample = cond.sample(latents)
            uncond = self.evaluate(sample, t, cond.half("uncond"), step, "uncond", reuse)
            positive = self.evaluate(sample, t, cond.positive, step, "cond", reuse)
        else:
            batched = cond.sample(np.concatenate([latents, latents]))
            uncond, positive = np.split(self.evaluate(batched, t, cond.half("both"), step, "both", reuse), 2)
        return uncond + np.float32(self.guidance.scale) * (positive - uncond)
