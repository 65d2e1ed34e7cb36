"""Hand back the pages of a model's weight files once a compiled model no longer reads them.

OpenVINO maps an IR's weights file into memory and, compiling for the CPU, copies every weight into its own
layout (bf16, or f32 repacked for its kernels). The mapped file pages it read stay in the process's resident set
afterwards: an SD 1.5 UNet keeps 3.4 GB of fp32 pages beside its compiled copy, SDXL's 10.3 GB. They are clean,
read-only pages of a file, so telling the kernel we no longer need them (madvise MADV_DONTNEED) is safe: a later
read (a recompile for a new shape) faults them in again from the file, usually from the OS file cache.
Linux only; elsewhere nothing is done.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_MADV_DONTNEED = 4


@functools.cache
def _madvise():
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise.restype = ctypes.c_int
    return libc.madvise


def read_only_mappings(folder: Path) -> list[tuple[int, int, str]]:
    """(start, end, path) of this process's read-only mappings of files inside `folder`."""
    root = os.path.realpath(folder) + os.sep
    found = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) < 6 or not fields[5].strip().startswith(root):
                    continue
                perms = fields[1]
                if perms[0] == "r" and perms[1] != "w":  # never pages the process may have written
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    found.append((start, end, fields[5].strip()))
    except OSError:
        return []
    return found


def release(folder: Path) -> int:
    """Drop this process's resident pages of read-only mapped files in `folder`; the bytes of address space advised."""
    if not sys.platform.startswith("linux"):
        return 0
    advised = 0
    for start, end, _ in read_only_mappings(folder):
        if _madvise()(start, end - start, _MADV_DONTNEED) == 0:
            advised += end - start
    return advised


RELEASE_INTERVAL_S = 0.25  # a page read is dropped within this; re-reading one it still needs is a minor fault


@contextmanager
def released_while(*folders: Path, interval: float = RELEASE_INTERVAL_S) -> Iterator[None]:
    """Release the mapped pages of files in `folders` every `interval` seconds while the block runs, and once after it."""
    if not sys.platform.startswith("linux"):
        yield
        return
    stop = threading.Event()

    def keep_releasing() -> None:
        while not stop.wait(interval):
            for folder in folders:
                release(folder)

    thread = threading.Thread(target=keep_releasing, name="leansd-page-release", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        for folder in folders:
            release(folder)
