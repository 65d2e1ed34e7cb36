"""What each exported component is: its ONNX inputs/outputs, its PyTorch wrapper and its sample inputs.

Names and dtypes follow Optimum's Stable Diffusion exports, so either tool's loaders read either's folders:

    text_encoder  input_ids int64 (batch, sequence)         -> last_hidden_state, pooler_output
    unet          sample, timestep, encoder_hidden_states    -> out_sample
    vae_encoder   sample (batch, 3, H, W) in [-1, 1]         -> latent_parameters (mean and logvar, 2 x latent channels)
    vae_decoder   latent_sample (batch, C, H/f, W/f)         -> sample

The UNet `timestep` is float32 of shape (batch,) so the fractional timesteps of Euler-type schedulers pass
unrounded. Optimum's ONNX export uses a float32 scalar; Optimum Intel's OpenVINO export an int64 (batch,)
vector. A length-1 timestep is broadcast over the batch by the graph itself (diffusers expands it), so the
(1,) vector Optimum's pipelines feed to a rank-1 timestep works too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from leansd.export import deepcache, tiny_vae

COMPONENTS = ("text_encoder", "unet", "vae_encoder", "vae_decoder")
# Optional: the UNet cut in two for feature reuse across steps (`sd-export --deep-cache`, see `deepcache`).
DEEP_CACHE_COMPONENTS = deepcache.PARTS


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


def input_names(component: str) -> list[str]:
    return [t.name for t in IO[component][0]]


def output_names(component: str) -> list[str]:
    return [t.name for t in IO[component][1]]


def dynamic_axes(component: str) -> dict[str, dict[int, str]]:
    """The `dynamic_axes` argument of the TorchScript ONNX exporter for this component."""
    inputs, outputs = IO[component]
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

    @classmethod
    def from_configs(cls, unet: dict[str, Any], vae: dict[str, Any], text_encoder: dict[str, Any]) -> ModelInfo:
        n_up = len(unet["up_block_types"]) - 1  # the last up block has no upsampler
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
        )

    @property
    def default_size(self) -> int:
        """The image side the model was trained at (UNet sample size x VAE factor): 512 for SD 1.x."""
        return self.unet_sample_size * self.vae_scale_factor


def make_inputs(component: str, info: ModelInfo, *, batch: int, height: int, width: int, seed: int) -> dict[str, np.ndarray]:
    """Seeded inputs of realistic range for one component, for `batch` images of `height` x `width` pixels.

    The UNet gets twice the batch (classifier-free guidance runs the negative and positive halves together).
    """
    rng = np.random.default_rng(seed)
    h, w = height // info.vae_scale_factor, width // info.vae_scale_factor
    if component == "text_encoder":
        ids = rng.integers(0, info.bos_token_id, size=(batch, info.max_tokens), dtype=np.int64)
        ids[:, 0] = info.bos_token_id
        for row in ids:  # a prompt of random length, then end-of-text padding as CLIP's tokenizer writes it
            row[int(rng.integers(2, info.max_tokens)) :] = info.eos_token_id
        return {"input_ids": ids}
    if component in ("unet", "unet_deep", "unet_shallow"):
        b = 2 * batch
        feeds = {
            "sample": rng.standard_normal((b, info.unet_in_channels, h, w), dtype=np.float32),
            "timestep": rng.uniform(0.0, 999.0, size=(b,)).astype(np.float32),
            "encoder_hidden_states": rng.standard_normal((b, info.max_tokens, info.cross_attention_dim), dtype=np.float32),
        }
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
    side = info.unet_sample_size
    if component in ("unet", "unet_deep") and info.unet_up_factor > 1:
        side = side - 1 if (side - 1) % info.unet_up_factor else side + 1
    return side * info.vae_scale_factor, side * info.vae_scale_factor


def wrap(component: str, module: Any) -> Any:
    """A `torch.nn.Module` whose forward takes this component's inputs, in order, and returns its outputs."""
    import torch

    class TextEncoder(torch.nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            out = self.model(input_ids=input_ids, return_dict=True)
            return out.last_hidden_state, out.pooler_output

    class UNet(torch.nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
            return self.model(sample, timestep, encoder_hidden_states, return_dict=False)[0]

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
    kinds = {"text_encoder": TextEncoder, "unet": UNet, "vae_encoder": VaeEncoder, "vae_decoder": VaeDecoder,
             tiny_vae.COMPONENT: VaeDecoder}  # AutoencoderTiny.decode takes and returns what AutoencoderKL's does
    return kinds[component](module).eval()


def io_manifest(component: str, static: dict[str, int] | None, info: ModelInfo) -> dict[str, Any]:
    """Input/output names, dtypes and shapes for `leansd.json` (symbolic names for dynamic axes)."""
    shapes = concrete_shapes(component, info, static) if static else None
    inputs, outputs = IO[component]
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
    return {
        "text_encoder": {
            "input_ids": [batch, seq],
            "last_hidden_state": [batch, seq, info.text_hidden_size],
            "pooler_output": [batch, info.text_hidden_size],
        },
        "unet": {
            "sample": [2 * batch, info.unet_in_channels, h, w],
            "timestep": [2 * batch],
            "encoder_hidden_states": [2 * batch, seq, info.cross_attention_dim],
            "out_sample": [2 * batch, c, h, w],
        },
        "unet_deep": {
            "sample": [2 * batch, info.unet_in_channels, h, w],
            "timestep": [2 * batch],
            "encoder_hidden_states": [2 * batch, seq, info.cross_attention_dim],
            "out_sample": [2 * batch, c, h, w],
            "deep_features": [2 * batch, info.deep_feature_channels, h, w],
        },
        "unet_shallow": {
            "sample": [2 * batch, info.unet_in_channels, h, w],
            "timestep": [2 * batch],
            "encoder_hidden_states": [2 * batch, seq, info.cross_attention_dim],
            "deep_features": [2 * batch, info.deep_feature_channels, h, w],
            "out_sample": [2 * batch, c, h, w],
        },
        "vae_encoder": {"sample": [batch, info.vae_in_channels, height, width], "latent_parameters": [batch, 2 * c, h, w]},
        "vae_decoder": {"latent_sample": [batch, c, h, w], "sample": [batch, info.vae_out_channels, height, width]},
    }[component]
