"""Folders made outside the benchmark, adopted instead of rebuilt: a model built by hand with perf/build_model.py, an
export made with the very command the benchmark would run (timed with `/usr/bin/time -v`).

A full-size SDXL build or export takes an hour and most of the machine's memory and disk, so the benchmark does not
redo one that was just made. Adopting writes the same stamp a build or export inside the benchmark would write, plus
where the folder is and how it was made; later runs then reuse it as they reuse their own.
"""
from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path

# What `/usr/bin/time -v` prints, and what the benchmark keeps of it.
_TIME_FIELDS = {
    "Elapsed (wall clock) time (h:mm:ss or m:ss)": "wall",
    "Maximum resident set size (kbytes)": "rss_kb",
    "Exit status": "exit",
}


class AdoptError(Exception):
    """A folder or log that cannot be adopted; the message says why and what to do."""


def time_log(path: Path) -> dict:
    """Wall time, peak RSS and exit status from a log that ends with `/usr/bin/time -v`'s report."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        raise AdoptError(f"cannot read the export log {path}: {exc}; pass the log /usr/bin/time -v wrote") from exc
    found = {}
    for line in text.splitlines():
        name, _, value = line.strip().partition(": ")
        if name in _TIME_FIELDS:
            found[_TIME_FIELDS[name]] = value.strip()
    if set(found) != set(_TIME_FIELDS.values()):
        raise AdoptError(f"{path} has no complete /usr/bin/time -v report (the command has not finished?); wait for it")
    if found["exit"] != "0":
        raise AdoptError(f"{path}: the command exited with status {found['exit']}; a failed export cannot be adopted")
    return {"wall_s": _seconds(found["wall"]), "peak_rss_mb": int(found["rss_kb"]) / 1024.0,
            "measured_at": datetime.fromtimestamp(path.stat().st_mtime).isoformat(timespec="seconds")}


def _seconds(clock: str) -> float:
    """'1:02:03' or '2:03.45' -> seconds."""
    parts = [float(p) for p in re.split(r":", clock)]
    total = 0.0
    for part in parts:
        total = total * 60 + part
    return total


def source(stamp: Path, folder: Path, key: str, command: str) -> dict:
    """Adopt a diffusers folder built outside the benchmark as its source model; returns the stamp written."""
    if not (folder / "model_index.json").is_file() or not (folder / "unet").is_dir():
        raise AdoptError(f"{folder} is not a finished diffusers folder (no model_index.json or unet/); build it first: {command}")
    info = {"key": key, "path": str(folder.resolve()), "built_outside": f"built outside the benchmark with `{command}`",
            "wall_s": None, "peak_rss_mb": None, "built_at": datetime.fromtimestamp(folder.stat().st_mtime).isoformat(timespec="seconds")}
    stamp.write_text(json.dumps(info))
    return info


def export(stamp: Path, folder: Path, log: Path, inputs: dict, command: str) -> dict:
    """Adopt an export made outside the benchmark by `command`, with its time and peak memory from `log`."""
    if not (folder / "leansd.json").is_file() and not (folder / "model_index.json").is_file():
        raise AdoptError(f"{folder} has no leansd.json or model_index.json: the export is not finished; wait for it")
    info = {"inputs": inputs, "path": str(folder.resolve()), **time_log(log),
            "adopted": f"made outside the benchmark with `{command}`, timed by /usr/bin/time -v ({log})"}
    stamp.write_text(json.dumps(info))
    return info
