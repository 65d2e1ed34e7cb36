"""What the benchmark exports and which configurations it measures.

An `Export` is one command that turns the random-weight diffusers folder into a model folder. A `Peer` is
one configuration measured in its own process: a runtime (`kind`), the folder it reads and its options.
A peer with `slot` set is a row reserved for a mode that does not exist yet; the table shows it as
"not run" with that reason, so the missing modes stay visible.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

PERF = Path(__file__).resolve().parent
PYTHON = Path(sys.executable)


def _tool(name: str) -> str:
    """A console script of this environment (next to its python), else the bare name from PATH."""
    local = PYTHON.with_name(name)
    return str(local) if local.exists() else name


@dataclass(frozen=True)
class Export:
    key: str  # folder name under perf/cache/<mode>/
    label: str
    template: tuple[str, ...]  # {python}, {tool:NAME}, {src}, {out} and {taesd} (the tiny VAE folder) are filled in
    opt_in: str | None = None  # the bench.py flag that enables it, when it is not run by default

    @property
    def needs_tiny_vae(self) -> bool:
        return "{taesd}" in self.template

    def argv(self, src: Path, out: Path, taesd: Path | None = None) -> list[str]:
        args = []
        for part in self.template:
            if part.startswith("{tool:"):
                args.append(_tool(part[6:-1]))
            else:
                args.append(part.format(python=str(PYTHON), src=str(src), out=str(out), perf=str(PERF), taesd=str(taesd)))
        return args

    def display(self) -> str:
        """The command as a user would type it."""
        shown = []
        for part in self.template:
            if part.startswith("{tool:"):
                shown.append(part[6:-1])
            else:
                shown.append(part.format(python="python", src="SRC", out="OUT", perf="perf", taesd="TAESD"))
        return " ".join(shown)


EXPORTS = {
    e.key: e
    for e in (
        Export(
            "leansd",
            "leansd sd-export (ONNX + OpenVINO IR, fp32, with the deep-cache UNet parts and a tiny VAE decoder)",
            ("{tool:sd-export}", "{src}", "{out}", "--backend", "all", "--deep-cache", "--tiny-vae", "{taesd}", "--quiet"),
        ),
        Export(
            "leansd-tome",
            "leansd sd-export, OpenVINO IR only, fp32, with the deep-cache parts, a tiny VAE decoder and token-merged UNet graphs",
            ("{tool:sd-export}", "{src}", "{out}", "--backend", "openvino", "--deep-cache", "--tiny-vae", "{taesd}", "--token-merging",
             "0.5", "--quiet"),
        ),
        Export(
            "leansd-ov",
            "leansd sd-export, OpenVINO IR only, fp32 (half the disk of the two-backend export: SDXL's fits beside Optimum's)",
            ("{tool:sd-export}", "{src}", "{out}", "--backend", "openvino", "--quiet"),
        ),
        Export(
            "leansd-ov-tinyvae",
            "leansd sd-export, OpenVINO IR only, fp32, with a tiny VAE decoder (for LCM-distilled models, which get no "
            "deep-cache parts)",
            ("{tool:sd-export}", "{src}", "{out}", "--backend", "openvino", "--tiny-vae", "{taesd}", "--quiet"),
        ),
        Export(
            "leansd-int8",
            "leansd sd-export with int8 variants (OpenVINO: NNCF hybrid UNet + int8 weights; ONNX: dynamic int8)",
            # --force-int8: random weights make the int8 quality gate meaningless; speed and memory are what we measure.
            ("{tool:sd-export}", "{src}", "{out}", "--backend", "all", "--precision", "fp32,int8", "--force-int8", "--quiet"),
        ),
        Export(
            "leansd-ort-int8",
            "leansd sd-export, ONNX only, with int8 variants (dynamic int8), the UNet's streaming parts and the deep-cache parts",
            # ONNX only: no OpenVINO calibration, so this export takes minutes where leansd-int8 takes hours.
            ("{tool:sd-export}", "{src}", "{out}", "--backend", "onnx", "--precision", "fp32,int8", "--force-int8", "--deep-cache",
             "--quiet"),
        ),
        Export(
            "leansd-ort-int8-static",
            "leansd sd-export, ONNX only, with int8 variants (static QDQ int8 UNet for VNNI/AMX CPUs), the UNet's streaming "
            "parts, the deep-cache parts (dynamic int8) and a tiny VAE decoder",
            ("{tool:sd-export}", "{src}", "{out}", "--backend", "onnx", "--precision", "fp32,int8", "--int8-unet-onnx", "static",
             "--force-int8", "--deep-cache", "--tiny-vae", "{taesd}", "--quiet"),
        ),
        Export(
            "optimum-onnx",
            "Optimum ONNX export",
            ("{tool:optimum-cli}", "export", "onnx", "--model", "{src}", "--task", "text-to-image", "{out}"),
        ),
        Export(
            "optimum-ov-fp32",
            "Optimum Intel OpenVINO export, fp32",
            ("{tool:optimum-cli}", "export", "openvino", "--model", "{src}", "--task", "text-to-image", "--weight-format", "fp32", "{out}"),
        ),
        Export(
            "optimum-ov-int8",
            "Optimum Intel OpenVINO export, int8 weight-only",
            ("{tool:optimum-cli}", "export", "openvino", "--model", "{src}", "--task", "text-to-image", "--weight-format", "int8", "{out}"),
        ),
        Export(
            "optimum-ov",
            "Optimum Intel OpenVINO export, its default settings (weights as stored; int8 weight-only for parts of 1 B parameters or more)",
            ("{tool:optimum-cli}", "export", "openvino", "--model", "{src}", "--task", "text-to-image", "{out}"),
        ),
        Export(
            "optimum-ov-hybrid",
            "Optimum Intel OpenVINO export, hybrid int8 (NNCF, UNet activations + weights)",
            ("{python}", "{perf}/export_hybrid.py", "{src}", "{out}"),
            opt_in="--hybrid",
        ),
    )
}


# SDXL: the full-size export takes 18 minutes and 26 GB here, so the benchmark keeps the plain one
# (the command the SDXL export was made with, ONNX + OpenVINO IR fp32 with the UNet's streamed parts).
SDXL_EXPORTS = {
    "leansd": Export("leansd", "leansd sd-export (ONNX + OpenVINO IR, fp32, with the UNet's streamed parts)",
                     ("{tool:sd-export}", "--backend", "all", "{src}", "{out}")),
    # OpenVINO only, the plain and the token-merged UNet (24 GB of disk): no deep-cache parts, no tiny VAE.
    "leansd-tome": Export("leansd-tome", "leansd sd-export, OpenVINO IR only, fp32, with token-merged UNet graphs",
                          ("{tool:sd-export}", "{src}", "{out}", "--backend", "openvino", "--token-merging", "0.5", "--quiet")),
}


def exports_for(pipeline: str | None) -> dict[str, Export]:
    """The export commands for a model config's `pipeline` ("sdxl", or None for SD 1.x/2.x)."""
    return {**EXPORTS, **SDXL_EXPORTS} if pipeline == "sdxl" else EXPORTS


@dataclass(frozen=True)
class Peer:
    name: str
    label: str
    kind: str  # leansd | diffusers | optimum-ort | optimum-ov
    export: str | None  # key in EXPORTS; None reads the diffusers source folder
    options: dict = field(default_factory=dict)
    slot: str | None = None  # reason this row is a placeholder
    needs_precision: str | None = None  # leansd: run only if the export wrote this precision for the UNet
    prime: bool = False  # run a short process first (fills a compile cache); measure the second one
    opt_in: str | None = None


LEANSD_ORT = {"backend": "onnxruntime", "precision": "fp32"}
LEANSD_OV = {"backend": "openvino", "precision": "fp32"}


def ort_int8(name: str, label: str, prime: bool = False, export_key: str = "leansd-ort-int8", **options) -> "Peer":
    """A leansd onnxruntime int8 row on an ONNX-only int8 export (`export_key`), with extra runtime options."""
    return Peer(name, label, "leansd", export_key, {"backend": "onnxruntime", "precision": "int8", **options},
                needs_precision="int8", prime=prime)

PEERS = [
    Peer("diffusers-pt-fp32", "diffusers PyTorch fp32", "diffusers", None),
    Peer("optimum-ort-fp32", "Optimum ONNX Runtime fp32", "optimum-ort", "optimum-onnx"),
    # No precision option set: OpenVINO's default, which is bf16 arithmetic on CPUs with native bf16 (AVX512_BF16, AMX).
    Peer("optimum-ov-fp32", "Optimum Intel OpenVINO fp32 files, default precision (bf16 on bf16 CPUs), static", "optimum-ov",
         "optimum-ov-fp32", {"static": True}),
    # The exact configuration: fp32 arithmetic asked for (`ov_config={"INFERENCE_PRECISION_HINT": "f32"}`).
    Peer("optimum-ov-fp32-f32", "Optimum Intel OpenVINO fp32, f32 precision hint (exact), static", "optimum-ov", "optimum-ov-fp32",
         {"static": True, "inference_precision": "f32"}),
    # Unguided runs (LCM, SD-Turbo): Optimum Intel's static reshape always sizes the UNet for guidance (batch 2), so these
    # runs use its default dynamic shapes.
    Peer("optimum-ov-fp32-dynamic", "Optimum Intel OpenVINO fp32 files, default precision (bf16 on bf16 CPUs), dynamic shapes",
         "optimum-ov", "optimum-ov-fp32", {"static": False}),
    Peer("optimum-ov-fp32-f32-dynamic", "Optimum Intel OpenVINO fp32, f32 precision hint (exact), dynamic shapes", "optimum-ov",
         "optimum-ov-fp32", {"static": False, "inference_precision": "f32"}),
    Peer("optimum-ov-int8", "Optimum Intel OpenVINO int8 weight-only, default precision, static", "optimum-ov", "optimum-ov-int8",
         {"static": True}),
    # What the int8 row computes on CPUs without bf16 (the f32 hint is OpenVINO's default there): for ISA-capped runs.
    Peer("optimum-ov-int8-f32", "Optimum Intel OpenVINO int8 weight-only, f32 precision hint, static", "optimum-ov", "optimum-ov-int8",
         {"static": True, "inference_precision": "f32"}),
    # Optimum Intel as its documentation's defaults leave it: `optimum-cli export openvino` without options (for a UNet of
    # 1 B parameters or more, int8 weight-only), OpenVINO's default precision; static for guided runs, dynamic for unguided.
    Peer("optimum-ov", "Optimum Intel OpenVINO, default export and precision, static", "optimum-ov", "optimum-ov", {"static": True}),
    Peer("optimum-ov-dynamic", "Optimum Intel OpenVINO, default export and precision, dynamic shapes", "optimum-ov", "optimum-ov",
         {"static": False}),
    Peer("optimum-ov-fp32-cached", "Optimum Intel OpenVINO fp32, static, compile cache warm (2nd process)", "optimum-ov",
         "optimum-ov-fp32", {"static": True, "cache_dir": "@fresh"}, prime=True),
    Peer(
        "optimum-ov-hybrid",
        "Optimum Intel OpenVINO hybrid int8 (NNCF), static",
        "optimum-ov",
        "optimum-ov-hybrid",
        {"static": True},
        opt_in="--hybrid",
    ),
    Peer("optimum-ov-hybrid-cached", "Optimum Intel OpenVINO hybrid int8 (NNCF), static, compile cache warm (2nd process)",
         "optimum-ov", "optimum-ov-hybrid", {"static": True, "cache_dir": "@fresh"}, prime=True, opt_in="--hybrid"),
    Peer("leansd-ort-fp32", "leansd onnxruntime fp32", "leansd", "leansd", LEANSD_ORT),
    Peer("leansd-ov-fp32", "leansd openvino fp32", "leansd", "leansd", LEANSD_OV),
    Peer("leansd-ort-fp32-lowmem", "leansd onnxruntime fp32, low_memory", "leansd", "leansd", {**LEANSD_ORT, "low_memory": True}),
    Peer("leansd-ov-fp32-lowmem", "leansd openvino fp32, low_memory", "leansd", "leansd", {**LEANSD_OV, "low_memory": True}),
    # int8 added to the plain export in place (`python -m leansd.export.int8 FOLDER --backend onnx|openvino`).
    Peer("leansd-ort-int8-lowmem-inplace", "leansd onnxruntime int8, low_memory (int8 added in place)", "leansd", "leansd",
         {"backend": "onnxruntime", "precision": "int8", "low_memory": True}, needs_precision="int8"),
    Peer("leansd-ov-int8-inplace", "leansd openvino int8 (hybrid UNet, int8 weights elsewhere; int8 added in place)", "leansd",
         "leansd", {"backend": "openvino", "precision": "int8"}, needs_precision="int8"),
    # The fast mode on OpenVINO's int8 files: the deep-cache parts carry int8 weights (float arithmetic: bf16 where native).
    Peer("leansd-ov-int8-fast-dc5-inplace", "leansd openvino int8 (int8-weight deep-cache parts), guidance cutoff 0.3, deep cache "
         "every 5 unguided steps, tiny VAE decoder (int8 added in place)", "leansd", "leansd",
         {**LEANSD_OV, "precision": "int8", "guidance_cutoff": 0.3, "deep_cache": 5, "tiny_vae": True}, needs_precision="int8"),
    Peer("leansd-ov-int8-fast02-dc5-inplace", "leansd openvino int8 (int8-weight deep-cache parts), guidance cutoff 0.2, deep cache "
         "every 5 unguided steps, tiny VAE decoder (int8 added in place)", "leansd", "leansd",
         {**LEANSD_OV, "precision": "int8", "guidance_cutoff": 0.2, "deep_cache": 5, "tiny_vae": True}, needs_precision="int8"),
    Peer("leansd-ov-int8-fast02-dc5-inplace-lowmem", "leansd openvino int8 (int8-weight deep-cache parts), guidance cutoff 0.2, "
         "deep cache every 5 unguided steps, tiny VAE decoder, low_memory (int8 added in place)", "leansd", "leansd",
         {**LEANSD_OV, "precision": "int8", "guidance_cutoff": 0.2, "deep_cache": 5, "tiny_vae": True, "low_memory": True},
         needs_precision="int8"),
    Peer(
        "leansd-ov-fp32-cached",
        "leansd openvino fp32, compile cache warm (2nd process)",
        "leansd",
        "leansd",
        {**LEANSD_OV, "cache_dir": "@fresh"},
        prime=True,
    ),
    # int8 rows read a separate export (sd-export --precision fp32,int8), so an int8 failure leaves the fp32 rows intact.
    Peer(
        "leansd-ov-int8",
        "leansd openvino int8 (hybrid UNet, int8 weights elsewhere)",
        "leansd",
        "leansd-int8",
        {"backend": "openvino", "precision": "int8"},
        needs_precision="int8",
    ),
    ort_int8("leansd-ort-int8", "leansd onnxruntime int8 (dynamic)"),
    ort_int8("leansd-ort-int8-lowmem", "leansd onnxruntime int8 (dynamic), low_memory", low_memory=True),
    # Guidance stops after 30 % of the steps (the rest run the UNet on the prompt alone, at batch 1); in the "fast"
    # rows the unguided steps also reuse the deep features, refreshed every 3 or 5 steps. All keep the bundled
    # model's evaluator at 100 % (models/shapes/README.md).
    ort_int8("leansd-ort-int8-cutoff", "leansd onnxruntime int8, guidance cutoff 0.3", guidance_cutoff=0.3),
    ort_int8("leansd-ort-int8-fast", "leansd onnxruntime int8, guidance cutoff 0.3, deep cache every 3 unguided steps",
             guidance_cutoff=0.3, deep_cache=3),
    ort_int8("leansd-ort-int8-fast-dc5", "leansd onnxruntime int8, guidance cutoff 0.3, deep cache every 5 unguided steps",
             guidance_cutoff=0.3, deep_cache=5),
    ort_int8("leansd-ort-int8-fast-dc5-cached",
             "leansd onnxruntime int8, guidance cutoff 0.3, deep cache every 5 unguided steps, optimized-graph cache warm (2nd process)",
             prime=True, guidance_cutoff=0.3, deep_cache=5, cache_dir="@fresh"),
    ort_int8("leansd-ort-int8-fast-dc5-lowmem", "leansd onnxruntime int8, guidance cutoff 0.3, deep cache every 5 unguided steps, low_memory",
             guidance_cutoff=0.3, deep_cache=5, low_memory=True),
    ort_int8("leansd-ort-int8-fast-lowmem", "leansd onnxruntime int8, guidance cutoff 0.3, deep cache every 3 unguided steps, low_memory",
             guidance_cutoff=0.3, deep_cache=3, low_memory=True),
    # The static export's own fp32 files: the exact reference for its int8 rows, without a second export.
    Peer("leansd-ort-fp32-static-export", "leansd onnxruntime fp32 (the static int8 export's fp32 files)", "leansd",
         "leansd-ort-int8-static", LEANSD_ORT),
    # The static QDQ int8 UNet (`--int8-unet-onnx static`): its convolutions run int8 too, which pays on VNNI/AMX CPUs.
    ort_int8("leansd-ort-int8-static", "leansd onnxruntime int8 (static QDQ UNet)", export_key="leansd-ort-int8-static"),
    ort_int8("leansd-ort-int8-static-fast-dc5",
             "leansd onnxruntime int8 (static QDQ UNet), guidance cutoff 0.3, deep cache every 5 unguided steps",
             export_key="leansd-ort-int8-static", guidance_cutoff=0.3, deep_cache=5),
    ort_int8("leansd-ort-int8-static-fast-dc5-lowmem",
             "leansd onnxruntime int8 (static QDQ UNet), guidance cutoff 0.3, deep cache every 5 unguided steps, low_memory",
             export_key="leansd-ort-int8-static", guidance_cutoff=0.3, deep_cache=5, low_memory=True),
    ort_int8("leansd-ort-int8-static-fast-dc5-tinyvae",
             "leansd onnxruntime int8 (static QDQ UNet), guidance cutoff 0.3, deep cache every 5 unguided steps, tiny VAE decoder",
             export_key="leansd-ort-int8-static", guidance_cutoff=0.3, deep_cache=5, tiny_vae=True),
    # Feature reuse: the deep UNet features refreshed every 3 steps (DeepCache's usual setting).
    Peer("leansd-ov-fp32-deepcache3", "leansd openvino fp32, deep cache every 3 steps", "leansd", "leansd", {**LEANSD_OV, "deep_cache": 3}),
    Peer("leansd-ort-fp32-deepcache3", "leansd onnxruntime fp32, deep cache every 3 steps", "leansd", "leansd", {**LEANSD_ORT, "deep_cache": 3}),
    # A tiny VAE decoder (TAESD architecture, random weights like the rest) instead of the KL decoder.
    # bfloat16 on CPUs with native bf16 (AVX512_BF16, AMX): the fp32 files compiled with a bf16 hint.
    Peer("leansd-ov-bf16", "leansd openvino bf16", "leansd", "leansd", {**LEANSD_OV, "precision": "bf16"}),
    Peer("leansd-ov-bf16-fast", "leansd openvino bf16, guidance cutoff 0.3, deep cache every 3 unguided steps, tiny VAE decoder",
         "leansd", "leansd", {**LEANSD_OV, "precision": "bf16", "guidance_cutoff": 0.3, "deep_cache": 3, "tiny_vae": True}),
    Peer("leansd-ov-bf16-tinyvae", "leansd openvino bf16, tiny VAE decoder", "leansd", "leansd",
         {**LEANSD_OV, "precision": "bf16", "tiny_vae": True}),
    Peer("leansd-ov-bf16-fast-dc5", "leansd openvino bf16, guidance cutoff 0.3, deep cache every 5 unguided steps, tiny VAE decoder",
         "leansd", "leansd", {**LEANSD_OV, "precision": "bf16", "guidance_cutoff": 0.3, "deep_cache": 5, "tiny_vae": True}),
    Peer("leansd-ov-bf16-fast-cached",
         "leansd openvino bf16, guidance cutoff 0.3, deep cache every 3 unguided steps, tiny VAE decoder, compile cache warm (2nd process)",
         "leansd", "leansd", {**LEANSD_OV, "precision": "bf16", "guidance_cutoff": 0.3, "deep_cache": 3, "tiny_vae": True,
                              "cache_dir": "@fresh"}, prime=True),
    Peer("leansd-ov-bf16-fast-dc5-cached",
         "leansd openvino bf16, guidance cutoff 0.3, deep cache every 5 unguided steps, tiny VAE decoder, compile cache warm (2nd process)",
         "leansd", "leansd", {**LEANSD_OV, "precision": "bf16", "guidance_cutoff": 0.3, "deep_cache": 5, "tiny_vae": True,
                              "cache_dir": "@fresh"}, prime=True),
    # Token merging (ToMe, ratio 0.5) in the top-resolution self-attentions: an approximate mode with its own gate.
    Peer("leansd-ov-bf16-tome", "leansd openvino bf16, token merging 0.5", "leansd", "leansd-tome",
         {**LEANSD_OV, "precision": "bf16", "token_merging": True}),
    Peer("leansd-ov-bf16-tome-off", "leansd openvino bf16 (the token-merging export, merging off)", "leansd", "leansd-tome",
         {**LEANSD_OV, "precision": "bf16"}),
    Peer("leansd-ov-bf16-tinyvae-tome", "leansd openvino bf16, tiny VAE decoder, token merging 0.5", "leansd", "leansd-tome",
         {**LEANSD_OV, "precision": "bf16", "tiny_vae": True, "token_merging": True}),
    Peer("leansd-ov-bf16-fast-dc5-tome",
         "leansd openvino bf16, guidance cutoff 0.3, deep cache every 5 unguided steps, tiny VAE decoder, token merging 0.5",
         "leansd", "leansd-tome", {**LEANSD_OV, "precision": "bf16", "guidance_cutoff": 0.3, "deep_cache": 5, "tiny_vae": True,
                                   "token_merging": True}),
    # Guidance for the first 20 % of the steps only (the bundled model's evaluator keeps 336 of 336 images right with it).
    Peer("leansd-ov-bf16-fast02-dc5", "leansd openvino bf16, guidance cutoff 0.2, deep cache every 5 unguided steps, tiny VAE decoder",
         "leansd", "leansd", {**LEANSD_OV, "precision": "bf16", "guidance_cutoff": 0.2, "deep_cache": 5, "tiny_vae": True}),
    Peer("leansd-ov-bf16-fast02-dc5-tome",
         "leansd openvino bf16, guidance cutoff 0.2, deep cache every 5 unguided steps, tiny VAE decoder, token merging 0.5",
         "leansd", "leansd-tome", {**LEANSD_OV, "precision": "bf16", "guidance_cutoff": 0.2, "deep_cache": 5, "tiny_vae": True,
                                   "token_merging": True}),
    Peer("leansd-ov-bf16-fast-dc5-tome-cached",
         "leansd openvino bf16, guidance cutoff 0.3, deep cache every 5 unguided steps, tiny VAE decoder, token merging 0.5, "
         "compile cache warm (2nd process)", "leansd", "leansd-tome",
         {**LEANSD_OV, "precision": "bf16", "guidance_cutoff": 0.3, "deep_cache": 5, "tiny_vae": True, "token_merging": True,
          "cache_dir": "@fresh"}, prime=True),
    # precision="auto" with no backend named: what a user gets who asks for the fastest safe precision.
    Peer("leansd-auto", "leansd precision auto (backend chosen by it)", "leansd", "leansd", {"backend": None, "precision": "auto"}),
    Peer("leansd-ov-fp32-tinyvae", "leansd openvino fp32, tiny VAE decoder", "leansd", "leansd", {**LEANSD_OV, "tiny_vae": True}),
    Peer("leansd-ov-fp32-deepcache3-tinyvae", "leansd openvino fp32, deep cache every 3 steps, tiny VAE decoder", "leansd", "leansd",
         {**LEANSD_OV, "deep_cache": 3, "tiny_vae": True}),
    # The plain rows on the OpenVINO-only export (SDXL: the two-backend export takes 26 GB of disk).
    Peer("leansd-ov-fp32-ir", "leansd openvino fp32 (OpenVINO-only export)", "leansd", "leansd-ov", LEANSD_OV),
    Peer("leansd-ov-bf16-ir", "leansd openvino bf16 (OpenVINO-only export)", "leansd", "leansd-ov", {**LEANSD_OV, "precision": "bf16"}),
    # The OpenVINO-only export with the tiny VAE decoder (LCM-distilled models, perf/configs/lcm-distilled.json).
    Peer("leansd-ov-fp32-ir-tinyvae-export", "leansd openvino fp32 (OpenVINO-only export with a tiny VAE decoder, run with the full one)",
         "leansd", "leansd-ov-tinyvae", LEANSD_OV),
    Peer("leansd-ov-bf16-ir-tinyvae", "leansd openvino bf16, tiny VAE decoder (OpenVINO-only export)", "leansd", "leansd-ov-tinyvae",
         {**LEANSD_OV, "precision": "bf16", "tiny_vae": True}),
    # int8 added in place to the OpenVINO-only export (`python -m leansd.export.int8 FOLDER --backend openvino --size 512`):
    # on SDXL "auto" makes the UNet weights-only int8, like Optimum Intel's default export; float work as the runtime runs it.
    Peer("leansd-ov-int8-ir", "leansd openvino int8 (OpenVINO-only export, int8 added in place)", "leansd", "leansd-ov",
         {**LEANSD_OV, "precision": "int8"}, needs_precision="int8"),
    Peer("leansd-ov-int8-ir-lowmem", "leansd openvino int8, low_memory (OpenVINO-only export, int8 added in place)", "leansd",
         "leansd-ov", {**LEANSD_OV, "precision": "int8", "low_memory": True}, needs_precision="int8"),
    # The fast modes without bf16: what a CPU without native bf16 runs (measured on one, or with --cap-isa AVX2).
    Peer("leansd-ov-fp32-fast-dc5", "leansd openvino fp32, guidance cutoff 0.3, deep cache every 5 unguided steps, tiny VAE decoder",
         "leansd", "leansd", {**LEANSD_OV, "guidance_cutoff": 0.3, "deep_cache": 5, "tiny_vae": True}),
    Peer("leansd-ov-fp32-fast02-dc5-tome",
         "leansd openvino fp32, guidance cutoff 0.2, deep cache every 5 unguided steps, tiny VAE decoder, token merging 0.5",
         "leansd", "leansd-tome", {**LEANSD_OV, "guidance_cutoff": 0.2, "deep_cache": 5, "tiny_vae": True, "token_merging": True}),
    Peer("leansd-ov-fp32-fast02-dc5-tome-lowmem",
         "leansd openvino fp32, guidance cutoff 0.2, deep cache every 5 unguided steps, tiny VAE decoder, token merging 0.5, low_memory",
         "leansd", "leansd-tome", {**LEANSD_OV, "guidance_cutoff": 0.2, "deep_cache": 5, "tiny_vae": True, "token_merging": True,
                                   "low_memory": True}),
]


def peer_by_name(name: str) -> Peer:
    for peer in PEERS:
        if peer.name == name:
            return peer
    raise KeyError(name)
