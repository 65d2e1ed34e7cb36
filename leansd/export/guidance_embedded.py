"""What `sd-export` does for LCM-distilled UNets, which take their guidance scale as an input (`timestep_cond`).

The UNet is exported whole with that input and checked against PyTorch like any other; the runtime embeds the scale
(`leansd.runtime.guidance_embedding`) and runs the UNet once per step. int8, token merging and the deep-cache parts work as
for any UNet (int8's calibration and held-out generations run leansd's own pipeline, which feeds the embedding; the
token-merged graph and both deep-cache parts are exported with the guidance input). The options below have not been built for
such a UNet yet and are refused before anything slow runs.
"""
from __future__ import annotations

from collections.abc import Mapping

from leansd.export.errors import ExportError


def check_options(static: Mapping[str, int] | None, sdxl: bool) -> None:
    """Raise `ExportError` naming the first option an LCM-distilled UNet cannot be exported with yet."""
    refused = [
        (sdxl, "SDXL's export", "use an SD 1.x/2.x latent consistency model, or SDXL with an LCM-LoRA fused (--lora)"),
        (static is not None, "--height/--width/--batch (static shapes size the UNet for guidance's two halves)",
         "export with dynamic shapes; OpenVINO still compiles the UNet for the size each run asks for"),
    ]
    for chosen, option, fix in refused:
        if chosen:
            raise ExportError(f"this UNet takes its guidance scale as an input (time_cond_proj_dim: a latent consistency model), "
                              f"which {option} does not support yet; {fix}")
