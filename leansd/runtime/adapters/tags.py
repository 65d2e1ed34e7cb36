"""AUTOMATIC1111's LoRA tags in prompts: `<lora:NAME>`, `<lora:NAME:0.8>`, `<lora:NAME:TE:UNET>` (or `te=`/`unet=`).

A tag asks for a LoRA for this generation at a multiplier (text encoder and UNet may differ; the UNet's defaults
to the text encoder's, as in A1111) and is removed from the text that is encoded. `<lyco:...>` (the LyCORIS
extension's spelling) is read the same way.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from leansd.runtime.errors import InvalidInputError

_TAG = re.compile(r"<(lora|lyco):([^<>]*)>", re.IGNORECASE)


@dataclass(frozen=True)
class LoraRequest:
    """A LoRA asked for by name or path, with its text-encoder and UNet multipliers."""

    name: str
    te: float = 1.0
    unet: float = 1.0


def _multiplier(text: str, tag: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise InvalidInputError(f"the prompt's tag {tag} has multiplier {text!r}; use a number such as <lora:name:0.8>")
    return value


def extract(prompt: str) -> tuple[str, list[LoraRequest]]:
    """The prompt without its LoRA tags, and the requests they make, in order."""
    requests = []
    for match in _TAG.finditer(prompt):
        tag = match.group(0)
        args = [a.strip() for a in match.group(2).split(":")]
        named = {k.strip().lower(): v for k, _, v in (a.partition("=") for a in args[1:] if "=" in a)}
        positional = [a for a in args[1:] if "=" not in a]
        if not args[0] or len(positional) > 2 or set(named) - {"te", "unet"}:
            raise InvalidInputError(f"the prompt's tag {tag} is not a LoRA tag leansd reads; write <lora:NAME>, <lora:NAME:0.8> or "
                                    "<lora:NAME:TE:UNET>")
        te = _multiplier(named.get("te", positional[0] if positional else "1"), tag)
        unet = _multiplier(named.get("unet", positional[1] if len(positional) > 1 else str(te)), tag)
        requests.append(LoraRequest(args[0], te, unet))
    return _TAG.sub("", prompt), requests
