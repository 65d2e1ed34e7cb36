"""The model folder on disk: atomic creation, file hashes and the `leansd.json` manifest."""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from leansd.export.errors import ExportError
from leansd.runtime.manifest import FORMAT, FORMAT_VERSION, MANIFEST  # noqa: F401 (the exporter's names for them)

# Where temporary folders live: next to the output, so the final rename stays on one file system.
_TMP_TAG = ".leansd-tmp-"
_OLD_TAG = ".leansd-old-"


class StagingFolder:
    """A hidden sibling folder that becomes `target` only when `commit()` is called.

    Use as a context manager: leaving the block without a commit (an error, Ctrl-C) deletes the staging
    folder, so a crash never leaves a half-written model that looks complete. An existing `target` is
    refused unless `overwrite`; with `overwrite` it is replaced only at commit time.
    """

    def __init__(self, target: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        self.target = Path(target).absolute()
        self.overwrite = overwrite
        check_output(self.target, overwrite=overwrite)
        self.path = self.target.parent / f".{self.target.name}{_TMP_TAG}{uuid.uuid4().hex[:8]}"
        self._committed = False

    def __enter__(self) -> StagingFolder:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.path.mkdir()
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._committed:
            shutil.rmtree(self.path, ignore_errors=True)

    def commit(self) -> Path:
        """Move the staging folder into place (replacing an old target when allowed) and return the target."""
        check_output(self.target, overwrite=self.overwrite)
        old = None
        if self.target.exists():
            old = self.target.parent / f".{self.target.name}{_OLD_TAG}{uuid.uuid4().hex[:8]}"
            self.target.rename(old)
        try:
            self.path.rename(self.target)
        except BaseException:
            if old is not None:
                old.rename(self.target)
            raise
        self._committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.target


def check_output(target: Path, *, overwrite: bool) -> None:
    """Refuse an output path that exists (unless `overwrite`) or that is a file."""
    if target.is_file():
        raise ExportError(f"output '{target}' is a file; pass a folder path for the exported model")
    if target.exists() and not overwrite:
        raise ExportError(f"output folder '{target}' already exists; pass --overwrite to replace it, or choose another folder")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """The hex sha256 of a file, read in chunks (weight files are gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_table(root: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file under `root` except the manifest, keyed by '/'-separated relative path."""
    table = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel != MANIFEST:
            table[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return table


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write `path` whole or not at all: a temporary sibling renamed over it (an in-place upgrade rewrites leansd.json)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(temp, path)


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


def write_manifest(root: Path, fields: dict[str, Any]) -> dict[str, Any]:
    """Write `leansd.json` (format header + `fields` + the file table) into `root` and return it.

    Call last: the file table covers everything already written. A `"files"` key in `fields` only fixes
    where the table goes in the key order.
    """
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **fields}
    manifest["files"] = file_table(root)
    write_json(root / MANIFEST, manifest)
    return manifest
