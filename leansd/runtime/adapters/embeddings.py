"""Textual-inversion embeddings: new words whose token-embedding vectors come from a file.

Files read (safetensors only: pickled `.pt` / `.bin` files need PyTorch; convert them once with
`python -m leansd.export.embeddings IN.pt OUT.safetensors`):
- diffusers' `learned_embeds.safetensors`: one tensor named after its token, shape (dim,) or (vectors, dim);
- AUTOMATIC1111's `.safetensors`: `emb_params` (vectors, dim); the word is the file's name, as A1111 calls it.

As diffusers' `load_textual_inversion` does, an embedding of n vectors adds the tokens `name`, `name_1`, ...,
`name_{n-1}`, and a prompt's `name` stands for all n of them. The vectors become new rows of the text encoder's
token-embedding table (see `leansd.runtime.adapters.state`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from leansd.runtime.adapters.tensor_file import TensorFile, file_sha256
from leansd.runtime.errors import InvalidInputError

_A1111_KEY = "emb_params"


@dataclass(frozen=True)
class Embedding:
    """One embedding: the word that names it in prompts, its vectors (n x dim), and its file's short hash."""

    token: str
    vectors: np.ndarray
    path: Path
    hash: str  # first 12 hex digits of the file's sha256 (`TI hashes` in AUTOMATIC1111's infotext)

    @property
    def tokens(self) -> list[str]:
        """The tokenizer words it adds: `token`, `token_1`, ... (diffusers' naming)."""
        return [self.token] + [f"{self.token}_{i}" for i in range(1, len(self.vectors))]


def read_embedding(path: str | Path, token: str | None = None) -> Embedding:
    """Read an embedding file; `token` names it in prompts (default: the diffusers file's key, else the file name)."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise InvalidInputError(
            f"embedding {path.name} is not a .safetensors file, which is what leansd reads without PyTorch; convert it once with "
            f"`python -m leansd.export.embeddings {path.name} {path.stem}.safetensors` (needs PyTorch)")
    tensors = TensorFile(path)
    names = tensors.names
    if names == [_A1111_KEY]:
        name, default = _A1111_KEY, path.stem
    elif len(names) == 1:
        name = default = names[0]
    elif {"clip_l", "clip_g"} <= set(names):
        raise InvalidInputError(f"embedding {path.name} is for SDXL's two text encoders (clip_l, clip_g); this model has one")
    else:
        raise InvalidInputError(f"embedding {path.name} holds {len(names)} tensors ({', '.join(names[:3])}...); a textual-inversion "
                                "file holds one (diffusers' learned_embeds or AUTOMATIC1111's emb_params)")
    vectors = tensors.tensor(name)
    vectors = vectors.reshape(1, -1) if vectors.ndim == 1 else vectors
    if vectors.ndim != 2 or 0 in vectors.shape or not np.isfinite(vectors).all():
        raise InvalidInputError(f"embedding {path.name}: its tensor has shape {vectors.shape} or non-finite values; expected (vectors, dim)")
    word = (token or default).strip()
    if not word or any(c.isspace() for c in word):
        raise InvalidInputError(f"embedding {path.name}: the token {word!r} must be one word without spaces; pass another token")
    return Embedding(word, np.ascontiguousarray(vectors, dtype=np.float32), path, file_sha256(path)[:12])
