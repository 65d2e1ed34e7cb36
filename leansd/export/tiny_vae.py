"""A tiny VAE decoder (TAESD, diffusers' `AutoencoderTiny`) exported beside the model's own VAE.

TAESD decodes SD latents with a few plain convolutions: on a CPU it takes a fraction of a second where the
full KL decoder of SD 1.5 takes many seconds at 512x512, at some cost in fine detail. It reads the same
latents the UNet produces (its scaling factor is 1.0: the pipeline divides by it, as diffusers does), so the
runtime can use it for the final images (`leansd.load(..., tiny_vae=True)`) or for step previews.

leansd does not train or ship one: the user supplies it (`sd-export SRC OUT --tiny-vae PATH`, e.g. a local copy
of `madebyollin/taesd` for SD 1.x/2.x), and it is verified against PyTorch like every other component.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from leansd.export.errors import ExportError
from leansd.runtime.manifest import TINY_VAE_DECODER

COMPONENT = TINY_VAE_DECODER
MODULE = "vae_tiny"


def load(spec: str | Path) -> Any:
    """The `AutoencoderTiny` at `spec` (a diffusers folder with config.json and weights, or a hub id when online)."""
    from diffusers import AutoencoderTiny

    path = Path(spec).expanduser()
    if path.is_dir() and not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
        path = path / "vae"  # a whole pipeline folder whose VAE is the tiny one
    if not path.exists() and (str(spec).startswith((".", "/", "~")) or str(spec).count("/") != 1):
        raise ExportError(f"--tiny-vae {spec}: no such folder; pass a diffusers AutoencoderTiny folder (config.json + weights)")
    try:
        model = AutoencoderTiny.from_pretrained(str(path) if path.exists() else str(spec))
    except (OSError, ValueError, RuntimeError, TypeError) as exc:
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
        raise ExportError(f"--tiny-vae {spec}: cannot load an AutoencoderTiny ({first}); pass a folder such as a copy of madebyollin/taesd") from None
    return model.float().eval()


def scale_factor(config: dict[str, Any]) -> int:
    """How many pixels one latent covers per side: one upsampling between consecutive decoder blocks."""
    blocks = config.get("decoder_block_out_channels") or config.get("block_out_channels") or ()
    return int(config.get("upsampling_scaling_factor", 2)) ** (len(blocks) - 1)


def check_compatible(tiny: dict[str, Any], vae: dict[str, Any]) -> None:
    """Refuse a tiny VAE made for another latent space (e.g. SDXL's or SD3's TAESD for an SD 1.x model)."""
    want_channels = int(vae.get("latent_channels", 4))
    got_channels = int(tiny.get("latent_channels", 4))
    want_factor = 2 ** (len(vae["block_out_channels"]) - 1)
    got_factor = scale_factor(tiny)
    if got_channels != want_channels or got_factor != want_factor:
        raise ExportError(
            f"--tiny-vae: it decodes {got_channels}-channel latents at factor {got_factor}, but this model's VAE uses "
            f"{want_channels} channels at factor {want_factor}; use the tiny VAE made for this model family"
        )
