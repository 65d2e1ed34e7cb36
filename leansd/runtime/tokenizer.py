"""CLIP's byte-level BPE tokenizer, built on the `tokenizers` library (no hand-written BPE).

`ClipTokenizer.from_folder(model / "tokenizer")` reads a diffusers/Optimum `tokenizer/` folder and turns prompts
into the `(batch, 77)` int64 ids the text encoder takes: BOS, the prompt's tokens (truncated so that the ids fit),
EOS, then the pad token (`<|endoftext|>` for SD 1.x, `!` for SD 2.x: read from the folder's configs).

Which reference it matches: it is the same tokenizer as transformers' `CLIPTokenizerFast` (identical ids on every
input). diffusers' pipelines load the slow `CLIPTokenizer`, which gives the same ids on ordinary prompts but
pre-cleans text in one of two ways, depending on whether the `ftfy` package is installed:

* with ftfy, `ftfy.fix_text` first: HTML entities (`&amp;`) are unescaped, curly quotes and apostrophes become
  straight ones, ligatures and full-width forms are unfolded, mojibake is repaired;
* without ftfy, a BERT-style cleaner: control and format characters (zero-width joiners in emoji sequences, soft
  hyphens...) are deleted and every CJK ideograph becomes a word of its own.

Both slow variants also lowercase a final capital sigma to `ς` where we (and the fast tokenizer) give `σ`. On such
inputs we follow the fast tokenizer; `tests/parity/test_tokenizer.py` pins every known case.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE

from leansd.runtime.errors import InvalidInputError, ModelFolderError

__all__ = ["ClipTokenizer", "MissingTokenizerFile"]

log = logging.getLogger(__name__)

# CLIP's word pattern: common English contractions, runs of letters, single digits, runs of other symbols.
# The Unicode classes are why this needs the library's regex engine rather than Python's `re`.
_CLIP_WORDS = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_END_OF_WORD = "</w>"
# CLIP's text encoder has 77 positions; transformers writes a huge placeholder when no length was saved.
DEFAULT_MAX_LENGTH = 77
_MAX_SANE_LENGTH = 10_000
_DEFAULT_SPECIALS = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",  # CLIPTokenizer's default, and what SD 1.x saves
}


class MissingTokenizerFile(ModelFolderError, FileNotFoundError):
    """A tokenizer file (or the folder) is missing: the model folder is incomplete."""


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFolderError(f"{path} is not valid JSON ({exc}); the model folder is damaged: re-export the model with sd-export") from exc
    if not isinstance(data, dict):
        kind = "null" if data is None else {bool: "boolean", str: "string", list: "list"}.get(type(data), "number")
        raise ModelFolderError(f"{path} holds a JSON {kind}, not an object; the model folder is damaged: re-export the model with sd-export")
    return data


def _special_tokens(config: dict[str, Any]) -> dict[str, str]:
    """The special tokens a config names, as transformers saves them: plain strings or AddedToken dicts."""
    found = {}
    for key in _DEFAULT_SPECIALS:
        value = config.get(key)
        text = value.get("content") if isinstance(value, dict) else value
        if isinstance(text, str) and text:
            found[key] = text
    return found


def _clip_pipeline(tokenizer: Tokenizer) -> Tokenizer:
    """Attach CLIP's normaliser and pre-tokeniser (as transformers' CLIPTokenizerFast has them)."""
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                                 normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        # Keep the matches, drop what lies between them (whitespace).
        pre_tokenizers.Split(Regex(_CLIP_WORDS), behavior="removed", invert=True),
        # Map every UTF-8 byte to its printable stand-in, as the vocabulary spells tokens.
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    return tokenizer


def _usable_tokenizer_json(path: Path) -> Tokenizer | None:
    """Load `tokenizer.json` if it holds a CLIP BPE model (vocabulary + merges + `</w>` suffix), else None."""
    try:
        model = json.loads(path.read_text(encoding="utf-8")).get("model") or {}
        if model.get("type") != "BPE" or model.get("end_of_word_suffix") != _END_OF_WORD:
            log.warning("%s is not a CLIP BPE tokenizer; using vocab.json + merges.txt", path)
            return None
        tokenizer = Tokenizer.from_file(str(path))
        # We truncate and pad ourselves (keeping EOS last); the file's own settings would cut before that.
        tokenizer.no_truncation()
        tokenizer.no_padding()
        return tokenizer
    except Exception as exc:  # any parse or load failure means: fall back to vocab + merges
        log.warning("could not load %s (%s); using vocab.json + merges.txt", path, exc)
        return None


class ClipTokenizer:
    """Prompts -> CLIP token ids, shaped and padded for the text encoder."""

    def __init__(self, tokenizer: Tokenizer, *, bos_token: str, eos_token: str, pad_token: str,
                 unk_token: str | None = None, max_length: int = DEFAULT_MAX_LENGTH) -> None:
        """Wrap a `tokenizers.Tokenizer` that already has CLIP's BPE model, normaliser and pre-tokeniser."""
        if max_length < 2:
            raise ValueError(f"max_length must leave room for BOS and EOS, got {max_length}")
        specials = [t for t in dict.fromkeys((bos_token, eos_token, unk_token, pad_token)) if t]
        missing = [t for t in specials if tokenizer.token_to_id(t) is None]
        if missing:
            raise ModelFolderError(f"the tokenizer vocabulary lacks the special token(s) {', '.join(map(repr, missing))}")
        # transformers matches special tokens written inside a prompt before BPE (so an SD 2.x prompt's "!" is the
        # pad id 0, not the word-final "!</w>"); registering them does the same here. `normalized` lets
        # "<|ENDOFTEXT|>" match too, as the slow tokenizer's lowercasing does.
        tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=True) for t in specials])
        self._tokenizer = tokenizer
        self.max_length = int(max_length)
        self.bos_token_id: int = tokenizer.token_to_id(bos_token)
        self.eos_token_id: int = tokenizer.token_to_id(eos_token)
        self.pad_token_id: int = tokenizer.token_to_id(pad_token)
        self._expand: dict[int, list[int]] = {}  # a textual-inversion word -> the ids of all its vectors

    @classmethod
    def from_files(cls, vocab: str | Path, merges: str | Path, **kwargs: Any) -> "ClipTokenizer":
        """Build from a CLIP `vocab.json` + `merges.txt` pair; `kwargs` go to the constructor (special tokens
        default to SD 1.x's)."""
        for path in (Path(vocab), Path(merges)):
            if not path.is_file():
                raise MissingTokenizerFile(f"{path} is missing: the model folder is incomplete")
        try:
            model = BPE.from_file(str(vocab), str(merges), continuing_subword_prefix="", end_of_word_suffix=_END_OF_WORD,
                                  fuse_unk=False, unk_token=kwargs.get("unk_token", _DEFAULT_SPECIALS["unk_token"]))
        except Exception as exc:  # the library reports malformed files with a bare Exception
            raise ModelFolderError(f"cannot read the tokenizer files {vocab} and {merges}: {exc}") from exc
        return cls(_clip_pipeline(Tokenizer(model)), **(_DEFAULT_SPECIALS | kwargs))

    @classmethod
    def from_folder(cls, folder: str | Path) -> "ClipTokenizer":
        """Load a diffusers/Optimum `tokenizer/` folder.

        Reads the special tokens and `model_max_length` from `tokenizer_config.json` and `special_tokens_map.json`
        (the latter wins, as in transformers). Uses `tokenizer.json` when it is a valid CLIP tokenizer, else
        `vocab.json` + `merges.txt`. Raises `MissingTokenizerFile` (a `FileNotFoundError`) naming what is missing.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise MissingTokenizerFile(f"tokenizer folder {folder} is missing: the model folder is incomplete")
        config = _read_json(folder / "tokenizer_config.json")
        special_map = _read_json(folder / "special_tokens_map.json")
        specials = _DEFAULT_SPECIALS | _special_tokens(config) | _special_tokens(special_map)
        length = config.get("model_max_length")
        if not isinstance(length, int) or isinstance(length, bool) or not 2 <= length <= _MAX_SANE_LENGTH:
            length = DEFAULT_MAX_LENGTH

        tokenizer_json = folder / "tokenizer.json"
        backend = _usable_tokenizer_json(tokenizer_json) if tokenizer_json.is_file() else None
        if backend is not None:
            # Set CLIP's normaliser/pre-tokeniser even so: files saved before transformers 4.17 had a wrong one.
            return cls(_clip_pipeline(backend), max_length=length, **specials)
        return cls.from_files(folder / "vocab.json", folder / "merges.txt", max_length=length, **specials)

    def encode(self, prompt: str) -> list[int]:
        """The prompt's token ids, without BOS/EOS and untruncated (to tell how much truncation drops)."""
        if not isinstance(prompt, str):
            raise TypeError(f"a prompt must be a str, got {type(prompt).__name__}")
        # One prompt at a time: encode_batch would start the library's thread pool, which breaks after a fork.
        ids = self._tokenizer.encode(prompt, add_special_tokens=False).ids
        if self._expand:
            ids = [j for i in ids for j in self._expand.get(i, (i,))]
        return ids

    def add_words(self, groups: Sequence[Sequence[str]]) -> list[list[int]]:
        """Add new words (textual-inversion tokens) and return their ids. Each group is one embedding's words
        (`name`, `name_1`, ...); a prompt's `name` stands for the whole group, as diffusers' `maybe_convert_prompt`
        makes it. Words match case-insensitively, as the prompt is lowercased before matching."""
        out = []
        for group in groups:
            words = [w.lower() for w in group]
            taken = [w for w in words if self._tokenizer.token_to_id(w) is not None]
            if taken:
                raise InvalidInputError(f"the embedding word {taken[0]!r} is already in the tokenizer's vocabulary; give the embedding another token")
            self._tokenizer.add_tokens([AddedToken(w, normalized=True) for w in words])
            ids = [self._tokenizer.token_to_id(w) for w in words]
            self._expand[ids[0]] = ids
            out.append(ids)
        return out

    def token_id(self, token: str) -> int | None:
        """The id of a vocabulary entry such as ",</w>" (None when the vocabulary lacks it)."""
        return self._tokenizer.token_to_id(token)

    def __call__(self, prompts: str | Sequence[str]) -> np.ndarray:
        """int64 ids of shape (len(prompts), max_length): BOS + tokens + EOS, truncated and padded.

        Truncation keeps the first `max_length - 2` tokens and still ends with EOS, as transformers'
        `truncation=True, padding="max_length"` does.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        out = np.full((len(prompts), self.max_length), self.pad_token_id, dtype=np.int64)
        for row, prompt in enumerate(prompts):
            ids = [self.bos_token_id, *self.encode(prompt)[: self.max_length - 2], self.eos_token_id]
            out[row, : len(ids)] = ids
        return out
