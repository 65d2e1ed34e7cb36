"""Where the work is: floating-point operations of SD 1.5's UNet, its deep-cache parts and the VAE decoders.

    python perf/flops.py [--config perf/configs/full.json] [--size 512]

Counts with PyTorch's `FlopCounterMode` on the `meta` device (no weights, no arithmetic: seconds on any
machine), for one guided step (UNet batch 2) at the configured size. It answers three questions the
benchmark alone cannot:

- the best speed-up feature reuse (DeepCache) can give: N whole UNets against one deep part (the whole UNet
  with its features as a second output) and N - 1 shallow parts;
- what token merging (ToMe for SD) could save: the self-attention work at the highest resolution, where it
  merges tokens, and the upper bound on the UNet's speed-up if that work shrank as ToMe's merge ratio says;
- how much a tiny VAE decoder (TAESD, `AutoencoderTiny` with its published defaults) saves over the KL decoder.

Counts are multiply-adds x 2, matrix products and convolutions only (elementwise work, normalisations and
softmax are not counted): compute-bound estimates, not timings.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

PERF = Path(__file__).resolve().parent
sys.path.insert(0, str(PERF.parent))


def count(module, *inputs) -> tuple[int, dict[str, int]]:
    """Total FLOPs of `module(*inputs)` and the FLOPs attributed to each submodule (by qualified name)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*inputs)
    per_module = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    return counter.get_total_flops(), per_module


def unet_report(config: dict, size: int, merge_ratio: float) -> dict:
    import torch
    from diffusers import UNet2DConditionModel

    from leansd.export import deepcache

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config["unet"]).eval()
        side = size // 8
        x = torch.empty(2, unet.config.in_channels, side, side)
        t = torch.empty(2)
        context = torch.empty(2, 77, unet.config.cross_attention_dim)
        total, modules = count(lambda *a: unet(*a).sample, x, t, context)
        features = torch.empty(2, deepcache.feature_channels(dict(unet.config)), side, side)
        shallow_total, _ = count(deepcache.wrap_shallow(unet), x, t, context, features)

    # Self-attention (attn1) of the blocks at the highest resolution (the first down and last up block),
    # where ToMe for SD merges tokens.
    last_up = len(config["unet"]["up_block_types"]) - 1
    top = re.compile(rf"(^|\.)(down_blocks\.0|up_blocks\.{last_up})\..*\.attn1$")
    top_blocks = {name: flops for name, flops in modules.items() if top.search(name)}
    top_attn = sum(top_blocks.values())
    n_top_blocks = len(top_blocks)
    tokens = side * side
    width = config["unet"]["block_out_channels"][0]
    # Scores (QK^T and AV, 2 x 2 N^2 C each image) grow with tokens^2, projections with tokens: split the counted
    # total accordingly (the count includes both).
    batch = x.shape[0]
    scores = n_top_blocks * batch * 2 * (2 * tokens * tokens * width)
    projections = top_attn - scores
    keep = 1.0 - merge_ratio
    merge_cost = n_top_blocks * batch * (2 * (tokens * merge_ratio) * (tokens * keep) * width)  # bipartite similarity
    after = projections * keep + scores * keep * keep + merge_cost
    saved = top_attn - after
    return {
        "size": size,
        "unet_tflop": total / 1e12,
        "deep_tflop": total / 1e12,  # the deep part is the whole UNet with a second output
        "shallow_tflop": shallow_total / 1e12,
        "shallow_share": shallow_total / total,
        "deep_cache_bound": {n: total * n / (total + (n - 1) * shallow_total) for n in (2, 3, 5)},
        "top_self_attention_tflop": top_attn / 1e12,
        "top_self_attention_share": top_attn / total,
        "top_self_attention_blocks": n_top_blocks,
        "tokens_at_top": tokens,
        "tome_merge_ratio": merge_ratio,
        "tome_saved_tflop": saved / 1e12,
        "tome_bound": total / (total - saved),
    }


def vae_report(config: dict, size: int) -> dict:
    import torch
    from diffusers import AutoencoderKL, AutoencoderTiny

    with torch.device("meta"):
        kl = AutoencoderKL(**config["vae"]).eval()
        tiny = AutoencoderTiny().eval()  # TAESD's published architecture (diffusers' defaults)
        z = torch.empty(1, 4, size // 8, size // 8)
        kl_total, _ = count(lambda v: kl.decode(v).sample, z)
        tiny_total, _ = count(lambda v: tiny.decode(v).sample, z)
    return {"kl_decoder_tflop": kl_total / 1e12, "tiny_decoder_tflop": tiny_total / 1e12, "ratio": kl_total / tiny_total}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=PERF / "configs" / "full.json")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--merge-ratio", type=float, default=0.5, help="ToMe's fraction of tokens merged (default 0.5)")
    p.add_argument("--json", action="store_true", help="print the raw numbers as JSON")
    args = p.parse_args(argv)
    config = json.loads(args.config.read_text())
    unet = unet_report(config, args.size, args.merge_ratio)
    vae = vae_report(config, args.size)
    if args.json:
        print(json.dumps({"unet": unet, "vae": vae}, indent=1))
        return 0
    print(f"UNet, one guided step (batch 2) at {args.size}x{args.size}: {unet['unet_tflop']:.3f} TFLOP")
    print(f"  deep part {unet['deep_tflop']:.3f} TFLOP, shallow part {unet['shallow_tflop']:.3f} TFLOP "
          f"({100 * unet['shallow_share']:.1f} % of the UNet)")
    for n, bound in unet["deep_cache_bound"].items():
        print(f"  deep cache every {n} steps: at most {bound:.2f}x fewer UNet FLOPs")
    print(f"  self-attention at the top resolution ({unet['tokens_at_top']} tokens, {unet['top_self_attention_blocks']} blocks): "
          f"{unet['top_self_attention_tflop']:.3f} TFLOP ({100 * unet['top_self_attention_share']:.1f} %)")
    print(f"  token merging at ratio {unet['tome_merge_ratio']:g}: saves at most {unet['tome_saved_tflop']:.3f} TFLOP, "
          f"UNet speed-up at most {unet['tome_bound']:.2f}x")
    print(f"VAE decode, one image: KL decoder {vae['kl_decoder_tflop']:.3f} TFLOP, tiny decoder (TAESD) "
          f"{vae['tiny_decoder_tflop']:.4f} TFLOP ({vae['ratio']:.0f}x less)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
