"""Prompts written for AUTOMATIC1111's webui: weights, nesting, escapes, unbalanced brackets, BREAK, long ones."""
from __future__ import annotations

_SCENE = ("masterpiece, best quality, a cozy wooden cabin in a snowy pine forest at dusk, warm light in the windows, "
          "smoke rising from the chimney, (aurora borealis:1.2) in the sky, [people], highly detailed, 8k, sharp focus")
_TAGS = ", ".join(f"tag{i}" for i in range(90))  # 180 tokens of short comma-separated tags
_WORDS = " ".join(["lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor"] * 30)  # > 300 tokens

WEIGHTS = [
    "a (red) circle",
    "a ((red)) circle on a (((blue))) background",
    "a [red] circle",
    "a [[red]] circle on a [[[blue]]] background",
    "a (red:1.5) circle",
    "a (red:0.5) circle, (blue square:1.25)",
    "(a red circle:1.3), [a blue square], ((green triangle)), [[yellow star]]",
    "((a (red:1.2) circle) on [a (blue) background])",
    "(red: 1.4 ) circle",
    "(red:-0.5) circle",
    "(red:+1.3) circle",
    "(red:.8) circle",
    "(red:2.) circle",
    "(a [cat:1.5) dog]",
    "a (cat with [a hat) and scarf]",
    "a (tall (thin:1.3) tree:0.7) beside a [short (wide) bush]",
    "(((((((deep nesting)))))))",
    "[[[[[[[shallow nesting]]]]]]]",
    "(mixed [[nest] ing] here:1.1)",
    "a portrait, (detailed face:1.2), (sharp eyes), [blurry background:1.3], film grain",
]
ESCAPES = [
    r"a \(red\) circle",
    r"a \[red\] circle",
    r"a \\ backslash",
    r"an escaped \(bracket) and a real (one)",
    r"(a \(nested\) escape:1.2)",
    r"a lone \ backslash and \x junk",
    "a trailing backslash \\",
    r"\(\(\(\)\)\)",
    "a colon: not a weight",
    "time 12:30 and ratio 3:2",
    "a (colon: inside) brackets",
    "smiley :) and frown :(",
]
UNBALANCED = [
    "a (red circle",
    "a red) circle",
    "a [red circle",
    "a red] circle",
    "((a red circle)",
    "a (red] circle",
    "a [red) circle",
    "]]]] (((( [[",
    "a red circle:1.2)",
    "(a (b (c",
    "a ) ( b ] [ c",
]
BREAKS = [
    "a red circle BREAK a blue square",
    "BREAK a red circle",
    "a red circle BREAK",
    "a BREAK BREAK b",
    "one BREAK two BREAK three BREAK four",
    "(a red circle BREAK a blue square)",
    "[a BREAK b]",
    "BREAKING news, unBREAKable, break, Break",
    "a red circle\nBREAK\na blue square",
    "(red:1.2) BREAK [blue] BREAK (green:0.8)",
    "",
    " ",
]
LONG = [
    _SCENE,
    f"{_SCENE}, {_SCENE}",
    _TAGS,
    f"({_TAGS}:1.1)",
    _WORDS,
    f"[{_WORDS}]",
    f"{_SCENE} BREAK {_TAGS} BREAK {_WORDS}",
    f"{_WORDS}, (red:1.5), {_TAGS}",
    ", ".join(f"(word{i}:{1 + i / 100:.2f})" for i in range(120)),
    " ".join(f"((x{i}))" if i % 3 else f"[y{i}]" for i in range(160)),
]
CORPUS = WEIGHTS + ESCAPES + UNBALANCED + BREAKS + LONG
