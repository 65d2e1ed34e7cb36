"""The model folders a server serves: each loaded once with `leansd.load` and shared by every request.

A model is named by its folder's name; AUTOMATIC1111 clients may also use its title ("name [hash]") or the
name in its leansd.json. The first folder is the default, and AUTOMATIC1111's `sd_model_checkpoint` option
switches which one its requests use.
"""
from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from leansd.runtime.errors import ModelFolderError
from leansd.server.errors import RequestError

if TYPE_CHECKING:
    from leansd.runtime.pipeline import Pipeline


@dataclass
class ServedModel:
    """One loaded model folder."""

    name: str
    pipe: "Pipeline"
    fingerprint: str  # sha256 hex of the folder's weights' hashes (or of its configs), A1111's `sha256`
    default_size: tuple[int, int] = field(init=False)  # (height, width)

    def __post_init__(self) -> None:
        self.default_size = self.pipe.default_size()

    @property
    def title(self) -> str:
        """AUTOMATIC1111's checkpoint title: name and short hash."""
        return f"{self.name} [{self.fingerprint[:10]}]"

    @property
    def tiny_vae(self) -> bool:
        return self.pipe.models.tiny_vae_decoder is not None

    @property
    def inpainting(self) -> bool:
        """An inpainting UNet (latents, mask and masked-image latents in): it needs an image and a mask."""
        latent = self.pipe.models.vae_decoder.latent_channels
        return self.pipe.unet.in_channels == 2 * latent + 1

    @property
    def sampler_label(self) -> str:
        """AUTOMATIC1111's name for the folder's own scheduler (what a request naming no sampler gets)."""
        from leansd.runtime.outputs import SAMPLER_LABELS

        name = str(self.pipe.bundle.scheduler_config.get("_class_name"))
        return SAMPLER_LABELS.get(name, name)

    def describe(self, default: bool) -> dict[str, Any]:
        height, width = self.default_size
        defaults, own = self.pipe.bundle.defaults(), self.pipe.defaults
        return {"name": self.name, "default": default, "width": width, "height": height,
                "steps": int(own.num_inference_steps or defaults.get("num_inference_steps", 50)),
                "guidance_scale": float(own.guidance_scale if own.guidance_scale is not None else defaults.get("guidance_scale", 7.5)),
                "sampler": self.sampler_label, "tiny_vae": self.tiny_vae, "inpainting": self.inpainting,
                "aliases": self.aliases}

    @property
    def aliases(self) -> list[str]:
        """Other names requests may use for this model: its leansd.json name (the infotext's `Model:`), its
        AUTOMATIC1111 title and short hash."""
        return list(dict.fromkeys(a for a in (self.pipe.bundle.name, self.title, self.fingerprint[:10]) if a != self.name))


def fingerprint(root: Path) -> str:
    """A stable hash of a model folder without reading gigabytes: the weights' sha256s listed in leansd.json,
    else the folder's config files."""
    digest = hashlib.sha256()
    manifest = root / "leansd.json"
    if manifest.is_file():
        files = json.loads(manifest.read_text(encoding="utf-8")).get("files") or {}
        digest.update(json.dumps(files, sort_keys=True).encode())
    else:
        for config in sorted(root.glob("*/*.json")) + sorted(root.glob("*.json")):
            digest.update(config.relative_to(root).as_posix().encode() + b"\0" + config.read_bytes())
    return digest.hexdigest()


class ModelRegistry:
    """The served models by name, and the one AUTOMATIC1111 requests use when they name none."""

    def __init__(self, models: list[ServedModel]):
        if not models:
            raise ValueError("a server needs at least one model")
        self.models = {m.name: m for m in models}
        self.default_name = models[0].name
        self._current = models[0].name
        self._lock = threading.Lock()

    @classmethod
    def load(cls, folders: list[Path | None], **load_options: Any) -> "ModelRegistry":
        """Load each folder (None: the bundled model); folder names must differ."""
        import leansd
        from leansd.runtime.loader import bundled_model_path

        models: list[ServedModel] = []
        for folder in folders:
            root = Path(folder).expanduser().resolve() if folder is not None else bundled_model_path()
            name = root.name
            if any(m.name == name for m in models):
                raise ModelFolderError(f"two model folders are named {name!r}; requests pick a model by its folder name, "
                                       "so give each a different name")
            pipe = leansd.load(root if folder is not None else None, **load_options)
            models.append(ServedModel(name, pipe, fingerprint(root)))
        return cls(models)

    @property
    def current(self) -> ServedModel:
        """The model AUTOMATIC1111 requests use (its `sd_model_checkpoint` option)."""
        with self._lock:
            return self.models[self._current]

    def switch(self, name: str, field: str = "sd_model_checkpoint") -> ServedModel:
        model = self.get(name, field)
        with self._lock:
            self._current = model.name
        return model

    def get(self, name: str | None, field: str = "model") -> ServedModel:
        """The model called `name` (its folder name, title or leansd.json name; case-insensitive); None: the default."""
        if name is None or name == "":
            return self.models[self.default_name]
        wanted = name.strip().lower()
        for model in self.models.values():  # the folder name first: another model's alias never shadows it
            if wanted == model.name.lower():
                return model
        for model in self.models.values():
            if wanted in (alias.lower() for alias in model.aliases):
                return model
        raise RequestError(f"no model named {name!r:.80}; the models are: {', '.join(self.models)}", field, 404)

    def close(self) -> None:
        for model in self.models.values():
            model.pipe.close()
