"""Guidance as a UNet input: latent consistency models distilled with their guidance scale built in.

An LCM-distilled UNet (diffusers' `time_cond_proj_dim` set, e.g. LCM_Dreamshaper_v7) was trained to give the guided
prediction in one call: the scale enters as a sinusoidal embedding (`timestep_cond`) added to the time embedding,
and classifier-free guidance's second, unconditional call is not made. diffusers' pipelines embed `scale - 1`,
multiplied by 1000, with the same sinusoid as the UNet's timesteps except that sine comes before cosine.
"""
from __future__ import annotations

import numpy as np

from leansd.runtime.conditioning import Conditioning

INPUT = "timestep_cond"
# What diffusers' LatentConsistencyModelPipeline uses when no value is given.
DEFAULTS = {"num_inference_steps": 4, "guidance_scale": 8.5}


def width(unet_config: dict) -> int | None:
    """The embedding width this UNet takes (`time_cond_proj_dim`), or None when guidance is not an input of it."""
    dim = unet_config.get("time_cond_proj_dim")
    return None if dim is None else int(dim)


def embed(scale: float, dim: int, batch: int) -> np.ndarray:
    """The (batch, dim) float32 embedding of guidance `scale`, computed in float64 and rounded once (the frequency
    step excepted: diffusers rounds it to float32 whatever the dtype, so it is the same number here).

    diffusers computes it in float32, where the angles (up to 1000 x (scale - 1) radians) carry rounding errors of
    their own, and PyTorch's float32 exp is not correctly rounded: its entries then lie up to about 1e-3 from the
    exact values, by an amount that depends on the PyTorch build and CPU. No float32 recipe matches every build bit
    for bit, so leansd computes the exact values; tests/runtime/test_guidance_embedding.py measures both against them.
    """
    half = dim // 2
    step = float(np.log(np.float32(10000.0)) / np.float32(half - 1))  # float32 in diffusers whatever the dtype: kept
    frequencies = np.exp(np.arange(half) * -step)
    angles = (scale - 1.0) * 1000.0 * frequencies
    row = np.concatenate([np.sin(angles), np.cos(angles), np.zeros(dim % 2)]).astype(np.float32)
    return np.repeat(row[None, :], batch, axis=0)


def with_guidance(cond: Conditioning, scale: float, dim: int) -> Conditioning:
    """`cond` with the guidance embedding for its batch (a guidance-embedded UNet runs unguided: no negative half)."""
    batch = next(iter(cond.positive.values())).shape[0]
    return cond.with_inputs(**{INPUT: embed(scale, dim, batch)})
