"""Progress of an export: a bar on a terminal, one timed line per stage when stderr is a log file.

A full-size SDXL export runs for the better part of an hour, mostly redirected to a file, where a progress bar
writes nothing. There each stage gets a line with the time since the start and the process's peak memory so far,
which is what tells where an export spends its time and memory.
"""
from __future__ import annotations

import sys
import time
from typing import Any, TextIO

GIB = 2**30


def peak_rss_bytes() -> int | None:
    """The process's peak resident memory so far (None where the platform does not say)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


class StageLines:
    """The part of tqdm's interface the exporter uses, writing `[elapsed s, peak GB] desc: stage` per stage."""

    def __init__(self, desc: str, stream: TextIO) -> None:
        self.desc, self.stream, self.start = desc, stream, time.perf_counter()

    def set_postfix_str(self, text: str) -> None:
        peak = peak_rss_bytes()
        memory = "" if peak is None else f", peak {peak / GIB:.1f} GB"
        print(f"[{time.perf_counter() - self.start:7.1f} s{memory}] {self.desc}: {text}", file=self.stream, flush=True)

    def update(self, n: int = 1) -> None:
        """Steps are counted by the bar only; the lines already say which stage runs."""

    def close(self) -> None:
        """Nothing to clear: the CLI's last line says the export finished (or why it failed)."""


def bar(total: int, desc: str, progress: bool | None) -> Any:
    """A tqdm bar on a terminal; timed stage lines when `progress` is None (automatic) and stderr is not a terminal;
    nothing when `progress` is False."""
    from tqdm import tqdm

    if progress is None and not sys.stderr.isatty():
        return StageLines(desc, sys.stderr)
    return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, disable=not progress if progress is not None else None,
                dynamic_ncols=True)
