"""Train leansd's bundled shapes model: a small Stable Diffusion 1.x pipeline that draws coloured shapes.

    python models/shapes/train.py --seed 0 --out models/shapes/weights

Three stages, all on CPU with 2 threads:

1. the VAE (`AutoencoderKL`) learns to reconstruct images from `data.py`; it is then frozen and its
   `scaling_factor` set to 1 / std of its latents;
2. a pool of random scenes is drawn and encoded once (the posterior's mean and std are kept; every
   training step samples fresh latents from them and draws a fresh caption for each scene);
3. the text encoder (`CLIPTextModel`) and the UNet (`UNet2DConditionModel`) learn together to predict
   the noise (epsilon) of SD 1.x's scaled-linear schedule, with 10 % of captions dropped to "" so that
   classifier-free guidance works.

The result is a diffusers folder (`StableDiffusionPipeline.save_pretrained`, safetensors) plus
`training.json` with the configuration, the losses and the wall time of every stage.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
CLIP_DIR = HERE.parents[1] / "leansd" / "export" / "configs" / "clip"
sys.path.insert(0, str(HERE))
import data  # noqa: E402
from denoising import denoising_loss  # noqa: E402


@dataclass
class Config:
    seed: int = 0
    threads: int = 1  # 2 threads stalled 5-10x at every op when other jobs share the 2 cores
    resolution: int = data.RESOLUTION
    # VAE: 3 blocks -> scale factor 4 -> 16x16x4 latents for 64x64 images
    vae_channels: tuple[int, ...] = (16, 32, 64)
    vae_latent_channels: int = 4
    vae_groups: int = 8  # GroupNorm groups; few channels per group keep flat colours learnable
    vae_init_logvar: float = -6.0  # start the posterior nearly deterministic; the KL term takes over
    vae_steps_crop: int = 1500  # first on 32x32 crops of the images (4x cheaper per image) ...
    vae_steps: int = 300  # ... then on whole images
    vae_batch: int = 8
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-5  # on the per-element mean KL, against the per-pixel mean L1 + MSE
    # text encoder
    text_width: int = 32
    text_layers: int = 2
    text_heads: int = 4
    text_ffn: int = 128
    # UNet
    unet_channels: tuple[int, ...] = (32, 64, 128)
    unet_layers_per_block: int = 1
    unet_groups: int = 8
    unet_heads: int = 4  # diffusers' `attention_head_dim` (the number of heads in SD 1.x's config)
    unet_steps: int = 4500
    unet_batch: int = 32
    unet_lr: float = 1e-3
    unet_warmup: int = 100
    weight_decay: float = 1e-2
    caption_dropout: float = 0.1
    # Offset noise: flat backgrounds live in the latents' per-channel means, which the SD 1.x schedule
    # never fully noises (sqrt(alphas_cumprod) is still 0.09 at t=951); extra per-channel noise keeps
    # the model from reading the colour out of the starting noise instead of the prompt.
    offset_noise: float = 0.2
    min_snr_gamma: float = 5.0  # loss weight min(SNR, gamma) / SNR (Min-SNR weighting, epsilon target)
    ema_decay: float = 0.999  # the saved UNet and text encoder are exponential moving averages
    pool_size: int = 8192
    # sampling defaults written into the scheduler config
    scheduler: dict = field(default_factory=lambda: {
        "_class_name": "DDIMScheduler",
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "prediction_type": "epsilon",
        "timestep_spacing": "leading",
    })


# ----------------------------------------------------------------------------------------------------
# Components


def build_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer(str(CLIP_DIR / "vocab.json"), str(CLIP_DIR / "merges.txt"), model_max_length=77)


def build_vae(cfg: Config):
    from diffusers import AutoencoderKL

    n = len(cfg.vae_channels)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=cfg.vae_latent_channels,
        block_out_channels=tuple(cfg.vae_channels), layers_per_block=1, norm_num_groups=cfg.vae_groups,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        sample_size=cfg.resolution,
    )
    with torch.no_grad():  # the encoder's last conv gives mean and log-variance, in that order
        vae.encoder.conv_out.bias[cfg.vae_latent_channels:] = cfg.vae_init_logvar
    return vae


def build_text_encoder(cfg: Config, tokenizer):
    """CLIP text model whose token embeddings are zero except for the words of the grammar.

    Only the rows of tokens seen in training receive gradients, so every other row stays exactly zero:
    the 49408-row table costs little once compressed, and unknown words add nothing but their position.
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    model = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, max_position_embeddings=77, hidden_size=cfg.text_width,
        intermediate_size=cfg.text_ffn, num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    words = list(data.COLOURS) + list(data.SHAPES) + ["a", "an", "on", "background"]
    used = sorted({i for w in words for i in tokenizer(w).input_ids})
    emb = model.text_model.embeddings.token_embedding.weight
    with torch.no_grad():
        keep = emb[used].clone()
        emb.zero_()
        emb[used] = keep
    return model


def build_unet(cfg: Config):
    from diffusers import UNet2DConditionModel

    n = len(cfg.unet_channels)
    vae_scale = 2 ** (len(cfg.vae_channels) - 1)
    # attention everywhere except the full latent resolution, where it would cost the most
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1)
    up = ("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",)
    return UNet2DConditionModel(
        sample_size=cfg.resolution // vae_scale, in_channels=cfg.vae_latent_channels,
        out_channels=cfg.vae_latent_channels, block_out_channels=tuple(cfg.unet_channels),
        layers_per_block=cfg.unet_layers_per_block,
        down_block_types=down, up_block_types=up,
        cross_attention_dim=cfg.text_width, attention_head_dim=cfg.unet_heads, norm_num_groups=cfg.unet_groups,
    )


def build_scheduler(cfg: Config):
    import diffusers

    kwargs = {k: v for k, v in cfg.scheduler.items() if not k.startswith("_")}
    return getattr(diffusers, cfg.scheduler["_class_name"])(**kwargs)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# ----------------------------------------------------------------------------------------------------
# Stages


def train_vae(cfg: Config, vae, rng: np.random.Generator, log: dict) -> None:
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    vae.train()
    losses = []
    total = cfg.vae_steps_crop + cfg.vae_steps
    scale = 2 ** (len(cfg.vae_channels) - 1)
    bar = tqdm(range(total), desc="1/3 vae", unit="step", dynamic_ncols=True, mininterval=5)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = cfg.vae_lr * cosine_lr(step, total, 50)
        images, _, _ = data.batch(rng, cfg.vae_batch, cfg.resolution)
        x = to_tensor(images)
        if step < cfg.vae_steps_crop:  # a crop aligned to the latent grid
            c = cfg.resolution // 2
            i, j = (rng.integers(0, cfg.resolution - c, 2) // scale) * scale
            x = x[:, :, i:i + c, j:j + c]
        posterior = vae.encode(x).latent_dist
        y = vae.decode(posterior.sample()).sample
        rec = (y - x).abs().mean() + F.mse_loss(y, x)
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = rec + cfg.vae_kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append((rec.item(), kl.item()))
        if step % 10 == 0:
            r = np.mean([a for a, _ in losses[-50:]])
            bar.set_postfix(rec=f"{r:.4f}", kl=f"{losses[-1][1]:.2f}")
    vae.eval().requires_grad_(False)
    log["vae_loss_last100"] = {"rec": float(np.mean([a for a, _ in losses[-100:]])),
                               "kl": float(np.mean([b for _, b in losses[-100:]]))}


@torch.no_grad()
def encode_pool(cfg: Config, vae, rng: np.random.Generator, log: dict):
    """Encode `pool_size` random scenes; return posterior mean, std (N, C, h, w) and the scenes."""
    means, stds, scenes = [], [], []
    bs = 256
    for _ in tqdm(range(cfg.pool_size // bs), desc="2/3 encode", unit="batch", dynamic_ncols=True):
        images, _, sc = data.batch(rng, bs, cfg.resolution)
        post = vae.encode(to_tensor(images)).latent_dist
        means.append(post.mean)
        stds.append(post.std)
        scenes += sc
    mean, std = torch.cat(means), torch.cat(stds)
    sample = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(cfg.seed))
    scaling = 1.0 / float(sample.std())
    vae.register_to_config(scaling_factor=scaling)
    # how faithfully the frozen VAE reproduces a few images (mean absolute error in 0..255)
    x = to_tensor(data.batch(rng, 64, cfg.resolution)[0])
    y = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    log["vae_reconstruction_mae_0_255"] = float((y - x).abs().mean() * 127.5)
    log["latent_mean"] = [round(float(v), 4) for v in sample.mean((0, 2, 3))]
    log["scaling_factor"] = scaling
    return mean, std, scenes


class CaptionTokens:
    """Tokenize captions once each (the grammar has a few hundred)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, captions: list[str]) -> torch.Tensor:
        for c in captions:
            if c not in self.cache:
                self.cache[c] = self.tokenizer(
                    c, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
                ).input_ids
        return torch.tensor([self.cache[c] for c in captions], dtype=torch.long)


def train_denoiser(cfg: Config, unet, text_encoder, tokenizer, scheduler, pool, rng, log: dict) -> list[torch.Tensor]:
    mean, std, scenes = pool
    scaling = log["scaling_factor"]
    tokens = CaptionTokens(tokenizer)
    alphas = scheduler.alphas_cumprod.float()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=cfg.weight_decay)
    ema = [p.detach().clone() for p in params]
    unet.train()
    text_encoder.train()
    losses = []
    bar = tqdm(range(cfg.unet_steps), desc="3/3 unet+text", unit="step", dynamic_ncols=True, mininterval=5)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = cfg.unet_lr * cosine_lr(step, cfg.unet_steps, cfg.unet_warmup)
        idx = rng.integers(len(scenes), size=cfg.unet_batch)
        captions = [data.caption(scenes[i], rng) if rng.random() >= cfg.caption_dropout else "" for i in idx]
        idx_t = torch.from_numpy(idx)
        latents = (mean[idx_t] + std[idx_t] * torch.randn_like(mean[idx_t])) * scaling
        loss = denoising_loss(unet, latents, lambda c=captions: text_encoder(tokens(c))[0], alphas,
                              cfg.offset_noise, cfg.min_snr_gamma)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema, params, 1 - decay)
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}")
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
    raw = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    log["unet_loss_curve"] = [round(float(np.mean(losses[i:i + 100])), 4) for i in range(0, len(losses), 100)]
    return raw


# ----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Train the bundled shapes model (a tiny SD 1.x pipeline).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default 1: on a busy shared 2-core machine 2 threads stall at every op)")
    p.add_argument("--out", default=str(HERE / "weights"))
    p.add_argument("--vae-steps", type=int, default=None)
    p.add_argument("--unet-steps", type=int, default=None)
    p.add_argument("--pool-size", type=int, default=None)
    p.add_argument("--unet-channels", default=None, help="UNet block widths, e.g. 32,64,128")
    p.add_argument("--raw-out", default=None, help="(experiments) also save the last weights, without the EMA")
    p.add_argument("--vae-from", default=None, help="(experiments) reuse the VAE of a saved model instead of training one")
    args = p.parse_args(argv)

    cfg = Config(seed=args.seed)
    for name in ("threads", "vae_steps", "unet_steps", "pool_size"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    if args.unet_channels:
        cfg.unet_channels = tuple(int(c) for c in args.unet_channels.split(","))

    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(cfg.threads)
    torch.set_flush_denormal(True)  # denormal floats slow CPU kernels down many times
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    times, log = {}, {}
    t_start = time.time()

    tokenizer = build_tokenizer()
    vae = build_vae(cfg)
    text_encoder = build_text_encoder(cfg, tokenizer)
    unet = build_unet(cfg)
    scheduler = build_scheduler(cfg)

    t0 = time.time()
    if args.vae_from:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.vae_from, subfolder="vae").eval().requires_grad_(False)
        log["vae_from"] = args.vae_from
    else:
        train_vae(cfg, vae, rng, log)
    times["vae_s"] = time.time() - t0
    t0 = time.time()
    pool = encode_pool(cfg, vae, rng, log)
    times["encode_s"] = time.time() - t0
    print(f"vae: reconstruction MAE {log['vae_reconstruction_mae_0_255']:.2f}/255, scaling_factor {log['scaling_factor']:.4f}")
    t0 = time.time()
    raw = train_denoiser(cfg, unet, text_encoder, tokenizer, scheduler, pool, rng, log)
    times["unet_text_s"] = time.time() - t0

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    out = Path(args.out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    if args.raw_out:
        from copy import deepcopy

        raw_pipe = deepcopy(pipe)
        with torch.no_grad():
            for p, r in zip(list(raw_pipe.unet.parameters()) + list(raw_pipe.text_encoder.parameters()), raw):
                p.copy_(r)
        raw_pipe.save_pretrained(args.raw_out, safe_serialization=True)
    times["total_s"] = time.time() - t_start
    record = {
        "command": "python models/shapes/train.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "config": asdict(cfg),
        "parameters": {"unet": n_params(unet), "text_encoder": n_params(text_encoder), "vae": n_params(vae)},
        "wall_time_s": {k: round(v, 1) for k, v in times.items()},
        "hardware": {"machine": platform.machine(), "processor": platform.processor(),
                     "torch_threads": torch.get_num_threads()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     **{m: __import__(m).__version__ for m in ("diffusers", "transformers", "numpy")}},
        **log,
    }
    (tmp / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    print(f"saved {out} in {times['total_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
