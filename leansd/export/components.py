"""What each exported component is: its ONNX inputs/outputs, its PyTorch wrapper and its sample inputs.

Names and dtypes follow Optimum's Stable Diffusion exports, so either tool's loaders read either's folders:

    text_encoder  input_ids int64 (batch, sequence)         -> last_hidden_state, pooler_output, normed_hidden_states
    unet          sample, timestep, encoder_hidden_states    -> out_sample
    vae_encoder   sample (batch, 3, H, W) in [-1, 1]         -> latent_parameters (mean and logvar, 2 x latent channels)
    vae_decoder   latent_sample (batch, C, H/f, W/f)         -> sample

SDXL models add a second text encoder, hidden-state outputs and two UNet inputs (`leansd.export.sdxl`); the x4
upscaler's UNet takes `class_labels` (its noise level), and an LCM-distilled UNet `timestep_cond` (the embedded
guidance scale, `leansd.runtime.guidance_embedding`).

The UNet `timestep` is float32 of shape (batch,) so the fractional timesteps of Euler-type schedulers pass
unrounded. Optimum's ONNX export uses a float32 scalar; Optimum Intel's OpenVINO export an int64 (batch,)
vector. A length-1 timestep is broadcast over the batch by the graph itself (diffusers expands it), so the
(1,) vector Optimum's pipelines feed to a rank-1 timestep works too.

`normed_hidden_states` (leansd's own output, beside Optimum's two) is the embeddings' and every layer's hidden
states through the encoder's final layer norm, shaped (batch, layers + 1, sequence, hidden): `[:, -1]` is
`last_hidden_state`, and `[:, -(N + 1)]` is what diffusers' SD pipelines use for `clip_skip=N`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from leansd.export import deepcache, sdxl, tiny_vae
from leansd.runtime import guidance_embedding

COMPONENTS = ("text_encoder", "unet", "vae_encoder", "vae_decoder")
# Optional: the UNet cut in two for feature reuse across steps (`sd-export --deep-cache`, see `deepcache`).
DEEP_CACHE_COMPONENTS = deepcache.PARTS
NORMED_HIDDEN_STATES = "normed_hidden_states"  # the text encoder's output for clip skip (see the docstring)
# Dynamic-shape exports are traced and checked at most at 64x64 latents (SD 1.x's size): every spatial axis stays
# symbolic, so more checks nothing more, and SDXL's 128x128 costs 4x the time and activations (VAE: several GB).
SAMPLE_MAX_LATENT = 64


@dataclass(frozen=True)
class Tensor:
    """One graph input or output: name, numpy dtype name and its dynamic axes (axis -> symbolic name)."""

    name: str
    dtype: str
    axes: dict[int, str]


IO: dict[str, tuple[tuple[Tensor, ...], tuple[Tensor, ...]]] = {
    "text_encoder": (
        (Tensor("input_ids", "int64", {0: "batch_size", 1: "sequence_length"}),),
        (
            Tensor("last_hidden_state", "float32", {0: "batch_size", 1: "sequence_length"}),
            Tensor("pooler_output", "float32", {0: "batch_size"}),
            Tensor(NORMED_HIDDEN_STATES, "float32", {0: "batch_size", 2: "sequence_length"}),
        ),
    ),
    "unet": (
        (
            Tensor("sample", "float32", {0: "batch_size", 2: "height", 3: "width"}),
            # Its own symbol: a (1,) timestep is valid with any sample batch (see the module docstring).
            Tensor("timestep", "float32", {0: "timestep_batch"}),
            Tensor("encoder_hidden_states", "float32", {0: "batch_size", 1: "sequence_length"}),
        ),
        (Tensor("out_sample", "float32", {0: "batch_size", 2: "height", 3: "width"}),),
    ),
    "unet_deep": (
        (
            Tensor("sample", "float32", {0: "batch_size", 2: "height", 3: "width"}),
            Tensor("timestep", "float32", {0: "timestep_batch"}),
            Tensor("encoder_hidden_states", "float32", {0: "batch_size", 1: "sequence_length"}),
        ),
        (
            Tensor("out_sample", "float32", {0: "batch_size", 2: "height", 3: "width"}),
            Tensor("deep_features", "float32", {0: "batch_size", 2: "height", 3: "width"}),
        ),
    ),
    "unet_shallow": (
        (
            Tensor("sample", "float32", {0: "batch_size", 2: "height", 3: "width"}),
            Tensor("timestep", "float32", {0: "timestep_batch"}),
            Tensor("encoder_hidden_states", "float32", {0: "batch_size", 1: "sequence_length"}),
            Tensor("deep_features", "float32", {0: "batch_size", 2: "height", 3: "width"}),
        ),
        (Tensor("out_sample", "float32", {0: "batch_size", 2: "height", 3: "width"}),),
    ),
    "vae_encoder": (
        (Tensor("sample", "float32", {0: "batch_size", 2: "sample_height", 3: "sample_width"}),),
        (Tensor("latent_parameters", "float32", {0: "batch_size", 2: "latent_height", 3: "latent_width"}),),
    ),
    "vae_decoder": (
        (Tensor("latent_sample", "float32", {0: "batch_size", 2: "latent_height", 3: "latent_width"}),),
        (Tensor("sample", "float32", {0: "batch_size", 2: "sample_height", 3: "sample_width"}),),
    ),
}
# Optional: a user-supplied tiny VAE decoder (TAESD, `sd-export --tiny-vae`): a drop-in for the VAE decoder.
IO[tiny_vae.COMPONENT] = IO["vae_decoder"]
# Optional: the safety checker (`safety_checker`), images preprocessed by its feature extractor -> cosine similarities.
IO["safety_checker"] = (
    (Tensor("clip_input", "float32", {0: "batch_size"}),),
    (Tensor("special_cos_dist", "float32", {0: "batch_size"}), Tensor("cos_dist", "float32", {0: "batch_size"})),
)
# Optional: a depth model's depth estimator (`depth_estimator`, DPT), preprocessed images -> depth.
IO["depth_estimator"] = ((Tensor("pixel_values", "float32", {0: "batch_size"}),), (Tensor("predicted_depth", "float32", {0: "batch_size"}),))


# A class-conditioned UNet (the x4 upscaler, conditioned on the noise level of its low-resolution image) takes one
# more input, as diffusers' UNet2DConditionModel does.
CLASS_LABELS = Tensor("class_labels", "int64", {0: "batch_size"})
# An LCM-distilled UNet takes its guidance scale as an embedding added to the time embedding (`time_cond_proj_dim`).
TIMESTEP_COND = Tensor(guidance_embedding.INPUT, "float32", {0: "batch_size"})


def _hidden_states(layers: int) -> tuple[Tensor, ...]:
    return tuple(Tensor(name, "float32", {0: "batch_size", 1: "sequence_length"}) for name in sdxl.hidden_state_names(layers))


def io(component: str, info: "ModelInfo | None" = None) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """The inputs and outputs of `component` for the model `info` describes."""
    xl = info.text_time if info is not None else None
    if component == sdxl.TEXT_ENCODER_2:
        assert xl is not None, "the second text encoder is SDXL's"
        return IO["text_encoder"][0], (Tensor("text_embeds", "float32", {0: "batch_size"}), IO["text_encoder"][1][0],
                                       *_hidden_states(xl.second_encoder_layers))
    inputs, outputs = IO[component]
    if component == "unet" and info is not None and info.class_embeddings:
        inputs = (*inputs, CLASS_LABELS)
    if component in ("unet", *DEEP_CACHE_COMPONENTS) and info is not None and info.guidance_embedding:
        inputs = (*inputs, TIMESTEP_COND)
    if component in ("unet", *DEEP_CACHE_COMPONENTS) and xl is not None:
        inputs = (*inputs, Tensor("text_embeds", "float32", {0: "batch_size"}), Tensor("time_ids", "float32", {0: "batch_size"}))
    if component == "text_encoder" and xl is not None and xl.first_encoder_layers is not None:
        # SDXL reads unnormalized hidden states (its clip skip too): those replace the normalized stack
        outputs = (*outputs[:2], *_hidden_states(xl.first_encoder_layers))
    return inputs, outputs


def input_names(component: str, info: "ModelInfo | None" = None) -> list[str]:
    return [t.name for t in io(component, info)[0]]


def output_names(component: str, info: "ModelInfo | None" = None) -> list[str]:
    return [t.name for t in io(component, info)[1]]


def dynamic_axes(component: str, info: "ModelInfo | None" = None) -> dict[str, dict[int, str]]:
    """The `dynamic_axes` argument of the TorchScript ONNX exporter for this component."""
    inputs, outputs = io(component, info)
    return {t.name: dict(t.axes) for t in (*inputs, *outputs)}


@dataclass(frozen=True)
class ModelInfo:
    """The few architecture numbers the exporter needs, read from the diffusers configs (never hard-coded)."""

    vae_scale_factor: int
    latent_channels: int
    vae_in_channels: int
    vae_out_channels: int
    scaling_factor: float
    unet_in_channels: int
    unet_sample_size: int
    unet_up_factor: int
    cross_attention_dim: int
    text_hidden_size: int
    vocab_size: int
    max_tokens: int
    bos_token_id: int
    eos_token_id: int
    deep_feature_channels: int = 0  # width of the UNet's cached deep features (`deepcache.feature_channels`)
    tiny_vae_scaling_factor: float = 1.0  # what the pipeline divides latents by before the tiny decoder
    class_embeddings: int = 0  # the UNet's number of class labels (the x4 upscaler's noise levels); 0: none
    text_time: sdxl.TextTime | None = None  # SDXL's added conditioning and second text encoder
    text_layers: int = 12  # the text encoder's transformer layers (CLIP ViT-L/14's 12 in SD 1.x)
    guidance_embedding: int = 0  # the width of an LCM-distilled UNet's guidance embedding (time_cond_proj_dim); 0: none

    @classmethod
    def from_configs(cls, unet: dict[str, Any], vae: dict[str, Any], text_encoder: dict[str, Any] | None,
                     text_encoder_2: dict[str, Any] | None = None) -> ModelInfo:
        """`text_encoder` None: SDXL's refiner, which has the second encoder only (its vocabulary and length are the same)."""
        n_up = len(unet["up_block_types"]) - 1  # the last up block has no upsampler
        xl = sdxl.text_time(unet, text_encoder, text_encoder_2)
        text_encoder = text_encoder if text_encoder is not None else text_encoder_2
        assert text_encoder is not None, "a model has at least one text encoder"
        return cls(
            vae_scale_factor=2 ** (len(vae["block_out_channels"]) - 1),
            latent_channels=int(vae.get("latent_channels", 4)),
            vae_in_channels=int(vae.get("in_channels", 3)),
            vae_out_channels=int(vae.get("out_channels", 3)),
            scaling_factor=float(vae.get("scaling_factor", 0.18215)),
            unet_in_channels=int(unet.get("in_channels", 4)),
            unet_sample_size=int(unet.get("sample_size", 64)),
            unet_up_factor=2**n_up,
            cross_attention_dim=int(unet["cross_attention_dim"]),
            text_hidden_size=int(text_encoder["hidden_size"]),
            vocab_size=int(text_encoder["vocab_size"]),
            max_tokens=int(text_encoder.get("max_position_embeddings", 77)),
            # The tokenizer's real ids; the config may hold CLIP's legacy 0/2.
            bos_token_id=int(text_encoder["vocab_size"]) - 2,
            eos_token_id=int(text_encoder["vocab_size"]) - 1,
            deep_feature_channels=deepcache.feature_channels(unet),
            class_embeddings=int(unet.get("num_class_embeds") or 0),
            text_time=xl,
            text_layers=int(text_encoder.get("num_hidden_layers", 12)),
            guidance_embedding=guidance_embedding.width(unet) or 0,
        )

    def unet_batch(self, batch: int) -> int:
        """The UNet's batch for `batch` images: twice it (classifier-free guidance's two halves), except for a UNet that
        takes its guidance as an input (LCM-distilled), which runs once per image."""
        return batch if self.guidance_embedding else 2 * batch

    @property
    def default_size(self) -> int:
        """The image side the model was trained at (UNet sample size x VAE factor): 512 for SD 1.x."""
        return self.unet_sample_size * self.vae_scale_factor

    @property
    def sample_latent_side(self) -> int:
        """The latent side a dynamic-shape export is traced and checked at: the native one, at most `SAMPLE_MAX_LATENT`."""
        return min(self.unet_sample_size, SAMPLE_MAX_LATENT)


def make_inputs(component: str, info: ModelInfo, *, batch: int, height: int, width: int, seed: int) -> dict[str, np.ndarray]:
    """Seeded inputs of realistic range for one component, for `batch` images of `height` x `width` pixels.

    The UNet gets twice the batch (classifier-free guidance runs the negative and positive halves together), or the
    batch itself for a UNet that takes its guidance as an input (`ModelInfo.unet_batch`).
    """
    rng = np.random.default_rng(seed)
    h, w = height // info.vae_scale_factor, width // info.vae_scale_factor
    if component in ("text_encoder", sdxl.TEXT_ENCODER_2):
        ids = rng.integers(0, info.bos_token_id, size=(batch, info.max_tokens), dtype=np.int64)
        ids[:, 0] = info.bos_token_id
        for row in ids:  # a prompt of random length, then end-of-text padding as CLIP's tokenizer writes it
            row[int(rng.integers(2, info.max_tokens)) :] = info.eos_token_id
        return {"input_ids": ids}
    if component in ("unet", "unet_deep", "unet_shallow"):
        b = info.unet_batch(batch)
        feeds = {
            "sample": rng.standard_normal((b, info.unet_in_channels, h, w), dtype=np.float32),
            "timestep": rng.uniform(0.0, 999.0, size=(b,)).astype(np.float32),
            "encoder_hidden_states": rng.standard_normal((b, info.max_tokens, info.cross_attention_dim), dtype=np.float32),
        }
        if component == "unet" and info.class_embeddings:
            feeds["class_labels"] = rng.integers(0, info.class_embeddings, size=(b,), dtype=np.int64)
        if info.guidance_embedding:  # each row its own scale, in the range LCMs are run at
            scales = rng.uniform(1.0, 15.0, size=b)
            feeds[guidance_embedding.INPUT] = np.concatenate([guidance_embedding.embed(g, info.guidance_embedding, 1) for g in scales])
        if (xl := info.text_time) is not None:
            feeds["text_embeds"] = rng.standard_normal((b, xl.pooled_width), dtype=np.float32)
            # original size, crop corner, target size (and the refiner's aesthetic score), as pipelines pass them
            ids = [height, width, 0, 0, height, width] if xl.time_ids == 6 else [height, width, 0, 0, 6.0][: xl.time_ids]
            feeds["time_ids"] = np.tile(np.asarray(ids, dtype=np.float32), (b, 1))
        if component == "unet_shallow":
            feeds["deep_features"] = rng.standard_normal((b, info.deep_feature_channels, h, w), dtype=np.float32)
        return feeds
    if component == "vae_encoder":
        return {"sample": rng.uniform(-1.0, 1.0, size=(batch, info.vae_in_channels, height, width)).astype(np.float32)}
    if component in ("vae_decoder", tiny_vae.COMPONENT):
        # What the pipeline feeds a decoder: unit-variance latents divided by that decoder's scaling factor.
        latents = rng.standard_normal((batch, info.latent_channels, h, w), dtype=np.float32)
        scale = info.scaling_factor if component == "vae_decoder" else info.tiny_vae_scaling_factor
        return {"latent_sample": (latents / scale).astype(np.float32)}
    raise ValueError(f"unknown component {component!r}")


def trace_size(component: str, info: ModelInfo) -> tuple[int, int]:
    """Image size (pixels) to trace a dynamic-shape export at.

    The UNet is traced at a latent size that is not a multiple of its upsampling factor: diffusers then takes
    its general path (upsample to the skip connection's size), which the graph keeps for every size. Traced
    at a multiple, the graph would only work at multiples.
    """
    side = info.sample_latent_side
    if component in ("unet", "unet_deep") and info.unet_up_factor > 1:
        side = side - 1 if (side - 1) % info.unet_up_factor else side + 1
    return side * info.vae_scale_factor, side * info.vae_scale_factor


def wrap(component: str, module: Any, info: "ModelInfo | None" = None) -> Any:
    """A `torch.nn.Module` whose forward takes this component's inputs, in order, and returns its outputs."""
    import torch

    class TextEncoder(torch.nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            out = self.model(input_ids=input_ids, output_hidden_states=True, return_dict=True)
            norm = getattr(self.model, "text_model", self.model).final_layer_norm
            normed = torch.stack([norm(h) for h in out.hidden_states], dim=1)
            return out.last_hidden_state, out.pooler_output, normed

    class UNet(torch.nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
            return self.model(sample, timestep, encoder_hidden_states, return_dict=False)[0]

    class UNetWithInput(UNet):  # one more input, passed by its keyword (class_labels, timestep_cond)
        def __init__(self, model: Any, keyword: str) -> None:
            super().__init__(model)
            self.keyword = keyword

        def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                    extra: torch.Tensor) -> torch.Tensor:
            return self.model(sample, timestep, encoder_hidden_states, **{self.keyword: extra}, return_dict=False)[0]

    class VaeEncoder(torch.nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, sample: torch.Tensor) -> torch.Tensor:
            # The distribution's parameters, not a sample: the runtime draws with its own RNG.
            return self.model.encode(sample, return_dict=True).latent_dist.parameters

    class VaeDecoder(torch.nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
            return self.model.decode(latent_sample, return_dict=False)[0]

    if component in DEEP_CACHE_COMPONENTS:
        return deepcache.wrap_deep(module) if component == "unet_deep" else deepcache.wrap_shallow(module)
    if component == "unet" and info is not None and (info.class_embeddings or info.guidance_embedding):
        return UNetWithInput(module, CLASS_LABELS.name if info.class_embeddings else TIMESTEP_COND.name).eval()
    if info is not None and info.text_time is not None:
        if component in ("text_encoder", sdxl.TEXT_ENCODER_2):
            return sdxl.wrap_text_encoder(module, projected=component == sdxl.TEXT_ENCODER_2)
        if component == "unet":
            return sdxl.wrap_unet(module)
    kinds = {"text_encoder": TextEncoder, "unet": UNet, "vae_encoder": VaeEncoder, "vae_decoder": VaeDecoder,
             tiny_vae.COMPONENT: VaeDecoder}  # AutoencoderTiny.decode takes and returns what AutoencoderKL's does
    return kinds[component](module).eval()


def io_manifest(component: str, static: dict[str, int] | None, info: ModelInfo) -> dict[str, Any]:
    """Input/output names, dtypes and shapes for `leansd.json` (symbolic names for dynamic axes)."""
    shapes = concrete_shapes(component, info, static) if static else None
    inputs, outputs = io(component, info)
    entry: dict[str, Any] = {}
    for kind, tensors in (("inputs", inputs), ("outputs", outputs)):
        entry[kind] = {}
        for t in tensors:
            shape = shapes[t.name] if shapes else symbolic_shape(component, t, info)
            entry[kind][t.name] = {"dtype": t.dtype, "shape": shape}
    return entry


def symbolic_shape(component: str, t: Tensor, info: ModelInfo) -> list[int | str]:
    fixed = _fixed_shapes(component, info)[t.name]
    return [t.axes.get(i, dim) for i, dim in enumerate(fixed)]


def concrete_shapes(component: str, info: ModelInfo, static: dict[str, int]) -> dict[str, list[int]]:
    return _fixed_shapes(component, info, static["batch"], static["height"], static["width"])


def _fixed_shapes(component: str, info: ModelInfo, batch: int = 1, height: int = 0, width: int = 0) -> dict[str, list[int]]:
    if component == tiny_vae.COMPONENT:
        component = "vae_decoder"  # same inputs and outputs
    f = info.vae_scale_factor
    h, w = height // f, width // f
    c, seq = info.latent_channels, info.max_tokens
    xl = info.text_time
    if xl is not None and component in ("text_encoder", sdxl.TEXT_ENCODER_2, "unet", *DEEP_CACHE_COMPONENTS):
        return _fixed_shapes_sdxl(component, info, xl, batch, h, w)
    ub = info.unet_batch(batch)
    return {
        "text_encoder": {
            "input_ids": [batch, seq],
            "last_hidden_state": [batch, seq, info.text_hidden_size],
            "pooler_output": [batch, info.text_hidden_size],
            NORMED_HIDDEN_STATES: [batch, info.text_layers + 1, seq, info.text_hidden_size],
        },
        "unet": {
            "sample": [ub, info.unet_in_channels, h, w],
            "timestep": [ub],
            "encoder_hidden_states": [ub, seq, info.cross_attention_dim],
            "out_sample": [ub, c, h, w],
            "class_labels": [ub],
            guidance_embedding.INPUT: [ub, info.guidance_embedding],
        },
        "unet_deep": {
            "sample": [ub, info.unet_in_channels, h, w],
            "timestep": [ub],
            "encoder_hidden_states": [ub, seq, info.cross_attention_dim],
            "out_sample": [ub, c, h, w],
            "deep_features": [ub, info.deep_feature_channels, h, w],
            guidance_embedding.INPUT: [ub, info.guidance_embedding],
        },
        "unet_shallow": {
            "sample": [ub, info.unet_in_channels, h, w],
            "timestep": [ub],
            "encoder_hidden_states": [ub, seq, info.cross_attention_dim],
            "deep_features": [ub, info.deep_feature_channels, h, w],
            "out_sample": [ub, c, h, w],
            guidance_embedding.INPUT: [ub, info.guidance_embedding],
        },
        "vae_encoder": {"sample": [batch, info.vae_in_channels, height, width], "latent_parameters": [batch, 2 * c, h, w]},
        "vae_decoder": {"latent_sample": [batch, c, h, w], "sample": [batch, info.vae_out_channels, height, width]},
    }[component]


def _fixed_shapes_sdxl(component: str, info: ModelInfo, xl: sdxl.TextTime, batch: int, h: int, w: int) -> dict[str, list[int]]:
    seq = info.max_tokens
    if component in ("unet", *DEEP_CACHE_COMPONENTS):
        b = 2 * batch
        features = {} if component == "unet" else {"deep_features": [b, info.deep_feature_channels, h, w]}  # deep-cache parts
        return {"sample": [b, info.unet_in_channels, h, w], "timestep": [b], "encoder_hidden_states": [b, seq, info.cross_attention_dim],
                "text_embeds": [b, xl.pooled_width], "time_ids": [b, xl.time_ids], "out_sample": [b, info.latent_channels, h, w], **features}
    if component == "text_encoder":
        width, layers, pooled = info.text_hidden_size, xl.first_encoder_layers or 0, {"pooler_output": [batch, info.text_hidden_size]}
    else:
        width, layers, pooled = xl.second_encoder_width, xl.second_encoder_layers, {"text_embeds": [batch, xl.pooled_width]}
    states = {name: [batch, seq, width] for name in sdxl.hidden_state_names(layers)}
    return {"input_ids": [batch, seq], "last_hidden_state": [batch, seq, width], **pooled, **states}
