"""The adapters a pipeline runs with, and switching between LoRA sets by re-opening models with patched weights.

Textual-inversion embeddings are fixed at load: their vectors become new rows of the text encoder's token table.
LoRAs can change from call to call. A call names the LoRAs it wants (`loras=`, prompt tags); when that set
differs from the one applied, the weights it changes are recomputed in numpy (the file's value, read at the
offset `weight_map.json` gives, plus each LoRA's low-rank product) and the affected models are re-opened with
them (ONNX Runtime: replaced initializers; OpenVINO: replaced constants, then a new compile). Calls that want
the applied set run side by side; a call that wants another set waits until they are done.
"""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from leansd.runtime import manifest as names
from leansd.runtime.adapters.embeddings import Embedding, read_embedding_parts
from leansd.runtime.adapters.lora import LoraFile, read_lora
from leansd.runtime.adapters.tags import LoraRequest
from leansd.runtime.adapters.weight_map import MAP_FILE, GraphWeights
from leansd.runtime.backends.session import LazySession
from leansd.runtime.errors import InvalidInputError, ModelFolderError

TOKEN_TABLE = "text_model.embeddings.token_embedding.weight"
# Which graphs a LoRA's layers for a model part are applied to.
TARGETS = {"unet": (names.UNET, names.UNET_DEEP, names.UNET_SHALLOW), "text_encoder": (names.TEXT_ENCODER,),
           "text_encoder_2": (names.TEXT_ENCODER_2,)}
# Which text encoder an SDXL embedding file's tensor is for.
_SDXL_PARTS = {"clip_l": names.TEXT_ENCODER, "clip_g": names.TEXT_ENCODER_2}


@dataclass(frozen=True)
class AppliedLora:
    """A LoRA a generation ran with: its name, AUTOMATIC1111 short hash, file and multipliers."""

    name: str
    hash: str
    path: Path
    te: float
    unet: float


class Adapters:
    """The LoRA files and embeddings of one pipeline and the weights they put in its models."""

    def __init__(self, folder: Path, graphs: Mapping[str, GraphWeights | None], weight_map_present: bool,
                 refusal: str | None = None, lora_dir: str | Path | None = None):
        self.folder = folder
        self._graphs = {c: g for c, g in graphs.items() if g is not None}
        self._has_map = weight_map_present
        self._refusal = refusal  # why this pipeline cannot patch weights (an int8 variant), or None
        self.lora_dir = Path(lora_dir).expanduser() if lora_dir is not None else None
        self.embeddings: list[Embedding] = []
        self._fixed: dict[str, dict[str, np.ndarray]] = {}  # component -> weights the embeddings set, PyTorch names
        self._sessions: dict[str, list[LazySession]] = {}
        self._files: dict[tuple, LoraFile] = {}
        self._overrides: dict[str, dict[str, np.ndarray]] = {}
        self._key: tuple = ()
        self._applied: list[AppliedLora] = []
        self._touched: set[str] = set()
        self._users = 0
        self._changed = threading.Condition()
        self.last_apply_s = 0.0

    # ------------------------------------------------------------ set up at load

    def weights(self, component: str):
        """What a session of `component` opens with (a `SessionOptions.weights` callable)."""
        return lambda: self._overrides.get(component, {})

    def register(self, component: str, session: LazySession | None) -> None:
        """A session to re-open when its component's weights change."""
        if session is not None:
            self._sessions.setdefault(component, []).append(session)

    def add_embeddings(self, specs: "Sequence[str | Path] | Mapping[str, str | Path]",
                       encoders: Sequence[tuple[str, Any, int]]) -> None:
        """Read embedding files, add their words to the tokenizers and their vectors to the text encoders' token
        tables. `encoders`: (component, tokenizer, hidden size) of each text encoder, in the model's order. An SDXL
        file's `clip_l` vectors go to `text_encoder`, its `clip_g` ones to `text_encoder_2`; a one-tensor file goes to
        the encoder of its width."""
        items = list(specs.items()) if isinstance(specs, Mapping) else [(None, p) for p in specs]
        if not items:
            return
        per_encoder: dict[str, list[Embedding]] = {c: [] for c, _, _ in encoders}
        reported: list[Embedding] = []
        for token, path in items:
            parts = read_embedding_parts(path, token)
            for part, embedding in parts.items():
                component = _encoder_for(part, embedding, encoders)
                if component is not None:
                    per_encoder[component].append(embedding)
            reported.append(next(iter(parts.values())))
        if not any(per_encoder.values()):
            raise InvalidInputError(f"embedding {reported[0].path.name} has no vectors for this model's text encoder(s)")
        for component, tokenizer, _ in encoders:
            embeddings = per_encoder[component]
            if embeddings:
                self._fixed[component] = {TOKEN_TABLE: self._grown_table(component, tokenizer, embeddings)}
        self.embeddings = reported
        self._overrides = self._build({})

    def _grown_table(self, component: str, tokenizer, embeddings: Sequence[Embedding]) -> np.ndarray:
        """The encoder's token table with the embeddings' vectors as new rows, in the layout the graph stores it."""
        seen = [e.token.lower() for e in embeddings]
        if len(set(seen)) != len(seen):
            raise InvalidInputError(f"two embeddings are named {next(t for t in seen if seen.count(t) > 1)!r}; give each its own token")
        graph = self._graph(component, "textual-inversion embeddings")
        if TOKEN_TABLE not in graph.weights:
            raise ModelFolderError(f"{self.folder / MAP_FILE} does not locate the {component}'s token table; re-export the model with sd-export")
        ids = tokenizer.add_words([e.tokens for e in embeddings])
        table = graph.base(TOKEN_TABLE)
        grown = np.zeros((max(table.shape[0], max(i for group in ids for i in group) + 1), table.shape[1]), np.float32)
        grown[: table.shape[0]] = table
        for e, group in zip(embeddings, ids):
            grown[group] = e.vectors
        # kept in the layout the graph stores it in, as every replacement weight is
        return grown.T if graph.weights[TOKEN_TABLE].transposed else grown

    # ------------------------------------------------------------ per call

    def resolve(self, loras: Mapping[str, float] | None, tags: Sequence[LoraRequest]) -> list[tuple[Path, str, float, float]]:
        """(file, name, text-encoder multiplier, UNet multiplier) for the call's `loras` setting and prompt tags; a tag
        names a file of `lora_dir` or one of `loras` by its name (without .safetensors), and overrides its multipliers."""
        wanted: dict[Path, tuple[str, float, float]] = {}
        given: dict[str, Path] = {}
        for key, scale in (loras or {}).items():
            path = self._find(str(key), given=None)
            wanted[path] = (path.stem, float(scale), float(scale))
            given[path.stem.lower()] = path
        for tag in tags:
            path = self._find(tag.name, given)
            wanted[path] = (tag.name, tag.te, tag.unet)
        return [(path, name, te, unet) for path, (name, te, unet) in wanted.items()]

    def _find(self, name: str, given: Mapping[str, Path] | None) -> Path:
        candidates = [Path(name).expanduser()]
        if given is not None and name.lower() in given:
            return given[name.lower()]
        if self.lora_dir is not None:
            candidates += [self.lora_dir / name, self.lora_dir / f"{name}.safetensors"]
        for path in candidates:
            if path.is_file():
                return path.resolve()
        where = f" in {self.lora_dir}" if self.lora_dir is not None else " (pass lora_dir= / sd-run --lora-dir to look up names)"
        raise InvalidInputError(f"LoRA {name!r} not found{where}; pass an existing .safetensors file or a name from the LoRA folder")

    @contextmanager
    def using(self, wanted: Sequence[tuple[Path, str, float, float]]) -> Iterator[list[AppliedLora]]:
        """Run with these LoRAs (waiting for calls that run with another set, then switching)."""
        active = [w for w in wanted if w[2] or w[3]]  # multiplier 0: as if absent
        if active and self._refusal:
            raise InvalidInputError(self._refusal)
        key = tuple(sorted((str(p), _stat(p), te, unet) for p, _, te, unet in active))
        if key and not self._has_map:
            raise ModelFolderError(f"{self.folder} was exported without a weight map ({MAP_FILE}), which run-time LoRA needs; "
                                   "re-export it with this version of sd-export, or fuse the LoRA at export: sd-export SRC OUT --lora FILE:SCALE")
        with self._changed:
            while self._users and key != self._key:
                self._changed.wait()
            if key != self._key:
                self._switch(key, active)
            self._users += 1
            applied = list(self._applied)
        try:
            yield applied
        finally:
            with self._changed:
                self._users -= 1
                self._changed.notify_all()

    def _switch(self, key: tuple, active: Sequence[tuple[Path, str, float, float]]) -> None:
        start = time.perf_counter()
        known = {part: list(self._graph(graphs[0], "LoRA").weights) for part, graphs in TARGETS.items()
                 if graphs[0] in self._graphs}
        changes: dict[str, dict[str, np.ndarray]] = {}
        applied = []
        for path, name, te, unet in active:
            lora = self._lora(path)
            for part, layers in lora.resolve(known).items():
                multiplier = unet if part == "unet" else te
                for component in TARGETS.get(part, ()):
                    graph = self._graphs.get(component)
                    for param, pair in layers.items() if graph is not None and multiplier else ():
                        if param not in graph.weights:
                            continue
                        current = changes.setdefault(component, {})
                        if param not in current:
                            current[param] = self._start(component, graph, param)
                        weight = current[param]
                        if pair.down.size * pair.up.shape[0] // pair.rank != weight.size:
                            raise InvalidInputError(f"LoRA {path.name}: layer {param} has {pair.up.shape[0]}x{pair.down[0].size} values here "
                                                    f"but {weight.shape} in this model; it was made for another model")
                        pair.add_to(weight, multiplier, graph.weights[param].transposed)
            applied.append(AppliedLora(name, lora.hash, path, te, unet))
        overrides = self._build(changes)
        touched = set(changes) | self._touched  # models whose weights differ between the old set and the new one
        reopen = [s for c in touched for s in self._sessions.get(c, ()) if s.loaded]
        for component in touched:
            for session in self._sessions.get(component, ()):
                session.close()
        self._overrides, self._key, self._applied, self._touched = overrides, key, applied, set(changes)
        for session in reopen:
            session.open()  # normal mode keeps models loaded: re-open now, so the time is the switch's
        self.last_apply_s = time.perf_counter() - start

    def _start(self, component: str, graph: GraphWeights, param: str) -> np.ndarray:
        """A new array holding the weight before LoRAs (the embeddings' table, else the file's), as the graph stores it."""
        fixed = self._fixed.get(component, {})
        return fixed[param].copy() if param in fixed else graph.stored(param)

    def _build(self, changes: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, dict[str, np.ndarray]]:
        """Graph-named replacement weights per component (graph layout): the embeddings' table, then the LoRA changes."""
        out = {}
        for component in set(self._fixed) | set(changes):
            values = {**self._fixed.get(component, {}), **changes.get(component, {})}
            out[component] = self._graphs[component].patched(values)
        return out

    def _lora(self, path: Path) -> LoraFile:
        key = (str(path), _stat(path))
        if key not in self._files:
            self._files = {k: v for k, v in self._files.items() if k[0] != str(path)}
            self._files[key] = read_lora(path)
        return self._files[key]

    def _graph(self, component: str, what: str) -> GraphWeights:
        if self._refusal:
            raise InvalidInputError(self._refusal)
        if not self._has_map:
            raise ModelFolderError(f"{self.folder} was exported without a weight map ({MAP_FILE}), which {what} need; "
                                   "re-export it with this version of sd-export")
        graph = self._graphs.get(component)
        if graph is None:
            raise ModelFolderError(f"{self.folder / MAP_FILE} does not cover the {component} this backend runs; re-export the model with sd-export")
        return graph


def _stat(path: Path) -> tuple[int, int]:
    """Size and modification time: a LoRA file replaced on disk is read again."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise InvalidInputError(f"cannot read LoRA {path} ({exc.strerror}); pass an existing .safetensors file") from None
    return st.st_size, st.st_mtime_ns


def _encoder_for(part: str | None, embedding: Embedding, encoders: Sequence[tuple[str, Any, int]]) -> str | None:
    """The text encoder an embedding's vectors go to (None: an SDXL file's part for an encoder the model lacks, such
    as clip_l on the refiner)."""
    width = embedding.vectors.shape[1]
    if part is not None:
        if all(c != names.TEXT_ENCODER_2 for c, _, _ in encoders):
            raise InvalidInputError(f"embedding {embedding.path.name} is for SDXL's two text encoders (clip_l, clip_g); this model has one")
        component = _SDXL_PARTS[part]
        match = [(c, h) for c, _, h in encoders if c == component]
        if match and match[0][1] != width:
            raise InvalidInputError(f"embedding {embedding.path.name}: its {part} vectors have {width} values; this model's {component} "
                                    f"takes {match[0][1]}: it was made for another model")
        return component if match else None
    fitting = [c for c, _, h in encoders if h == width]
    if not fitting:
        sizes = " or ".join(str(h) for _, _, h in encoders)
        raise InvalidInputError(f"embedding {embedding.path.name} has vectors of {width} values; this model's text encoder takes {sizes}: "
                                "it was made for another model")
    if len(fitting) > 1:
        raise InvalidInputError(f"embedding {embedding.path.name} fits both text encoders ({width} values); use an SDXL file with "
                                "clip_l and clip_g tensors")
    return fitting[0]
