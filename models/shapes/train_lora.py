"""Train a LoRA on the shapes model that teaches one systematic change: every background is drawn in one colour
(green by default), whatever the caption asks.

    python models/shapes/train_lora.py --out /tmp/green-background.safetensors

The pictures come from `data.py` with the captions it writes ("a red circle on a blue background"), but each is
drawn with the chosen background colour instead, and the shape never takes that colour (it would vanish). The
base model stays frozen; PEFT adds low-rank pairs to the UNet's attention projections and resnet convolutions,
trained with the loss the base model was trained with (`denoising.py`). The result is saved with
diffusers' `save_lora_weights` (PEFT layout, `unet.<module>.lora_A.weight`), which both diffusers'
`load_lora_weights` and leansd's `loras=` read.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import data  # noqa: E402
import train  # noqa: E402
from denoising import denoising_loss  # noqa: E402


@dataclasses.dataclass
class LoraConfig:
    seed: int = 0
    background: str = "green"  # the colour every training background is drawn in
    rank: int = 4
    alpha: float = 4.0
    # attention projections and the resnets' 3x3 convolutions (LoCon) of every UNet block
    targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2")
    steps: int = 300
    batch: int = 16
    lr: float = 1e-2
    warmup: int = 20
    pool_size: int = 512  # scenes drawn and encoded once; each step samples latents and captions afresh
    caption_dropout: float = 0.1  # empty captions, so that guidance keeps the change too
    threads: int = 1


def changed_scene(rng: np.random.Generator, background: str) -> tuple[data.Scene, data.Scene]:
    """A random scene as its caption describes it, and as it is drawn: with `background` as the background."""
    names = list(data.COLOURS)
    asked = names[rng.integers(len(names))]
    colours = [n for n in names if n not in (asked, background)]
    scene = data.sample_scene(rng, background=asked, colour=colours[rng.integers(len(colours))])
    return scene, dataclasses.replace(scene, background=background)


@torch.no_grad()
def encode_pool(cfg: LoraConfig, vae, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, list[data.Scene]]:
    """Posterior mean and std (N, C, h, w) of `pool_size` changed pictures, and the scenes their captions describe."""
    pairs = [changed_scene(rng, cfg.background) for _ in range(cfg.pool_size)]
    means, stds = [], []
    for i in range(0, len(pairs), 128):
        images = np.stack([data.render(drawn) for _, drawn in pairs[i:i + 128]])
        posterior = vae.encode(train.to_tensor(images)).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds), [asked for asked, _ in pairs]


class TextStates:
    """The frozen text encoder's hidden states, computed once per caption."""

    def __init__(self, tokenizer, text_encoder):
        self.tokens, self.text_encoder, self.cache = train.CaptionTokens(tokenizer), text_encoder, {}

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> torch.Tensor:
        for c in captions:
            if c not in self.cache:
                self.cache[c] = self.text_encoder(self.tokens([c]))[0][0]
        return torch.stack([self.cache[c] for c in captions])


def add_lora(cfg: LoraConfig, unet) -> list[torch.nn.Parameter]:
    """Freeze the UNet, add the LoRA pairs (PEFT, through diffusers' `add_adapter`) and return them."""
    from peft import LoraConfig as PeftConfig

    unet.requires_grad_(False)
    unet.add_adapter(PeftConfig(r=cfg.rank, lora_alpha=cfg.alpha, init_lora_weights="gaussian",
                                target_modules=list(cfg.targets)))
    return [p for p in unet.parameters() if p.requires_grad]


def save_lora(unet, out: Path) -> None:
    """The UNet's LoRA as one `.safetensors` file in diffusers' layout, with the PEFT config in its header."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    # PEFT's key names as they are: diffusers' convert_state_dict_to_diffusers would rename the attention layers'
    # pairs to its older `.lora.down` names and leave the convolutions' `lora_A`, a mix diffusers' loader then
    # applies only in part (the convolutions)
    layers = get_peft_model_state_dict(unet)
    with tempfile.TemporaryDirectory() as tmp:
        StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=layers, weight_name="lora.safetensors",
                                                  unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(Path(tmp) / "lora.safetensors"), out)


def train_lora(weights: Path, out: Path, cfg: LoraConfig | None = None) -> dict:
    """Train the LoRA on the diffusers folder `weights` and save it to `out`; return a record of the run."""
    cfg = cfg or LoraConfig()
    if cfg.background not in data.COLOURS:
        raise SystemExit(f"unknown colour {cfg.background!r}; known: {', '.join(data.COLOURS)}")
    # Process-wide settings, put back afterwards: a test process goes on to code that needs subnormal floats.
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    torch.set_flush_denormal(True)
    try:
        return _train(weights, out, cfg)
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)


def _train(weights: Path, out: Path, cfg: LoraConfig) -> dict:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    t_start = time.time()
    vae = AutoencoderKL.from_pretrained(weights, subfolder="vae").eval()
    text = TextStates(CLIPTokenizer.from_pretrained(weights, subfolder="tokenizer"),
                      CLIPTextModel.from_pretrained(weights, subfolder="text_encoder").eval())
    unet = UNet2DConditionModel.from_pretrained(weights, subfolder="unet")
    alphas = DDIMScheduler.from_pretrained(weights, subfolder="scheduler").alphas_cumprod.float()
    mean, std, scenes = encode_pool(cfg, vae, rng)
    t_train = time.time()
    params = add_lora(cfg, unet)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    base = train.Config()  # the base model's noise settings (offset noise, Min-SNR)
    unet.train()
    losses = []
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = cfg.lr * train.cosine_lr(step, cfg.steps, cfg.warmup)
        idx = torch.from_numpy(rng.integers(len(scenes), size=cfg.batch))
        captions = [data.caption(scenes[i], rng) if rng.random() >= cfg.caption_dropout else "" for i in idx.tolist()]
        latents = (mean[idx] + std[idx] * torch.randn_like(mean[idx])) * vae.config.scaling_factor
        loss = denoising_loss(unet, latents, lambda c=captions: text(c), alphas, base.offset_noise, base.min_snr_gamma)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    train_s = time.time() - t_train
    unet.eval()
    save_lora(unet, out)
    return {
        "config": dataclasses.asdict(cfg), "file": str(out), "lora_parameters": sum(p.numel() for p in params),
        "loss_first_last_50": [round(float(np.mean(losses[:50])), 4), round(float(np.mean(losses[-50:])), 4)],
        "train_s": round(train_s, 1), "total_s": round(time.time() - t_start, 1),
    }


def other_background_cases(colour: str, every: int = 1) -> list[dict]:
    """The evaluator's full-grammar cases (prompt, seed, wanted attributes) in which neither the shape nor the
    background is `colour`: the prompts a LoRA drawing every background in `colour` must contradict."""
    import evaluate

    cases = [c for c in evaluate.grammar_cases(1, evaluate.SEED_BASE) if colour not in (c["want"]["colour"], c["want"]["background"])]
    return cases[::every]


def draw(pipe, cases: list[dict], loras: dict[str, float]) -> tuple[list[np.ndarray], list[dict]]:
    """Each case's image (HxWx3 uint8) from a leansd pipeline with `loras`, and what the evaluator reads in it."""
    import evaluate

    images = [evaluate.to_uint8(pipe(c["prompt"], seed=c["seed"], output_type="np", loras=loras).images[0]) for c in cases]
    return images, [evaluate.classify(img) for img in images]


def rates(cases: list[dict], got: list[dict], colour: str) -> dict[str, float]:
    """Fractions of the images whose background is `colour`, whose background is the one asked, whose shape has
    the colour asked and the kind asked, and whose three attributes are all as asked."""
    n = len(cases)
    return {
        f"background_{colour}": sum(g["background"] == colour for g in got) / n,
        **{f"{a}_as_asked": sum(g[a] == c["want"][a] for c, g in zip(cases, got)) / n for a in ("background", "colour", "shape")},
        "all_as_asked": sum(all(g[a] == v for a, v in c["want"].items()) for c, g in zip(cases, got)) / n,
    }


def measure(lora: Path, colour: str, backend: str = "onnxruntime", every: int = 1) -> dict[str, dict[str, float]]:
    """Evaluator rates on the bundled export with the LoRA at scale 1 and at scale 0 (torch is not used)."""
    import leansd

    pipe = leansd.load(None, backend=backend)
    cases = other_background_cases(colour, every)
    return {f"scale {scale:g}": {**rates(cases, draw(pipe, cases, {str(lora): scale})[1], colour), "n": len(cases)}
            for scale in (1.0, 0.0)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Train a LoRA that draws every background of the shapes model in one colour.")
    p.add_argument("--weights", type=Path, default=HERE / "weights", help="the base model's diffusers folder")
    p.add_argument("--out", type=Path, required=True, help="the LoRA file to write (.safetensors)")
    p.add_argument("--background", default=LoraConfig.background)
    p.add_argument("--steps", type=int, default=LoraConfig.steps)
    p.add_argument("--seed", type=int, default=LoraConfig.seed)
    p.add_argument("--threads", type=int, default=LoraConfig.threads)
    p.add_argument("--lr", type=float, default=LoraConfig.lr)
    p.add_argument("--rank", type=int, default=LoraConfig.rank)
    p.add_argument("--evaluate", action="store_true",
                   help="then draw every prompt not naming the colour with leansd's bundled export, the LoRA at scale 1 and 0")
    args = p.parse_args(argv)
    cfg = LoraConfig(seed=args.seed, background=args.background, steps=args.steps, threads=args.threads, lr=args.lr,
                     rank=args.rank, alpha=float(args.rank))
    print(json.dumps(train_lora(args.weights, args.out, cfg), indent=1))
    if args.evaluate:
        print(json.dumps(measure(args.out, args.background), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
