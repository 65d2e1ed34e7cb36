"""Will a generation fit in memory? An estimate from the model configs, made before anything is allocated.

The largest transient memory of a generation is one UNet call (feature maps kept for the skip connections, and
the attention score matrices, which grow with the square of the latent area unless attention is fused) or one
VAE decode (wide feature maps at full image size, and the mid-block attention over the latent area). Both are
counted from the configs in float32 elements and scaled by factors measured on this project's models
(`perf/memory.py` prints estimate against measured peak RSS; the figures are in the README). The estimate is
compared with the memory the OS says is available; a generation that clearly cannot fit is refused with what
it needs and what to change, instead of swapping the machine to a halt or dying halfway.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

# Measured ratios of peak transient memory to the counted float32 elements (backend arenas, temporaries).
UNET_FACTOR = 3.0
VAE_FACTOR = 3.0
GIB = 2**30


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a generation needs beyond what is loaded when it starts."""

    unet: int  # one UNet call
    decode: int  # decoding one image (or one tile)
    weights: int  # model files that open during the generation (low-memory mode opens them per stage)

    @property
    def peak(self) -> int:
        return max(self.unet, self.decode) + self.weights


TEXT_TOKENS = 77  # what cross-attention attends to (one prompt chunk)


def unet_elements(config: dict, batch: int, h: int, w: int, fused_attention: bool) -> int:
    """float32 elements alive at the peak of one UNet call on `batch` latents of h x w."""
    channels = list(config.get("block_out_channels", [320, 640, 1280, 1280]))
    layers = int(config.get("layers_per_block", 2))
    heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
    kinds = list(config.get("down_block_types", ["CrossAttnDownBlock2D"] * len(channels)))
    # Blocks with cross-attention only (the x4 upscaler's outer levels) attend to the text tokens, not to every pixel.
    cross_only = config.get("only_cross_attention", False)
    total = 0
    for level, width in enumerate(channels):
        area = -(-h // 2**level) * -(-w // 2**level)
        total += (layers + 2) * width * area  # skip connections kept for the up path, and the working tensors
        if "Attn" in kinds[level] and not fused_attention:
            level_heads = heads[level] if isinstance(heads, (list, tuple)) else heads
            keys = TEXT_TOKENS if (cross_only[level] if isinstance(cross_only, (list, tuple)) else cross_only) else area
            total += 2 * int(level_heads) * area * keys  # scores and their softmax
    return batch * total


def vae_elements(config: dict, h: int, w: int) -> int:
    """float32 elements alive at the peak of decoding one image from h x w latents."""
    channels = list(config.get("block_out_channels") or config.get("decoder_block_out_channels") or [128, 256, 512, 512])
    factor = 2 ** (len(channels) - 1)
    full = h * factor * w * factor
    return 4 * channels[0] * full + 2 * (h * w) ** 2  # the widest maps at full size; the mid-block attention


def available_bytes() -> int | None:
    """Memory the OS can give without swapping (Linux's MemAvailable); None where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def describe(estimate: MemoryEstimate, available: int) -> str:
    """The one-line refusal: what the generation needs, what the machine has, what to change."""
    stage = "decoding an image" if estimate.decode > estimate.unet else "a denoising step"
    return (f"this generation needs about {estimate.peak / GIB:,.1f} GB more memory ({stage} is the largest part) but "
            f"{available / GIB:.1f} GB is available; use a smaller size or fewer images, low_memory / --low-memory, "
            "vae_tiling / --tiled-vae for large images, or memory_check=False / --no-memory-check to try anyway")
