"""Textual-inversion embeddings: new words whose token-embedding vectors come from a file.

Files read (safetensors only: pickled `.pt` / `.bin` files need PyTorch; convert them once with
`python -m leansd.export.embeddings IN.pt OUT.safetensors`):
- diffusers' `learned_embeds.safetensors`: one tensor named after its token, shape (dim,) or (vectors, dim);
- AUTOMATIC1111's `.safetensors`: `emb_params` (vectors, dim); the word is the file's name, as A1111 calls it;
- AUTOMATIC1111's SDXL `.safetensors`: `clip_l` and `clip_g`, the vectors for SDXL's first and second text encoder.
  A one-tensor file on an SDXL model goes to the encoder of its width (diffusers' `load_textual_inversion(...,
  text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)` for the second).

As diffusers' `load_textual_inversion` does, an embedding of n vectors adds the tokens `name`, `name_1`, ...,
`name_{n-1}`, and a prompt's `name` stands for all n of them. The vectors become new rows of the text encoder's
token-embedding table (see `leansd.runtime.adapters.state`), of each encoder the file has vectors for.
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


# AUTOMATIC1111's SDXL embeddings: one tensor per text encoder, by the OpenCLIP names of SDXL's two towers.
SDXL_PARTS = ("clip_l", "clip_g")  # text_encoder (CLIP ViT-L), text_encoder_2 (OpenCLIP ViT-bigG)


def read_embedding(path: str | Path, token: str | None = None) -> Embedding:
    """Read an embedding file for one text encoder; `token` names it in prompts (default: the diffusers file's key,
    else the file name)."""
    parts = read_embedding_parts(path, token)
    if None not in parts:
        raise InvalidInputError(f"embedding {Path(path).name} is for SDXL's two text encoders (clip_l, clip_g); this model has one")
    return parts[None]


def read_embedding_parts(path: str | Path, token: str | None = None) -> dict[str | None, Embedding]:
    """Read an embedding file: {None: embedding} for a one-encoder file (diffusers' or AUTOMATIC1111's), or
    {"clip_l": ..., "clip_g": ...} for AUTOMATIC1111's SDXL files (the vectors for SDXL's first and second encoder)."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise InvalidInputError(
            f"embedding {path.name} is not a .safetensors file, which is what leansd reads without PyTorch; convert it once with "
            f"`python -m leansd.export.embeddings {path.name} {path.stem}.safetensors` (needs PyTorch)")
    tensors = TensorFile(path)
    names = tensors.names
    if set(names) == set(SDXL_PARTS):
        return {part: _embedding(tensors, part, token or path.stem, path) for part in SDXL_PARTS}
    if names == [_A1111_KEY]:
        name, default = _A1111_KEY, path.stem
    elif len(names) == 1:
        name = default = names[0]
    else:
        raise InvalidInputError(f"embedding {path.name} holds {len(names)} tensors ({', '.join(names[:3])}...); a textual-inversion "
                                "file holds one (diffusers' learned_embeds or AUTOMATIC1111's emb_params) or SDXL's clip_l and clip_g")
    return {None: _embedding(tensors, name, token or default, path)}


def _embedding(tensors: TensorFile, name: str, word: str, path: Path) -> Embedding:
    vectors = tensors.tensor(name)
    vectors = vectors.reshape(1, -1) if vectors.ndim == 1 else vectors
    if vectors.ndim != 2 or 0 in vectors.shape or not np.isfinite(vectors).all():
        raise InvalidInputError(f"embedding {path.name}: its tensor {name} has shape {vectors.shape} or non-finite values; "
                                "expected (vectors, dim)")
    word = word.strip()
    if not word or any(c.isspace() for c in word):
        raise InvalidInputError(f"embedding {path.name}: the token {word!r} must be one word without spaces; pass another token")
    return Embedding(word, np.ascontiguousarray(vectors, dtype=np.float32), path, file_sha256(path)[:12])
