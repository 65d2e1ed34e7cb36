"""One small wrapper per model component, each with one verb.

Each wrapper owns the few config fields it needs (the VAE's scaling factor and scale factor, the latent
channels) and adapts to the exporter's input names and dtypes by reading its session's specs.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from leansd.runtime.backends import LazySession, Session
from leansd.runtime.errors import InvalidInputError, ModelFolderError


def _first_input(session: Session, names: tuple[str, ...], component: str) -> str:
    for name in names:
        if session.has_input(name):
            return name
    raise ModelFolderError(
        f"{session.path}: the {component} has inputs {[s.name for s in session.inputs]}, expected one of {list(names)}; "
        "re-export it with sd-export"
    )


@dataclass(frozen=True)
class EncodedText:
    """A text encoder's output for a batch of prompts: per-token hidden states, and the pooled embedding when the
    model exports one (SDXL's second encoder: `text_embeds`)."""

    hidden: np.ndarray
    pooled: np.ndarray | None = None


class TextEncoder:
    """CLIP text encoder: token ids -> hidden states of the last layer, or of an earlier one (`hidden_states.N`
    outputs, as SDXL's penultimate layer needs; -2 is the penultimate), and clip skip (`normed_hidden_states`)."""

    NORMED = "normed_hidden_states"  # (batch, layers + 1, sequence, width), through the final layer norm

    def __init__(self, session: LazySession):
        self.session = session

    def encode(self, input_ids: np.ndarray, layer: int = -1, clip_skip: int = 0) -> EncodedText:
        """`clip_skip` N > 0 takes the hidden states N layers earlier: with `layer` -1, through the final layer norm
        (diffusers' SD pipelines' `clip_skip`); with another layer, as they are (diffusers' SDXL pipelines')."""
        with self.session.use() as session:
            outputs = session.run({_first_input(session, ("input_ids",), "text encoder"): input_ids})
            path = session.path
        if layer == -1 and clip_skip:
            hidden = _normed_layer(outputs, clip_skip, path)
        elif layer == -1:
            hidden = outputs.get("last_hidden_state")
            if hidden is None:  # some exports name it differently; the hidden states are the 3-D output
                hidden = next(v for v in outputs.values() if v.ndim == 3)
        else:
            layers = sorted((k for k in outputs if k.startswith("hidden_states.")), key=lambda k: int(k.rsplit(".", 1)[1]))
            index = layer - clip_skip
            if len(layers) < -index:
                raise ModelFolderError(
                    f"{path} does not output the hidden states of layer {index}; re-export it with sd-export"
                    if not clip_skip else f"clip_skip {clip_skip} goes past the first layer of the text encoder {path}; use a smaller one"
                )
            hidden = outputs[layers[index]]
        pooled = outputs.get("text_embeds", outputs.get("pooler_output"))
        return EncodedText(hidden.astype(np.float32, copy=False), None if pooled is None else pooled.astype(np.float32, copy=False))


def _normed_layer(outputs: Mapping[str, np.ndarray], clip_skip: int, path) -> np.ndarray:
    stack = outputs.get(TextEncoder.NORMED)
    if stack is None:
        raise ModelFolderError(f"the text encoder {path} does not output the hidden states clip skip needs "
                               "(it was exported by another tool or an older leansd); re-export the model with sd-export")
    if clip_skip >= stack.shape[1]:
        raise InvalidInputError(f"clip_skip {clip_skip} is more than this text encoder's {stack.shape[1] - 1} layers allow; "
                                f"use 0 to {stack.shape[1] - 1} (1 is the usual 'clip skip 2')")
    return stack[:, -(clip_skip + 1)]


class UNet:
    """The denoiser network (or a part of it): noisy latents, timestep and conditioning -> its outputs.

    The feed is built from the inputs the model declares: `sample`, `timestep` (in the dtype and shape the
    export chose), and each other input taken by name from `inputs` (text hidden states, and whatever else a
    model takes: pooled text embeddings, time ids, class labels, cached deep features).
    """

    def __init__(self, session: LazySession, config: dict):
        self.session = session
        self.in_channels = int(config.get("in_channels", 4))
        self.sample_size = config.get("sample_size", 64)

    def expect_batch_sizes(self, sizes: frozenset[int]) -> None:
        """Tell the backend the batch sizes a generation will call this model with (see `Session.expect_batch_sizes`)."""
        with self.session.use() as session:
            session.expect_batch_sizes(sizes)

    def predict(self, sample: np.ndarray, timestep: float, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The model's outputs by name (the prediction is `out_sample` in leansd's and Optimum's exports)."""
        with self.session.use() as session:
            return session.run(_unet_feeds(session, sample, timestep, inputs))


def prediction(outputs: Mapping[str, np.ndarray]) -> np.ndarray:
    """The noise (or v) prediction among a UNet's outputs."""
    return outputs["out_sample"] if "out_sample" in outputs else next(iter(outputs.values()))


def _unet_feeds(session: Session, sample: np.ndarray, timestep: float, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    spec = session.input("timestep")
    # Exports differ: (batch,) or a scalar; int64 or float32. Feed what the model declares.
    if spec.shape is not None and len(spec.shape) == 0:
        t = np.asarray(timestep, dtype=spec.dtype)
    else:
        t = np.full((sample.shape[0],), timestep, dtype=np.float64).astype(spec.dtype)
    feeds = {"sample": sample, "timestep": t}
    for spec in session.inputs:
        if spec.name in feeds:
            continue
        if spec.name not in inputs:
            raise ModelFolderError(
                f"{session.path}: the UNet takes an input {spec.name!r} that this pipeline does not provide "
                f"(it provides {sorted(inputs)}); this kind of model is not supported yet"
            )
        feeds[spec.name] = inputs[spec.name]
    return feeds


class _Vae:
    """The VAE config fields both halves need: latent scaling, channels, and the scale factor 2 ** (blocks - 1)."""

    def __init__(self, session: LazySession, vae_config: dict):
        self.session, self.config = session, vae_config
        self.scaling_factor = float(vae_config.get("scaling_factor", 0.18215))
        self.shift_factor = float(vae_config.get("shift_factor") or 0.0)
        self.latent_channels = int(vae_config.get("latent_channels", 4))
        self.scale_factor = 2 ** (len(vae_config.get("block_out_channels", [0, 0, 0, 0])) - 1)


class VaeDecoder(_Vae):
    """Latents (as the UNet sees them) -> images in [-1, 1], NCHW; whole, or tile by tile for large images."""

    TILE_OVERLAP = 0.25  # fraction of a tile shared with its neighbour, as diffusers' AutoencoderKL tiling

    def __init__(self, session: LazySession, vae_config: dict):
        super().__init__(session, vae_config)
        size = vae_config.get("sample_size", 512)
        self.tile_size = int(size[0] if isinstance(size, (list, tuple)) else size)  # pixels; latents: / scale_factor

    def decode(self, latents: np.ndarray, tiled: bool = False, tile_size: int | None = None) -> np.ndarray:
        """Decode; with `tiled`, latents larger than one tile are decoded in overlapping tiles whose seams are
        blended linearly (diffusers' `vae.enable_tiling()`, whose `tile_sample_min_size` is `tile_size`, by
        default the VAE's native size): memory stays that of one tile at any image size."""
        scaled = (latents / self.scaling_factor + self.shift_factor).astype(np.float32)
        size = tile_size or self.tile_size
        tile = size // self.scale_factor
        if tiled and (scaled.shape[-1] > tile or scaled.shape[-2] > tile):
            return self._decode_tiled(scaled, tile, size)
        return self._run(scaled)

    def _run(self, scaled: np.ndarray) -> np.ndarray:
        with self.session.use() as session:
            out = session.run({_first_input(session, ("latent_sample",), "VAE decoder"): scaled})
        return out.get("sample", next(iter(out.values())))

    def _decode_tiled(self, scaled: np.ndarray, tile: int, size: int) -> np.ndarray:
        stride = int(tile * (1 - self.TILE_OVERLAP))
        blend = int(size * self.TILE_OVERLAP)
        keep = size - blend
        rows = [
            [np.array(self._run(np.ascontiguousarray(scaled[:, :, i : i + tile, j : j + tile]))) for j in range(0, scaled.shape[3], stride)]
            for i in range(0, scaled.shape[2], stride)
        ]
        out_rows = []
        for i, row in enumerate(rows):
            for j, current in enumerate(row):
                # In place, so the next row blends with this row's already blended tiles (as diffusers does).
                if i > 0:
                    _blend(rows[i - 1][j], current, blend, axis=2)
                if j > 0:
                    _blend(row[j - 1], current, blend, axis=3)
            out_rows.append(np.concatenate([t[:, :, :keep, :keep] for t in row], axis=3))
        return np.concatenate(out_rows, axis=2)


def _blend(before: np.ndarray, current: np.ndarray, extent: int, axis: int) -> None:
    """Fade `before`'s last `extent` rows (axis 2) or columns (axis 3) into `current`'s first ones, in place."""
    extent = min(before.shape[axis], current.shape[axis], extent)
    for k in range(extent):
        w = k / extent
        dst = (slice(None), slice(None), k) if axis == 2 else (slice(None), slice(None), slice(None), k)
        src = (slice(None), slice(None), k - extent) if axis == 2 else (slice(None), slice(None), slice(None), k - extent)
        current[dst] = before[src] * (1 - w) + current[dst] * w


class VaeEncoder(_Vae):
    """Images in [-1, 1], NCHW -> the latent distribution's mean and log-variance."""

    def encode(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with self.session.use() as session:
            name = _first_input(session, ("sample",), "VAE encoder")
            fixed = (session.input(name).shape or (None,))[0]
            if fixed is None or fixed == images.shape[0]:
                out = session.run({name: images})
            else:  # a static export's encoder takes its batch only: run chunks of it, the last one padded
                out = _run_in_fixed_batches(session, name, images, fixed)
        if "latent_parameters" in out or len(out) == 1 and next(iter(out.values())).shape[1] == 2 * self.latent_channels:
            moments = out.get("latent_parameters", next(iter(out.values())))
            mean, logvar = np.split(moments, 2, axis=1)
            return mean, np.clip(logvar, -30.0, 20.0)
        raise ModelFolderError(
            f"{session.path}: the VAE encoder returns {sorted(out)}, not the latent distribution's parameters; "
            "re-export it with sd-export"
        )


def _run_in_fixed_batches(session: Session, name: str, images: np.ndarray, fixed: int) -> dict[str, np.ndarray]:
    """Outputs for `images` from a model whose batch is fixed at `fixed`; each image is computed on its own, so
    padding with copies of the last image changes nothing."""
    chunks = []
    for i in range(0, images.shape[0], fixed):
        part = images[i : i + fixed]
        padded = np.concatenate([part, np.repeat(part[-1:], fixed - part.shape[0], axis=0)])
        chunks.append({k: v[: part.shape[0]] for k, v in session.run({name: padded}).items()})
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
