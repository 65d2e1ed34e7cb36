"""Token merging (ToMe for Stable Diffusion, arXiv 2303.17604) traced into the exported UNet.

At the UNet's top resolution (64x64 latents at 512x512: 4096 tokens) the self-attentions cost far more than
their share of the arithmetic: the score matrix is quadratic in the tokens and its softmax is memory-bound. ToMe
merges similar tokens before each such self-attention and copies the results back after it, so the attention
runs on fewer tokens. Everything else in the block (cross-attention, feed-forward) runs on all tokens.

The algorithm is the one the `tomesd` package applies to diffusers pipelines, with its defaults except the
random destination choice: the latent grid is cut into 2x2 cells; each cell's top-left token is a destination
(`tomesd`'s `use_rand=False`: a fixed choice, so the graph is deterministic), the others are sources; each
source is paired with its most similar destination (cosine similarity of the block's input hidden states);
the `ratio` x tokens best-paired sources are averaged into their destinations; attention runs on the rest and
the destinations, and every merged source takes its destination's result. Only the self-attentions of the finest
level that has attention are merged, every one at that level: the latent's own resolution in SD 1.x/2.x
(`tomesd`'s `max_downsample=1`), the next one down in a UNet whose first level has none (`max_downsample=2`, as
the bundled model and SDXL, whose 1024x1024 images have 4096 tokens there; in a two-level UNet that includes the
middle block, as `tomesd` does).

Every index is computed from tensor shapes inside the graph, so one exported file serves every image size, as
the UNet without merging does. Wrapping is a patch of the modules (a pre-hook on each top-level transformer
and each of its blocks, `attn1` replaced by a wrapper) and is undone by `applied`'s context exit.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from leansd.export.errors import ExportError
from leansd.runtime.manifest import TOKEN_MERGED

DEFAULT_RATIO = 0.5
BASE = {merged: plain for plain, merged in TOKEN_MERGED.items()}  # "unet_tome" -> "unet"


def kind(component: str) -> str:
    """The component a file is traced as: a token-merged UNet graph has its plain graph's inputs and outputs."""
    return BASE.get(component, component)


def with_merged(members: tuple[str, ...]) -> tuple[str, ...]:
    """The UNet module's components plus their token-merged twins."""
    return (*members, *(TOKEN_MERGED[m] for m in members if m in TOKEN_MERGED))


def check_ratio(ratio: float) -> float:
    """`ratio` as a float, or `ExportError` naming the valid range."""
    value = float(ratio)
    if not 0.0 < value < 1.0:
        raise ExportError(f"--token-merging {ratio}: give the fraction of tokens to merge, above 0 and below 1 (e.g. 0.5)")
    return value


def attention_level(config: dict[str, Any]) -> int | None:
    """The finest level (0 = the latent's resolution) whose down and up blocks both have attention, or None."""
    down, up = list(config.get("down_block_types") or ()), list(config.get("up_block_types") or ())
    for level, (d, u) in enumerate(zip(down, reversed(up))):
        if d.startswith("CrossAttn") and u.startswith("CrossAttn"):
            return level
    return None


def check_supported(config: dict[str, Any]) -> None:
    """Raise `ExportError` when token merging is not available for this UNet."""
    # SDXL's added conditioning ("text_time") only enters the time embedding: the attentions are SD's own.
    class_conditioned = config.get("class_embed_type") is not None or config.get("num_class_embeds") is not None
    if config.get("addition_embed_type") not in (None, "text_time") or class_conditioned:
        raise ExportError("--token-merging supports SD 1.x/2.x and SDXL text-to-image UNets; this one has other added or class "
                          "embeddings (e.g. the x4 upscaler's noise level); export without --token-merging")
    if attention_level(config) is None:
        raise ExportError("--token-merging needs a UNet with self-attention in its down and up blocks; this one has none; "
                          "export without --token-merging")


def settings(ratio: float) -> dict[str, Any]:
    """The manifest's record of how the token-merged graphs merge."""
    return {"ratio": ratio, "method": (
        "ToMe for SD (tomesd's algorithm): 2x2 cells, top-left token a destination (no random choice), cosine similarity "
        "of the block input, mean merge; the self-attentions of the finest level with attention only")}


def _merge_plan(metric: Any, height: Any, width: Any, ratio: float) -> tuple[Any, Any, Any, Any, Any]:
    """For block input `metric` (batch, tokens, channels) on a `height` x `width` grid: the kept sources, the
    merged sources, their destinations, the destinations, and the row of the merged sequence each token reads
    back after attention (batch, tokens). All index arithmetic is tensor arithmetic, so it stays dynamic."""
    import torch

    # Counts come from the grid's shape, never from data, so a model reshaped to static inputs has static shapes.
    ones = torch.ones_like(metric[0, :, 0], dtype=torch.int64)
    tokens = height * width
    position = ones.cumsum(0) - 1
    row, col = position // width, position % width
    is_dst = (row % 2 == 0) & (col % 2 == 0) & (row < height - height % 2) & (col < width - width % 2)
    # Unique keys: destinations first, then sources, each in raster order (no ties for the sort to break).
    order = torch.argsort(position - tokens * is_dst.to(torch.int64))
    num_dst = (height // 2) * (width // 2)
    dst_pos, src_pos = order[:num_dst], order[num_dst:]

    unit = metric / metric.norm(dim=-1, keepdim=True)
    scores = unit.index_select(1, src_pos) @ unit.index_select(1, dst_pos).transpose(-1, -2)
    best, best_dst = scores.max(dim=-1)  # (batch, sources)
    num_src = tokens - num_dst
    merged = torch.minimum(num_src, (tokens.to(torch.float32) * ratio).floor().to(torch.int64))
    ranked = torch.argsort(best, dim=-1, descending=True)
    kept, moved = ranked[:, merged:], ranked[:, :merged]
    into = best_dst.gather(1, moved)

    batch = metric.shape[0]
    kept_count = num_src - merged
    src_of = src_pos.unsqueeze(0).expand(batch, -1)
    readback = torch.zeros_like(metric[:, :, 0], dtype=torch.int64)
    dst_rows = kept_count + ones[:num_dst].cumsum(0) - 1  # destinations follow the kept sources
    readback = readback.scatter(1, dst_pos.unsqueeze(0).expand(batch, -1), dst_rows.unsqueeze(0).expand(batch, -1))
    readback = readback.scatter(1, src_of.gather(1, kept), torch.ones_like(kept).cumsum(1) - 1)
    readback = readback.scatter(1, src_of.gather(1, moved), kept_count + into)
    return kept, moved, into, (src_pos, dst_pos), readback


def _merge(x: Any, kept: Any, moved: Any, into: Any, positions: tuple[Any, Any]) -> Any:
    """The merged sequence: the kept sources, then each destination averaged with the sources merged into it."""
    import torch

    src_pos, dst_pos = positions
    channels = x.shape[-1]
    src, dst = x.index_select(1, src_pos), x.index_select(1, dst_pos)
    keep = src.gather(1, kept.unsqueeze(-1).expand(-1, -1, channels))
    move = src.gather(1, moved.unsqueeze(-1).expand(-1, -1, channels))
    total = dst.scatter_add(1, into.unsqueeze(-1).expand(-1, -1, channels), move)
    count = torch.ones_like(dst[:, :, :1]).scatter_add(1, into.unsqueeze(-1), torch.ones_like(move[:, :, :1]))
    return torch.cat([keep, total / count], dim=1)


def _wrapper_class() -> type:
    import torch

    class MergedAttention(torch.nn.Module):
        """`attn1` of a top-level transformer block, run on merged tokens and read back to all of them."""

        def __init__(self, attention: Any, ratio: float) -> None:
            super().__init__()
            self.attention, self.ratio = attention, ratio
            self.block_input: Any = None
            self.grid: tuple[Any, Any] | None = None

        def forward(self, hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
            if self.block_input is None or self.grid is None:
                raise RuntimeError("token merging: the block's input and grid were not captured")
            kept, moved, into, positions, readback = _merge_plan(self.block_input, *self.grid, self.ratio)
            out = self.attention(_merge(hidden_states, kept, moved, into, positions), *args, **kwargs)
            return out.gather(1, readback.unsqueeze(-1).expand(-1, -1, out.shape[-1]))

    return MergedAttention


def merged_transformers(unet: Any) -> list[Any]:
    """The transformers whose self-attention is merged: every one at `attention_level` (down, up, and middle blocks)."""
    level = attention_level(dict(unet.config))
    if level is None:
        return []
    last = len(unet.up_blocks) - 1
    blocks = [unet.down_blocks[level], unet.up_blocks[last - level]]
    if level == last and unet.mid_block is not None:  # a two-level UNet's middle runs at that level too (tomesd merges it)
        blocks.append(unet.mid_block)
    return [t for block in blocks for t in (getattr(block, "attentions", None) or [])]


@contextmanager
def applied(unet: Any, ratio: float) -> Iterator[int]:
    """Within the context, `unet`'s finest-level self-attentions run on merged tokens; yields how many were wrapped."""
    from torch.onnx.operators import shape_as_tensor

    ratio = check_ratio(ratio)
    wrapper = _wrapper_class()
    handles, restore = [], []
    try:
        for transformer in merged_transformers(unet):
            blocks = list(getattr(transformer, "transformer_blocks", []))
            wrapped = []
            for block in blocks:
                if getattr(block, "only_cross_attention", False) or getattr(block, "pos_embed", None) is not None:
                    raise ExportError("--token-merging supports SD 1.x/2.x and SDXL UNets (plain self-attention blocks); export without it")
                original = block.attn1
                block.attn1 = wrapper(original, ratio)
                restore.append((block, original))
                wrapped.append(block.attn1)

                def keep_input(_module: Any, args: tuple, kwargs: dict, attn: Any = block.attn1) -> None:
                    attn.block_input = args[0] if args else kwargs["hidden_states"]

                handles.append(block.register_forward_pre_hook(keep_input, with_kwargs=True))

            def keep_grid(_module: Any, args: tuple, kwargs: dict, attns: list = wrapped) -> None:
                sample = args[0] if args else kwargs["hidden_states"]
                shape = shape_as_tensor(sample)  # traced as the input's shape: dynamic, and static once reshaped
                grid = (shape[2], shape[3])
                for attn in attns:
                    attn.grid = grid

            handles.append(transformer.register_forward_pre_hook(keep_grid, with_kwargs=True))
        if not restore:
            raise ExportError("--token-merging: this UNet has no self-attention to merge tokens in; export without it")
        yield len(restore)
    finally:
        for handle in handles:
            handle.remove()
        for block, original in restore:
            block.attn1 = original
