"""The training loss of the shapes model, shared by its training (`train.py`) and LoRA training (`train_lora.py`)."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def denoising_loss(unet, latents: torch.Tensor, hidden: Callable[[], torch.Tensor], alphas: torch.Tensor,
                   offset_noise: float, min_snr_gamma: float) -> torch.Tensor:
    """The epsilon-prediction loss of a batch of scaled latents: fresh noise (plus `offset_noise` per channel),
    uniform timesteps, Min-SNR weights (`min_snr_gamma`, 0: none). `alphas` are the cumulative alphas of the
    schedule. `hidden()` gives the text encoder's states; it is called after the noise is drawn, which keeps the
    random stream the shipped weights were trained with."""
    noise = torch.randn_like(latents)
    if offset_noise:
        noise = noise + offset_noise * torch.randn(latents.shape[0], latents.shape[1], 1, 1)
    t = torch.randint(0, len(alphas), (latents.shape[0],))
    a = alphas[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    pred = unet(noisy, t, encoder_hidden_states=hidden()).sample
    snr = alphas[t] / (1 - alphas[t])
    weight = snr.clamp(max=min_snr_gamma) / snr if min_snr_gamma else torch.ones_like(snr)
    return (weight * F.mse_loss(pred, noise, reduction="none").mean((1, 2, 3))).mean()
