"""Names in a model folder that the exporter writes and the runtime reads: one place for both sides.

Component names are the manifest's `components` keys and, for model files, folder names (Optimum's layout).
A parts index (`<model>.parts.json`) lists the consecutive parts a model was cut into for weight streaming.
"""
from __future__ import annotations

import json
from pathlib import Path

from leansd.runtime.errors import ModelFolderError

MANIFEST = "leansd.json"
FORMAT = "leansd-model"
FORMAT_VERSION = 1

TEXT_ENCODER = "text_encoder"
TEXT_ENCODER_2 = "text_encoder_2"  # SDXL's second (its refiner's only) text encoder
UNET = "unet"
VAE_DECODER = "vae_decoder"
VAE_ENCODER = "vae_encoder"
TINY_VAE_DECODER = "vae_decoder_tiny"  # TAESD, written by `sd-export --tiny-vae`
UNET_DEEP = "unet_deep"  # the whole UNet that also returns its deep features (`sd-export --deep-cache`)
UNET_SHALLOW = "unet_shallow"  # the UNet's outermost layers, fed cached deep features
# The same UNet graphs with token merging in their top-level self-attentions (`sd-export --token-merging`).
TOKEN_MERGED = {UNET: "unet_tome", UNET_DEEP: "unet_deep_tome", UNET_SHALLOW: "unet_shallow_tome"}
UNET_PARTS = "unet_parts"  # the index of the ONNX UNet's weight-streaming parts
TEXT_ENCODER_2_PARTS = "text_encoder_2_parts"  # the index of SDXL's second text encoder's parts (2.8 GB in fp32)
SAFETY_CHECKER = "safety_checker"  # diffusers' StableDiffusionSafetyChecker, when the source had one
DEPTH_ESTIMATOR = "depth_estimator"  # a depth model's DPT, when the source had one
FEATURE_EXTRACTOR = "feature_extractor"  # its image preprocessing (CLIPImageProcessor's preprocessor_config.json)

# The components that may be cut into weight-streaming parts, and the manifest key of each one's parts index
# (`components[key]["onnx"][precision]` = "<component>/model.parts.json").
PARTS_OF = {UNET: UNET_PARTS, TEXT_ENCODER_2: TEXT_ENCODER_2_PARTS}

PARTS_FORMAT = "leansd-onnx-parts"
PARTS_FORMAT_VERSION = 1


def parts_index_path(model_path: Path) -> Path:
    """`unet/model.onnx` -> `unet/model.parts.json`."""
    return model_path.with_name(f"{model_path.stem}.parts.json")


def read_parts_index(index: Path) -> dict:
    """A parts index written by sd-export; raises `ModelFolderError` naming the fix when it is not one."""
    try:
        parts = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFolderError(f"{index} is not a readable parts index ({exc}); re-export the model with sd-export") from None
    if not isinstance(parts, dict) or parts.get("format") != PARTS_FORMAT or not parts.get("parts"):
        raise ModelFolderError(f"{index} is not a leansd parts index; re-export the model with sd-export")
    return parts


def fused_whole_file(index: Path) -> Path | None:
    """The whole model with fused attention that a parts index may name, for sessions that keep it loaded."""
    whole = read_parts_index(index).get("whole")
    return None if not whole else index.parent / whole
