"""Convert a pickled textual-inversion embedding (AUTOMATIC1111 `.pt`, diffusers `learned_embeds.bin`) to the
`.safetensors` file the runtime reads without PyTorch:

    python -m leansd.export.embeddings my-style.pt my-style.safetensors

An A1111 file becomes `{"emb_params": vectors}` (A1111's safetensors layout: the runtime names it after the file);
a diffusers file keeps its `{token: vectors}`. The pickle is opened with `torch.load(weights_only=True)`, which
refuses files that would run code.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def convert(source: Path, target: Path) -> Path:
    """Write `target` (.safetensors) from the pickled embedding `source`."""
    import torch
    from safetensors.torch import save_file

    from leansd.export.errors import ExportError

    try:
        data = torch.load(str(source), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for foreign or unsafe pickles
        raise ExportError(f"cannot read {source} as a tensor pickle ({str(exc).splitlines()[0][:160]})") from None
    if isinstance(data, dict) and "string_to_param" in data:
        tensors = {"emb_params": next(iter(data["string_to_param"].values()))}
    elif isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), torch.Tensor):
        tensors = dict(data)
    else:
        raise ExportError(f"{source} is not a textual-inversion embedding (no string_to_param, not one {{token: tensor}})")
    save_file({k: v.detach().float().contiguous() for k, v in tensors.items()}, str(target))
    return target


def main(argv: list[str] | None = None) -> int:
    from leansd.export.errors import ExportError

    parser = argparse.ArgumentParser(prog="python -m leansd.export.embeddings", description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    args = parser.parse_args(argv)
    if args.target.suffix != ".safetensors" or args.target.exists():
        print("error: the target must be a new .safetensors file", file=sys.stderr)
        return 2
    try:
        print(convert(args.source, args.target))
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
