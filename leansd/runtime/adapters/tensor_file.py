"""Read `.safetensors` files with numpy: an 8-byte little-endian header length, a JSON header naming each
tensor's dtype, shape and byte range, then the raw bytes.

The format is simple enough that reading it here costs less than a dependency, and numpy has no bfloat16
(which the `safetensors` package's numpy loader therefore refuses) while many LoRA files are stored in it:
bfloat16 is widened to float32 here by placing its 16 bits above 16 zero bits.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from leansd.runtime.errors import InvalidInputError

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
           "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_MAX_HEADER = 100 * 2**20


class TensorFile:
    """One `.safetensors` file: `names`, `metadata` (the header's `__metadata__` strings) and `tensor(name)`
    (float tensors come back as float32)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as exc:
            raise InvalidInputError(f"cannot read {self.path} ({getattr(exc, 'strerror', None) or exc}); pass an existing .safetensors file") from None
        bad = f"{self.path} is not a valid .safetensors file"
        if self._data.size < 8:
            raise InvalidInputError(f"{bad} (too short); pass the .safetensors file itself")
        length = int(np.frombuffer(self._data[:8].tobytes(), "<u8")[0])
        if not 2 <= length <= min(_MAX_HEADER, self._data.size - 8):
            raise InvalidInputError(f"{bad} (its header length is {length}); pass an uncorrupted .safetensors file")
        try:
            header = json.loads(self._data[8 : 8 + length].tobytes())
        except (UnicodeDecodeError, ValueError):
            raise InvalidInputError(f"{bad} (its header is not JSON); pass an uncorrupted .safetensors file") from None
        if not isinstance(header, dict):
            raise InvalidInputError(f"{bad} (its header is not a JSON object)")
        self.header_length = length
        meta = header.pop("__metadata__", None) or {}
        self.metadata: dict[str, str] = {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}
        self._entries = header
        for name, entry in header.items():
            ok = isinstance(entry, dict) and isinstance(entry.get("shape"), list) and isinstance(entry.get("data_offsets"), list)
            if not ok or len(entry["data_offsets"]) != 2 or entry.get("dtype") not in (*_DTYPES, "BF16"):
                raise InvalidInputError(f"{bad}: tensor {name!r} has an entry this reader does not understand ({str(entry)[:80]})")
            start, end = entry["data_offsets"]
            if not 0 <= start <= end <= self._data.size - 8 - length:
                raise InvalidInputError(f"{bad}: tensor {name!r} lies outside the file (truncated download?)")

    @property
    def names(self) -> list[str]:
        return list(self._entries)

    def tensor(self, name: str) -> np.ndarray:
        """The tensor `name`; floating-point tensors as float32."""
        entry = self._entries[name]
        start, end = (8 + self.header_length + int(o) for o in entry["data_offsets"])
        raw = self._data[start:end]
        shape = tuple(int(d) for d in entry["shape"])
        if entry["dtype"] == "BF16":
            widened = raw.view("<u2").astype(np.uint32) << 16
            return widened.view(np.float32).reshape(shape)
        dtype = np.dtype(_DTYPES[entry["dtype"]]).newbyteorder("<")
        if raw.size != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise InvalidInputError(f"{self.path} is not a valid .safetensors file: tensor {name!r} has {raw.size} bytes for shape {shape}")
        array = raw.view(dtype).reshape(shape)
        return array.astype(np.float32) if array.dtype.kind == "f" else np.array(array)

    def tensors(self) -> dict[str, np.ndarray]:
        return {name: self.tensor(name) for name in self._entries}

    def body_sha256(self) -> str:
        """sha256 of everything after the header: the hash AUTOMATIC1111 gives a LoRA `.safetensors` file (so it does
        not change when only the metadata does)."""
        return hashlib.sha256(self._data[8 + self.header_length :]).hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a whole file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
