"""A per-machine cache of ONNX Runtime's optimized graphs, so later processes start without re-optimizing.

At full optimization ONNX Runtime rewrites a UNet for this CPU (blocked convolution layouts with their weights
reordered, fused int8 matrix products) every time a session opens: 7-13 s of a 2-core machine for SD 1.5's
int8 UNet, against under a second to open the same graph already optimized. ONNX Runtime can save the graph
it optimized (`optimized_model_filepath`); the saved graph is specific to the CPU's instruction set and to the
ONNX Runtime version (its documentation says so), so an entry is keyed by both, and by the source files' sizes
and modification times: a re-export or an upgrade makes a new entry, never a wrong one.

Layout: `<cache_dir>/onnxruntime/<digest of the source path>/` holds `key.json`, `model.onnx` and
`model.data`. One entry per source file: a changed key replaces the old entry, so the cache holds at most
one optimized copy of each model file (about its size on disk). Entries are written to a staging folder and
renamed into place, so a crash or a full disk leaves no half-written entry.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

MODEL = "model.onnx"
DATA = "model.data"
_KEY = "key.json"


def _cpu_identity() -> str:
    """What the optimized layout depends on: the CPU's instruction-set flags where the OS lists them."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def _source_files(path: Path) -> dict[str, list[int]]:
    """Size and modification time of the model file and its folder's other files (external weights live there)."""
    stats = {}
    for file in sorted(p for p in path.parent.iterdir() if p.is_file()):
        st = file.stat()
        stats[file.name] = [st.st_size, st.st_mtime_ns]
    return stats


@dataclass
class CacheEntry:
    """Where a source model's optimized copy lives; `ready` when it was written by an earlier session."""

    folder: Path
    key: dict
    ready: bool

    @property
    def model(self) -> Path:
        return self.folder / MODEL

    def staging(self) -> Path:
        """A fresh folder to save the optimized graph into; `commit` moves it into place."""
        stage = self.folder.with_name(f"{self.folder.name}.{uuid.uuid4().hex[:8]}.partial")
        stage.mkdir(parents=True)
        return stage

    def commit(self, stage: Path) -> None:
        """Publish a saved graph: write its key, then replace any older entry by one rename."""
        if not (stage / MODEL).is_file():
            self.abandon(stage)
            return
        old = self.folder.with_name(f"{self.folder.name}.{uuid.uuid4().hex[:8]}.old")
        try:
            (stage / _KEY).write_text(json.dumps(self.key, indent=1))
            if self.folder.exists():
                os.replace(self.folder, old)
            os.replace(stage, self.folder)
        except OSError:  # a full disk, another process published first, or a read-only folder: keep what is there
            self.abandon(stage)
        shutil.rmtree(old, ignore_errors=True)

    def abandon(self, stage: Path) -> None:
        """Remove a staging folder whose save failed."""
        shutil.rmtree(stage, ignore_errors=True)

    def discard(self) -> None:
        """Remove an entry that failed to load (e.g. truncated by a full disk)."""
        shutil.rmtree(self.folder, ignore_errors=True)


def lookup(path: Path, cache_dir: Path, ort_version: str) -> CacheEntry:
    """The cache entry for a source model file, ready or to be written."""
    source = str(path.resolve())
    folder = Path(cache_dir).expanduser() / "onnxruntime" / hashlib.sha256(source.encode()).hexdigest()[:20]
    key = {"source": source, "onnxruntime": ort_version, "cpu": _cpu_identity(), "files": _source_files(path)}
    try:
        ready = json.loads((folder / _KEY).read_text()) == key and (folder / MODEL).is_file()
    except (OSError, ValueError):
        ready = False
    return CacheEntry(folder, key, ready)
