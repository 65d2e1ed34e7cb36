"""AUTOMATIC1111's weighting syntax, rule by rule (tests/parity/test_prompts.py compares with a reference parser)."""
from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from leansd.runtime.errors import InvalidInputError
from leansd.runtime.prompt_syntax import BREAK_MARKER, parse_prompt_attention as parse


def approx(fragments):
    return [(text, pytest.approx(weight, rel=1e-12)) for text, weight in fragments]


@pytest.mark.parametrize("prompt, expected", [
    ("a red circle", [("a red circle", 1.0)]),
    ("a (red) circle", [("a ", 1.0), ("red", 1.1), (" circle", 1.0)]),
    ("((red))", [("red", 1.1 * 1.1)]),
    ("[red]", [("red", 1 / 1.1)]),
    ("[[red]]", [("red", 1 / 1.1 / 1.1)]),
    ("(red:1.5) circle", [("red", 1.5), (" circle", 1.0)]),
    ("(red : 0.25 )", [("red ", 0.25)]),  # the space before the colon stays text
    ("((red:2) circle)", [("red", 2 * 1.1), (" circle", 1.1)]),
    ("([red]:1.5)", [("red", 1 / 1.1 * 1.5)]),
    ("(red:-1)", [("red", -1.0)]),
])
def test_brackets_and_weights(prompt, expected):
    assert parse(prompt) == approx(expected)


@pytest.mark.parametrize("prompt, expected", [
    (r"\(red\)", [("(red)", 1.0)]),
    (r"\[red\]", [("[red]", 1.0)]),
    (r"a \\ b", [("a \\ b", 1.0)]),
    (r"(a \(b\):1.2)", [("a (b)", 1.2)]),
    (r"a \x b", [("a x b", 1.0)]),  # a backslash before anything else is dropped
    ("a: b", [("a: b", 1.0)]),
])
def test_escapes_and_literal_characters(prompt, expected):
    assert parse(prompt) == approx(expected)


@pytest.mark.parametrize("prompt, expected", [
    ("a (red circle", [("a ", 1.0), ("red circle", 1.1)]),  # unclosed: to the end
    ("a [red circle", [("a ", 1.0), ("red circle", 1 / 1.1)]),
    ("a red) circle]", [("a red) circle]", 1.0)]),  # unmatched closers are text
    ("a red:1.2) circle", [("a red:1.2) circle", 1.0)]),
    ("(a [b:1.5) c]", [("a ", 1.5), ("b", 1.5 / 1.1), (" c", 1 / 1.1)]),  # :N) closes the open "(" past a "["
    ("(a] b)", [("a] b", 1.1)]),
])
def test_unbalanced_brackets(prompt, expected):
    assert parse(prompt) == approx(expected)


def test_break_and_empty_prompts():
    assert parse("a BREAK b") == [("a", 1.0), BREAK_MARKER, ("b", 1.0)]
    assert parse("BREAK") == [("", 1.0), BREAK_MARKER, ("", 1.0)]
    assert parse("BREAKING unBREAKable") == [("BREAKING unBREAKable", 1.0)]  # whole words only
    assert parse("(a BREAK b)") == approx([("a", 1.1), ("BREAK", -1.1), ("b", 1.1)])  # scaled: no longer a break
    assert parse("") == [("", 1.0)]
    assert parse("()") == [("", 1.0)]


@pytest.mark.parametrize("prompt", ["(red:1.2.3)", "(red:.)", "(red:+.)"])
def test_a_weight_that_is_not_a_number_is_refused(prompt):
    with pytest.raises(InvalidInputError, match="not a number"):
        parse(prompt)


@given(st.text(alphabet="ab ():[],", max_size=40), st.integers(0, 3))
def test_the_words_survive_parsing_with_positive_weights(prompt, depth):
    """Without escapes or weights, the parse keeps every character that is not a bracket, in order."""
    prompt = "(" * depth + prompt
    fragments = parse(prompt)
    strip = str.maketrans("", "", "()[]")
    assert "".join(t for t, _ in fragments).translate(strip) == prompt.translate(strip)
    assert all(w > 0 for _, w in fragments)
    assert all(a[1] != b[1] for a, b in zip(fragments, fragments[1:]))  # neighbours of equal weight are merged
