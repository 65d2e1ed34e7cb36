"""The exporter: a Stable Diffusion model -> a leansd model folder (ONNX and OpenVINO IR, verified).

May import torch, diffusers, transformers, onnx and openvino (lazily, inside the functions that need them).

    from leansd.export import export_model
    export_model("path/to/diffusers-folder", "out/model", backends="all")
    export_model("path/to/diffusers-folder", "out/model-int8", precisions=("fp32", "int8"))
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

from leansd.export.errors import ExportError, ParityError

__all__ = ["export_model", "ExportError", "ParityError"]


def export_model(
    source: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    *,
    backends: str | Sequence[str] = "all",
    static_shapes: Mapping[str, int] | None = None,
    opset: int = 17,
    overwrite: bool = False,
    tolerance: float | Mapping[str, float] | None = None,
    single_file_config: str | os.PathLike[str] | None = None,
    progress: bool | None = None,
    precisions: str | Sequence[str] = "fp32",
    force_int8: bool = False,
    deep_cache: bool = False,
    tiny_vae: str | os.PathLike[str] | None = None,
    unet_parts: int | None = None,
    text_encoder_parts: int | None = None,
    prediction_type: str | None = None,
    image_size: int | None = None,
    loras: Sequence[str | os.PathLike[str] | tuple[str | os.PathLike[str], float]] | None = None,
    token_merging: float | None = None,
    int8_unet: str = "auto",
    int8_unet_onnx: str = "dynamic",
) -> Path:
    """Export a Stable Diffusion 1.x/2.x or SDXL model to a leansd model folder and return the folder's path.

    Args:
        source: a diffusers folder, a Hugging Face Hub id (needs network access), or an SD 1.x/2.x single-file
            checkpoint (`.ckpt` / `.safetensors`, original CompVis / Stability layout).
        output_dir: the folder to create. It appears only once every component has been exported and
            verified; on any failure nothing is left at `output_dir` (nor a temporary folder).
        backends: "onnx", "openvino", "all", or a sequence of the first two.
        static_shapes: {"height": H, "width": W, "batch": B} (any subset) for fixed-shape graphs; None for
            dynamic batch, size and sequence axes. The UNet's batch is 2 x B (classifier-free guidance).
        opset: the ONNX opset (14..20).
        overwrite: replace an existing `output_dir` (only after the new export succeeded).
        tolerance: the largest accepted relative error (max-abs error / max-abs reference output) of each
            exported component against PyTorch: one number, or {component: number}. Default 1e-3.
        single_file_config: a diffusers-layout folder of configs to convert a single-file checkpoint with
            (default: the SD 1.x or SD 2.x configs in `leansd/export/configs/`, chosen by the text encoder's layout).
        progress: show a progress bar (None: only when stderr is a terminal).
        precisions: "fp32" (default), or "fp32,int8" / ("fp32", "int8") to also write int8 variants (fp32 is
            always written: it is the reference the int8 files are calibrated on and measured against). The
            UNet gets NNCF hybrid int8 on OpenVINO (`unet/openvino_model_int8.xml`) and onnxruntime dynamic int8
            on ONNX (`unet/model_int8.onnx`); the other models int8 weights. Each int8 file is compared with
            fp32 on held-out inputs; see `leansd.export.quantize` for the method and the quality gates.
        force_int8: keep int8 files that miss their quality gate instead of failing the export (the UNet,
            text encoder) or keeping fp32 (the VAE parts).
        deep_cache: also write the UNet cut in two (`unet_deep/`, `unet_shallow/`, fp32) so the runtime can reuse
            deep features across steps (`leansd.load(..., deep_cache=N)`); see `leansd.export.deepcache`.
        tiny_vae: a diffusers `AutoencoderTiny` folder (TAESD) to export beside the model's VAE as
            `vae_decoder_tiny/` (fp32), for fast decoding and step previews (`leansd.load(..., tiny_vae=True)`);
            it must decode this model's latents (same channels and scale factor).
        unet_parts: cut the ONNX UNet (fp32, and int8 when written) into this many consecutive parts that share
            its weights file (`unet/model.parts.json`), for low-memory mode's weight streaming on onnxruntime
            (`leansd.load(..., low_memory=True)`); each chain is verified like the whole file. None (default):
            8 parts when the UNet keeps its weights in an external data file (models over 2 GB, like SD 1.5),
            none for smaller ones; 0: no parts. See `leansd.export.streaming`.
        text_encoder_parts: the same for SDXL's second text encoder (`text_encoder_2/model.parts.json`, fp32 only):
            None (default): 8 parts when it keeps its weights in an external data file (SDXL's, 2.8 GB), else none;
            0: no parts. An existing export is cut without re-exporting by `python -m leansd.export.parts FOLDER`.
        prediction_type: a single file's "epsilon" or "v_prediction", written into its scheduler config. Needed
            for an SD 2.x text-to-image file that does not say (no model-spec metadata, no known global_step);
            see `leansd.export.checkpoint_variant`.
        image_size: a single file's native image side in pixels (the UNet's sample_size x the VAE factor);
            default 512, or 768 for SD 2.x v_prediction files, or what the file's metadata or config folder says.
        loras: LoRA `.safetensors` files to fuse into the UNet and text encoder(s) before export, each "FILE",
            "FILE:SCALE" or (FILE, SCALE) (kohya / AUTOMATIC1111 or diffusers / PEFT layouts, convolution LoRAs
            included), with diffusers' `load_lora_weights` + `fuse_lora`; recorded in leansd.json. LoRAs can also
            be applied at run time without re-export (`leansd.load(..., loras={FILE: SCALE})`), using the
            `weight_map.json` every export writes.
        token_merging: also write the UNet (and its deep-cache parts) with token merging in the top-resolution
            self-attentions, merging this fraction of the tokens (0.5 is the usual choice): `unet_tome/` etc., fp32,
            for `leansd.load(..., token_merging=True)`, an approximate mode that makes those attentions about 4x
            cheaper. SD 1.x/2.x and SDXL (merged at SDXL's second level, its first has no attention);
            see `leansd.export.token_merging`.
        int8_unet: how the OpenVINO UNet's int8 file is made, with `precisions` "fp32,int8": "hybrid" (int8
            weights, and calibrated int8 activations in the convolutions), "weights" (int8 matrix-product
            weights only, convolutions and arithmetic float, no calibration) or "auto" (default: hybrid below 1 B
            parameters, weights from there, i.e. for SDXL). See `leansd.export.quantize`.
        int8_unet_onnx: how the ONNX UNet's int8 file is made: "dynamic" (default: int8 matrix-product weights,
            activations quantized at run time, closest to fp32) or "static" (int8 activations too, convolutions
            included, calibrated: about twice fp32's speed on CPUs with VNNI or AMX, about 30 dB from fp32; UNets
            under 1 B parameters).

    Raises:
        ExportError: a problem the user can fix (bad source, existing output, bad size ...), one line.
        ParityError: an exported component differs from PyTorch by more than the tolerance, or an int8
            component from fp32 by more than its gate allows.
    """
    from leansd.export.exporter import export

    return export(
        source,
        output_dir,
        backends=backends,
        static_shapes=static_shapes,
        opset=opset,
        overwrite=overwrite,
        tolerance=tolerance,
        single_file_config=single_file_config,
        progress=progress,
        precisions=precisions,
        force_int8=force_int8,
        deep_cache=deep_cache,
        tiny_vae_source=tiny_vae,
        unet_parts=unet_parts,
        text_encoder_parts=text_encoder_parts,
        prediction_type=prediction_type,
        image_size=image_size,
        loras=loras,
        token_merging_ratio=token_merging,
        int8_unet=int8_unet,
        int8_unet_onnx=int8_unet_onnx,
    )
