"""Where the model comes from: a diffusers folder, a Hugging Face Hub id, or a single-file checkpoint.

`resolve_source` checks the input cheaply (configs only, no weights) and returns a `Source`, whose
`load(name)` hands out one PyTorch module at a time so the caller can free it before the next.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

from leansd.export.diffusers_folder import EXPECTED, REQUIRED_FILES, Source, check_folder, read_json  # noqa: F401
from leansd.export.errors import ExportError

CHECKPOINT_SUFFIXES = (".ckpt", ".safetensors", ".pt", ".pth")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_source(spec: str | os.PathLike[str], *, single_file_config: str | os.PathLike[str] | None = None,
                   prediction_type: str | None = None, image_size: int | None = None) -> Source:
    """Check `spec` and return a `Source`; raise `ExportError` naming the problem and the fix.

    `single_file_config` is the diffusers-layout config folder used to convert a single-file checkpoint
    (default: the SD 1.x or SD 2.x configs shipped in `leansd/export/configs/`); `prediction_type` and `image_size`
    override a single file's variant (see `leansd.export.checkpoint_variant`).
    """
    text = os.fspath(spec)
    path = Path(text).expanduser()
    if (prediction_type is not None or image_size is not None) and not (path.is_file() and path.suffix.lower() in CHECKPOINT_SUFFIXES):
        raise ExportError(f"--prediction-type and --image-size apply to single-file checkpoints; for '{text}' edit its "
                          "scheduler_config.json (prediction_type) or unet/config.json (sample_size) instead")
    if path.is_dir():
        return folder_source(path.absolute(), spec=str(path.absolute()), kind="folder")
    if path.is_file():
        if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
            raise ExportError(
                f"'{text}' is a '{path.suffix}' file; pass a diffusers folder or an SD 1.x/2.x single-file checkpoint (.ckpt or .safetensors)"
            )
        from leansd.export.singlefile import single_file_source

        return single_file_source(path.absolute(), config=single_file_config, prediction_type=prediction_type, image_size=image_size)
    if _HUB_ID.match(text) and not text.startswith((".", "~")):
        return hub_source(text)
    raise ExportError(f"source '{text}' not found; pass an existing diffusers folder, a .ckpt/.safetensors file, or a Hub id (online only)")


def folder_source(path: Path, *, spec: str, kind: str) -> Source:
    """A diffusers folder: configs read in place, each module loaded from its subfolder on request."""
    check_folder(path)

    def load(name: str) -> Any:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        cls = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
               "text_encoder_2": CLIPTextModelWithProjection}[name]
        try:
            return cls.from_pretrained(path, subfolder=name)  # Source.load casts to float32
        except (OSError, ValueError, RuntimeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
            raise ExportError(f"cannot load '{name}' from '{path}': {first}; check that the folder has its weights") from None

    return Source(spec=spec, kind=kind, config_dir=path, _loader=load)


def hub_source(repo_id: str) -> Source:
    """The configs of a Hub repo, checked before any weights are fetched; then its fp32 weights (each from the local
    cache when it is there, else downloaded)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - a dependency of diffusers
        raise ExportError(f"'{repo_id}' is not a local folder and huggingface_hub is missing; pass a local diffusers folder") from None
    patterns = ["model_index.json", "*/config.json", "scheduler/*.json", "tokenizer/*"]
    weights = ["unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"]
    configs = ["model_index.json", *REQUIRED_FILES]

    def snapshot(allow: list[str], wanted: list[str]) -> Path:
        """The repo's files matching `allow`: the cached copy when it has all of `wanted`, else a download."""
        try:
            folder = Path(snapshot_download(repo_id, allow_patterns=allow, local_files_only=True))
            if all((folder / w).is_file() for w in wanted):
                return folder
        except Exception:  # noqa: BLE001, S110 - not cached (or not all of it): download
            pass
        try:
            return Path(snapshot_download(repo_id, allow_patterns=allow, local_files_only=False))
        except Exception as exc:  # noqa: BLE001 - offline, unknown repo, gated repo, network: one message
            reason = "no network access" if _is_offline(exc) else exc.__class__.__name__
            raise ExportError(
                f"cannot download '{repo_id}' from the Hugging Face Hub ({reason}); pass a local diffusers folder or a .ckpt/.safetensors file instead"
            ) from None

    check_folder(snapshot(patterns, configs))  # an unsupported kind of model is refused before gigabytes of weights
    folder = snapshot(patterns + weights, weights)
    if not all((folder / w).is_file() for w in weights):
        raise ExportError(f"'{repo_id}' on the Hub has no fp32 safetensors weights for unet, vae and text_encoder; download it with diffusers and pass the folder")
    return folder_source(folder, spec=repo_id, kind="hub")


def _is_offline(exc: BaseException) -> bool:
    name = exc.__class__.__name__
    return "Offline" in name or "Connection" in name or "LocalEntryNotFound" in name or "Timeout" in name


def copy_assets(source: Source, out: Path) -> None:
    """Copy the scheduler and tokenizer files verbatim.

    Verbatim, not re-saved: re-saving fills in defaults the original file left out, and diffusers treats a
    missing key differently from a present default when another scheduler class is built from the config.
    """
    shutil.copytree(source.config_dir / "scheduler", out / "scheduler", ignore=shutil.ignore_patterns("*.py"))
    if (source.config_dir / "low_res_scheduler").is_dir():  # the x4 upscaler's, which noises its low-resolution input
        shutil.copytree(source.config_dir / "low_res_scheduler", out / "low_res_scheduler", ignore=shutil.ignore_patterns("*.py"))
    for tokenizer in ("tokenizer", "tokenizer_2"):  # SDXL has two; its refiner only the second
        if not (source.config_dir / tokenizer).is_dir():
            continue
        (out / tokenizer).mkdir(parents=True, exist_ok=True)
        for file in sorted((source.config_dir / tokenizer).iterdir()):
            if file.is_file():
                shutil.copyfile(file, out / tokenizer / file.name)


def optimum_model_index(source: Source) -> dict[str, Any]:
    """model_index.json as Optimum writes it for its exports: the pipeline's own index, pointing at the source.

    Optimum keeps diffusers' class names (its ONNX Runtime and OpenVINO pipelines map `_class_name` to their
    own classes) and records `_name_or_path`. Components this export does not write (safety checker, feature
    extractor, image encoder) are set to null so that loaders do not look for them.
    """
    import diffusers

    index = dict(source.model_index())
    index["_diffusers_version"] = diffusers.__version__
    index["_name_or_path"] = source.spec
    for name in ("safety_checker", "feature_extractor", "image_encoder"):
        index[name] = [None, None]
    if "depth_estimator" in index:  # exported when the source has it, listed in leansd.json (Optimum's loaders skip it)
        index["depth_estimator"] = [None, None]
    index["requires_safety_checker"] = False
    return dict(sorted(index.items()))
