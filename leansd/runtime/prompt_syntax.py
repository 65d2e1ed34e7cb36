"""AUTOMATIC1111's prompt weighting syntax: a prompt -> `(text, weight)` fragments.

    (text)        weight x 1.1            [text]        weight / 1.1
    (text:1.5)    weight x 1.5            nesting       the factors multiply: ((text)) is x 1.21
    \\( \\) \\[ \\]   literal brackets         \\\\            a literal backslash
    BREAK         (a whole word, upper case) ends the current 75-token chunk: `BREAK_MARKER`

The rules are the webui's, quirks included, so prompts written for it mean the same here:

* an unclosed `(` or `[` applies its factor to everything after it; an unmatched `)` or `]` is literal text;
* `:N)` closes the innermost open `(` with weight N even when a `[` was opened later (the two kinds of bracket
  are counted separately), and is literal text when no `(` is open;
* a backslash before any other character is dropped;
* consecutive fragments of equal weight are merged, and an empty prompt is `[("", 1.0)]`;
* BREAK is the fragment `("BREAK", -1.0)`; inside brackets its weight is scaled too, and it then stays the
  word "BREAK" with that (negative) weight.

A weight that is not a number (`(text:1.2.3)`) raises `InvalidInputError` (the webui fails on it too).
"""
from __future__ import annotations

import re

from leansd.runtime.errors import InvalidInputError

Fragment = tuple[str, float]
BREAK_MARKER: Fragment = ("BREAK", -1.0)

ROUND_FACTOR = 1.1
SQUARE_FACTOR = 1 / 1.1

# One lexical unit per match, tried in this order (the order decides, e.g. `\(` before a lone backslash).
_UNIT = re.compile(
    r"(?P<escaped>\\[()\[\]\\])"
    r"|(?P<backslash>\\)"
    r"|(?P<open>[(\[])"
    r"|:\s*(?P<weight>[+-]?[.\d]+)\s*\)"
    r"|(?P<close>[)\]])"
    r"|(?P<text>[^\\()\[\]:]+|:)"
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.DOTALL)


def parse_prompt_attention(prompt: str) -> list[Fragment]:
    """The prompt's fragments and their weights, as AUTOMATIC1111's `parse_prompt_attention` gives them."""
    fragments: list[list] = []  # [text, weight], mutable while brackets close
    open_round: list[int] = []  # index of the first fragment inside each open bracket
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for fragment in fragments[start:]:
            fragment[1] *= factor

    for unit in _UNIT.finditer(prompt):
        kind, token = unit.lastgroup, unit.group(0)
        if kind == "escaped":
            fragments.append([token[1], 1.0])
        elif kind == "backslash":
            fragments.append(["", 1.0])
        elif kind == "open":
            (open_round if token == "(" else open_square).append(len(fragments))
        elif kind == "weight" and open_round:
            scale_from(open_round.pop(), _number(unit.group("weight"), token))
        elif token == ")" and open_round:
            scale_from(open_round.pop(), ROUND_FACTOR)
        elif token == "]" and open_square:
            scale_from(open_square.pop(), SQUARE_FACTOR)
        else:  # text, or a bracket that closes nothing
            for i, part in enumerate(_BREAK.split(token)):
                if i:
                    fragments.append(list(BREAK_MARKER))
                fragments.append([part, 1.0])
    for start in open_round:
        scale_from(start, ROUND_FACTOR)
    for start in open_square:
        scale_from(start, SQUARE_FACTOR)
    return _merged(fragments) if fragments else [("", 1.0)]


def _number(text: str, context: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise InvalidInputError(f"the prompt weight in {context!r} is not a number; write it as (text:1.2)") from None


def _merged(fragments: list[list]) -> list[Fragment]:
    """Neighbours of equal weight joined into one fragment."""
    out: list[Fragment] = []
    for text, weight in fragments:
        if out and out[-1][1] == weight:
            out[-1] = (out[-1][0] + text, weight)
        else:
            out.append((text, weight))
    return out
