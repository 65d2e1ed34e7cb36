"""Write CLIP's BPE vocabulary as the `vocab.json` + `merges.txt` pair that diffusers folders use.

Dev tool. The source is OpenAI CLIP's `bpe_simple_vocab_16e6.txt.gz` (MIT licence), which ships inside
the `open_clip_torch` wheel; install it with `pip install --no-deps open_clip_torch` and run

    python models/clip/build_vocab.py leansd/export/configs/clip

The vocabulary is built the way CLIP's own tokenizer builds it: the 256 byte symbols, the same with the
end-of-word marker, one entry per merge, then the two special tokens (49408 entries).
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import sys
from pathlib import Path

N_MERGES = 49152 - 256 - 2


def byte_symbols() -> list[str]:
    """The printable stand-in for every byte, in CLIP's (and GPT-2's) order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def main(out_dir: str) -> None:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("open_clip_torch is not installed: pip install --no-deps open_clip_torch")
    source = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(source).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    print(f"wrote {len(tokens)} tokens and {len(merges)} merges to {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).resolve().parents[2] / "leansd" / "export" / "configs" / "clip"))
