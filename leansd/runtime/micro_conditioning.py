"""SDXL's conditioning beyond the prompt: the micro-conditioning `time_ids`, and the zeroed negative prompt.

SDXL's UNet takes, besides the text, a few numbers per image (`time_ids`): the base model the original size of the
training image, the crop's top-left corner and the target size (6 numbers); the refiner, in place of the target
size, an aesthetic score (5 numbers). The negative half of guidance gets its own (`negative_*`, by default the
same numbers; the refiner's negative aesthetic score is 2.5 against 6). Models saved with
`force_zeros_for_empty_prompt` (SDXL base) use zeros instead of an encoded empty prompt when no negative prompt is
given. All as diffusers' StableDiffusionXL pipelines do.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from leansd.runtime.conditioning import Conditioning
from leansd.runtime.settings import GenerationSettings


def takes_time_ids(unet_config: dict) -> bool:
    """Whether the UNet has SDXL's added conditioning (pooled text embedding + time ids)."""
    return unet_config.get("addition_embed_type") == "text_time"


def time_ids(s: GenerationSettings, height: int, width: int, aesthetic: bool, img2img: bool) -> tuple[np.ndarray, np.ndarray]:
    """(positive, negative) time ids for one image: (6,) for the base model, (5,) with `aesthetic` (the refiner).

    The negative ones follow diffusers' two pipelines, which differ: text-to-image uses its own negative numbers only
    when both `negative_original_size` and `negative_target_size` are given (else the positive ones); image-to-image
    fills in each missing one from the positive side, keeps the positive crop corner for the base model's negative,
    and takes `negative_crops_coords_top_left` (default (0, 0)) for the refiner's.
    """
    original = tuple(s.original_size or (height, width))
    crops = tuple(s.crops_coords_top_left)
    target = tuple(s.target_size or (height, width))
    negative_crops = tuple(s.negative_crops_coords_top_left or (0, 0))
    if aesthetic:
        positive = (*original, *crops, s.aesthetic_score)
        negative = (*(s.negative_original_size or original), *negative_crops, s.negative_aesthetic_score)
    else:
        positive = (*original, *crops, *target)
        if img2img:
            negative = (*(s.negative_original_size or original), *crops, *(s.negative_target_size or target))
        elif s.negative_original_size is not None and s.negative_target_size is not None:
            negative = (*s.negative_original_size, *negative_crops, *s.negative_target_size)
        else:
            negative = positive
    return np.asarray(positive, dtype=np.float32), np.asarray(negative, dtype=np.float32)


def with_time_ids(cond: Conditioning, positive: np.ndarray, negative: np.ndarray) -> Conditioning:
    """`cond` with time ids for every image of the batch, each half its own."""
    batch = cond.positive["encoder_hidden_states"].shape[0]
    tile = lambda ids: np.tile(ids[None], (batch, 1))  # noqa: E731
    neg = None if cond.negative is None else {**cond.negative, "time_ids": tile(negative)}
    return replace(cond, positive={**cond.positive, "time_ids": tile(positive)}, negative=neg)


def zero_negative(cond: Conditioning) -> Conditioning:
    """`cond` whose negative half is zeros shaped like the positive one (`force_zeros_for_empty_prompt`)."""
    return replace(cond, negative={name: np.zeros_like(value) for name, value in cond.positive.items()})
