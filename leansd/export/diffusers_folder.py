"""A diffusers folder as the exporter sees it: the `Source` record every kind of source becomes, and the
checks that a folder holds a Stable Diffusion 1.x/2.x pipeline. Shared by `sources` and `singlefile`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from leansd.export.errors import ExportError

# What model_index.json must name for a Stable Diffusion 1.x/2.x pipeline.
EXPECTED = {
    "unet": {"UNet2DConditionModel"},
    "vae": {"AutoencoderKL"},
    "text_encoder": {"CLIPTextModel"},
    "tokenizer": {"CLIPTokenizer", "CLIPTokenizerFast"},
    "scheduler": None,  # any diffusers scheduler
}
REQUIRED_FILES = (
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "scheduler/scheduler_config.json",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
)

@dataclass
class Source:
    """A checked model source: a diffusers-layout folder of configs plus a loader of PyTorch modules."""

    spec: str
    kind: str  # "folder", "hub" or "single_file"
    config_dir: Path
    _loader: Callable[[str], Any] = field(repr=False)
    _cleanup: Callable[[], None] | None = field(default=None, repr=False)

    def config(self, name: str) -> dict[str, Any]:
        """A component's config.json (`unet`, `vae`, `text_encoder`) or the scheduler's config."""
        file = "scheduler/scheduler_config.json" if name == "scheduler" else f"{name}/config.json"
        return read_json(self.config_dir / file)

    def model_index(self) -> dict[str, Any]:
        return read_json(self.config_dir / "model_index.json")

    def load(self, name: str) -> Any:
        """The float32 PyTorch module `unet`, `vae` or `text_encoder`, in eval mode. The caller owns it."""
        return self._loader(name).float().eval()

    def close(self) -> None:
        if self._cleanup is not None:
            self._cleanup()
            self._cleanup = None


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot read '{path}' ({exc.__class__.__name__}); the model folder is incomplete or damaged") from None


def check_folder(path: Path) -> None:
    """Raise unless `path` holds the configs of a Stable Diffusion 1.x/2.x diffusers pipeline."""
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise ExportError(f"'{path}' has no model_index.json, so it is not a diffusers model folder; pass a Stable Diffusion folder or checkpoint file")
    index = read_json(index_file)
    if index.get("text_encoder_2", [None])[0] is not None or index.get("transformer", [None])[0] is not None:
        raise ExportError(f"'{path}' is a {index.get('_class_name', 'diffusers')} model; sd-export supports Stable Diffusion 1.x/2.x (UNet + one CLIP text encoder)")
    for name, classes in EXPECTED.items():
        entry = index.get(name) or [None, None]
        if entry[0] is None or (classes is not None and entry[1] not in classes):
            found = entry[1] or "nothing"
            raise ExportError(
                f"'{path}' is not a Stable Diffusion 1.x/2.x model: its '{name}' is {found}"
                f"{'' if classes is None else ' (expected ' + ' or '.join(sorted(classes)) + ')'}; pass a StableDiffusionPipeline folder"
            )
    missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
    if missing:
        raise ExportError(f"'{path}' lacks {', '.join(missing)}; the diffusers folder is incomplete (re-save it with save_pretrained)")
