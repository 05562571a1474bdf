"""Glob patterns for list_keys: matching, literal prefixes, errors, and fnmatch agreement."""

from __future__ import annotations

import fnmatch
import random

import pytest

from broker.errors import PatternError
from broker.pattern import compile_pattern


def _matches(pattern: str, key: str) -> bool:
    return compile_pattern(pattern).matches(key)


@pytest.mark.parametrize(
    ("pattern", "yes", "no"),
    [
        ("*", ["", "a", "any thing", "*"], []),
        ("user:*", ["user:", "user:1", "user:a:b"], ["user", "User:1", "xuser:1"]),
        ("a*b", ["ab", "axb", "a--b", "abb"], ["a", "b", "abx", "ba"]),
        ("*.json", [".json", "x.json"], ["x.jsonx", "xjson"]),
        ("a*b*c", ["abc", "a1b2c", "abbc"], ["acb", "ab", "abcx"]),
        ("?", ["a", "?", "é", "\U0001F600"], ["", "ab"]),
        ("a?c", ["abc", "a?c", "acc"], ["ac", "abbc"]),
        ("??", ["ab"], ["a", "abc"]),
        ("[abc]x", ["ax", "bx", "cx"], ["dx", "x", "abx", "Ax"]),
        ("[a-z]", ["a", "m", "z"], ["A", "0", "", "aa", "{"]),
        ("[a-cx-z]", ["a", "b", "c", "x", "z"], ["d", "w"]),
        ("[!a]", ["b", "!", "^"], ["a", "", "bb"]),
        ("[^a]", ["b", "!", "^"], ["a", "", "bb"]),
        ("[!a-c]1", ["d1", "Z1"], ["a1", "b1", "c1", "1"]),
        ("[]a]", ["]", "a"], ["b", "[]a]"]),
        ("[!]a]", ["b"], ["]", "a"]),
        ("[a-]", ["a", "-"], ["b"]),
        ("a]", ["a]"], ["a"]),
        ("[*]", ["*"], ["a", ""]),
        ("[?]x", ["?x"], ["ax"]),
        ("k[0-9][0-9]", ["k00", "k42"], ["k4", "k4a", "ka4"]),
        ("a.b", ["a.b"], ["axb"]),  # regex metacharacters are literals
        ("a+(b)|c$", ["a+(b)|c$"], ["aab|c", "c"]),
        ("*?*", ["a", "ab"], [""]),
    ],
)
def test_wildcards(pattern: str, yes: list[str], no: list[str]) -> None:
    for key in yes:
        assert _matches(pattern, key), (pattern, key)
    for key in no:
        assert not _matches(pattern, key), (pattern, key)


@pytest.mark.parametrize(
    ("pattern", "yes", "no"),
    [
        ("a\\*", ["a*"], ["a", "ab", "a**"]),
        ("\\?", ["?"], ["a", ""]),
        ("\\[x]", ["[x]"], ["x"]),
        ("a\\\\b", ["a\\b"], ["ab", "a\\\\b"]),
        ("\\a\\b", ["ab"], ["\\a\\b"]),  # escaping an ordinary character keeps it
        ("[\\]]", ["]"], ["\\", "]]"]),
        ("[a\\-z]", ["a", "-", "z"], ["b", "y"]),
        ("[\\!a]", ["!", "a"], ["b"]),  # an escaped '!' does not negate
        ("[\\a-c]", ["a", "b", "c"], ["d"]),
        ("[a-\\c]", ["a", "b", "c"], ["d"]),
        ("x\\*y*", ["x*y", "x*yz"], ["xay", "x*"]),
        ("*\\*", ["*", "a*"], ["a"]),
    ],
)
def test_backslash_escapes(pattern: str, yes: list[str], no: list[str]) -> None:
    for key in yes:
        assert _matches(pattern, key), (pattern, key)
    for key in no:
        assert not _matches(pattern, key), (pattern, key)


@pytest.mark.parametrize(
    ("pattern", "prefix", "regex_needed"),
    [
        ("*", "", False),
        ("**", "", False),
        ("abc*", "abc", False),
        ("abc***", "abc", False),
        ("user:42:*", "user:42:", False),
        ("ab?c", "ab", True),
        ("ab[c]d", "ab", True),
        ("ab*c", "ab", True),
        ("ab*?", "ab", True),
        ("*abc", "", True),
        ("?abc", "", True),
        ("[a]bc", "", True),
        ("a\\*b*", "a*b", False),
        ("a\\?\\[*", "a?[", False),
        ("ab]c*", "ab]c", False),
        ("a*\\*", "a", True),
    ],
)
def test_literal_prefix_extraction(pattern: str, prefix: str, regex_needed: bool) -> None:
    p = compile_pattern(pattern)
    assert p.prefix == prefix
    assert p.exact is False
    assert (p.regex is not None) is regex_needed
    assert p.source == pattern


@pytest.mark.parametrize(
    ("pattern", "literal"),
    [("abc", "abc"), ("a\\*", "a*"), ("x]y", "x]y"), ("\\[\\]", "[]"), ("", "")],
)
def test_exact_patterns(pattern: str, literal: str) -> None:
    p = compile_pattern(pattern)
    assert p.exact is True
    assert p.prefix == literal
    assert p.matches(literal)
    assert not p.matches(literal + "x")
    assert not p.matches("x" + literal)


@pytest.mark.parametrize(
    ("pattern", "fragment"),
    [
        ("[", "never closed"),
        ("a[bc", "never closed"),
        ("[!", "never closed"),
        ("[^", "never closed"),
        ("[]", "never closed"),  # a leading ']' is a member, so this class is open
        ("[!]", "never closed"),
        ("x[a-", "never closed"),
        ("\\", "dangling"),
        ("abc\\", "dangling"),
        ("[a\\", "dangling"),
        ("[a-\\", "dangling"),
        ("*\\", "dangling"),
    ],
)
def test_malformed_patterns_raise_pattern_error(pattern: str, fragment: str) -> None:
    with pytest.raises(PatternError) as info:
        compile_pattern(pattern)
    assert fragment in str(info.value)
    assert repr(pattern) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_unclosed_bracket_error_gives_its_position() -> None:
    with pytest.raises(PatternError, match="at 3"):
        compile_pattern("abc[de")


def test_reversed_range_is_refused() -> None:
    with pytest.raises(PatternError, match="reversed"):
        compile_pattern("[z-a]")


@pytest.mark.parametrize("pattern", [None, 5, b"a*"])
def test_non_str_pattern_raises_pattern_error(pattern: object) -> None:
    with pytest.raises(PatternError, match="must be a str"):
        compile_pattern(pattern)  # type: ignore[arg-type]


@pytest.mark.parametrize("pattern", [["a*"], {"a": 1}])
def test_unhashable_pattern_raises_pattern_error(pattern: object) -> None:
    with pytest.raises(PatternError):
        compile_pattern(pattern)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- vs fnmatch

_LITERALS = "abc.:-"
_KEY_CHARS = "abcd.:-"


def _random_class(rng: random.Random) -> str:
    items = []
    for _ in range(rng.randint(1, 3)):
        if rng.random() < 0.5:
            items.append(rng.choice("abcd"))
        else:
            lo, hi = sorted(rng.sample("abcd", 2))
            items.append(f"{lo}-{hi}")
    neg = "!" if rng.random() < 0.3 else ""
    return "[" + neg + "".join(items) + "]"


def _random_pattern(rng: random.Random) -> str:
    out = []
    for _ in range(rng.randint(0, 6)):
        r = rng.random()
        if r < 0.5:
            out.append(rng.choice(_LITERALS))
        elif r < 0.7:
            out.append("*")
        elif r < 0.85:
            out.append("?")
        else:
            out.append(_random_class(rng))
    return "".join(out)


def _random_key(rng: random.Random) -> str:
    return "".join(rng.choice(_KEY_CHARS) for _ in range(rng.randint(0, 6)))


@pytest.mark.parametrize("seed", range(5))
def test_agrees_with_fnmatchcase_on_random_patterns(seed: int) -> None:
    """Without escapes or '^' negation (where fnmatch differs), the semantics are fnmatch's."""
    rng = random.Random(seed)
    checked = matched = 0
    for _ in range(300):
        pattern = _random_pattern(rng)
        p = compile_pattern(pattern)
        for _ in range(30):
            key = _random_key(rng)
            expected = fnmatch.fnmatchcase(key, pattern)
            assert p.matches(key) is expected, (pattern, key)
            checked += 1
            matched += expected
        # Every match starts with the literal prefix (what makes the range scan correct).
        assert all(
            k.startswith(p.prefix) for k in (_random_key(rng) for _ in range(30)) if p.matches(k)
        )
    assert checked == 300 * 30
    assert 0 < matched < checked  # the generator exercises both outcomes
