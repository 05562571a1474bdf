"""Glob patterns for list_keys: matching, literal prefixes, errors, and fnmatch agreement."""

from __future__ import annotations

import fnmatch
import random
import re

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
    ("pattern", "prefix", "match_needed"),
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
def test_literal_prefix_extraction(pattern: str, prefix: str, match_needed: bool) -> None:
    p = compile_pattern(pattern)
    assert p.prefix == prefix
    assert p.exact is False
    assert p.prefix_only is not match_needed
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


# --------------------------------------------------------------------------- vs the old regex
#
# The reference is the translation broker/pattern.py used before issue 14 item 6: a glob as a
# backtracking regex run with fullmatch. It is exponential in the number of stars when a key
# almost matches, so it runs only where that stays cheap; a textbook dynamic-programming matcher
# (O(len(pattern) x len(key)) cells) is a second oracle where the table is small.


def _reference_class(pattern: str, i: int) -> tuple[str, int]:
    j = i + 1
    negate = False
    if j < len(pattern) and pattern[j] in "!^":
        negate = True
        j += 1
    items: list[str] = []
    first = True
    while True:
        if j >= len(pattern):
            raise PatternError(f"invalid pattern {pattern!r}: '[' at {i} is never closed")
        c = pattern[j]
        if c == "]" and not first:
            j += 1
            break
        first = False
        if c == "\\":
            if j + 1 >= len(pattern):
                raise PatternError(f"invalid pattern {pattern!r}: dangling '\\' at the end")
            c = pattern[j + 1]
            j += 1
        if j + 2 < len(pattern) and pattern[j + 1] == "-" and pattern[j + 2] != "]":
            hi = pattern[j + 2]
            if hi == "\\":
                if j + 3 >= len(pattern):
                    raise PatternError(f"invalid pattern {pattern!r}: dangling '\\' at the end")
                hi = pattern[j + 3]
                j += 1
            if hi < c:
                raise PatternError(
                    f"invalid pattern {pattern!r}: range {c}-{hi} at {i} is reversed"
                )
            items.append(f"{re.escape(c)}-{re.escape(hi)}")
            j += 3
        else:
            items.append(re.escape(c))
            j += 1
    body = "".join(items)
    return (f"[^{body}]" if negate else f"[{body}]"), j


def _reference_regex(pattern: str) -> re.Pattern[str]:
    """The old translation (without its prefix fast paths, which only skipped the regex)."""
    parts: list[str] = []
    i = 0
    n = len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\":
            if i + 1 >= n:
                raise PatternError(f"invalid pattern {pattern!r}: dangling '\\' at the end")
            parts.append(re.escape(pattern[i + 1]))
            i += 2
        elif c == "*":
            parts.append(".*")
            i += 1
        elif c == "?":
            parts.append(".")
            i += 1
        elif c == "[":
            rx, i = _reference_class(pattern, i)
            parts.append(rx)
        else:
            parts.append(re.escape(c))
            i += 1
    return re.compile("".join(parts), re.DOTALL)


def _stars(pattern: str) -> int:
    """Stars outside classes and escapes, each one (the old regex made ``**`` two ``.*``)."""
    return sum(1 for item in _dp_items(pattern) if item is None)


def _reference_is_cheap(pattern: str, key: str) -> bool:
    return (len(key) + 1) ** _stars(pattern) <= 200_000


def _dp_matches(regex_items: list[re.Pattern[str] | None], key: str) -> bool:
    """Glob DP over (item, position); None is a star, else a one-character regex."""
    n = len(key)
    row = [True] + [False] * n
    for item in regex_items:
        if item is None:
            for j in range(1, n + 1):
                row[j] = row[j] or row[j - 1]
        else:
            row = [False] + [row[j - 1] and item.fullmatch(key[j - 1]) is not None
                             for j in range(1, n + 1)]
    return row[n]


def _dp_items(pattern: str) -> list[re.Pattern[str] | None]:
    items: list[re.Pattern[str] | None] = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "*":
            items.append(None)
            i += 1
            continue
        if c == "\\":
            rx, i = re.escape(pattern[i + 1]), i + 2
        elif c == "?":
            rx, i = ".", i + 1
        elif c == "[":
            rx, i = _reference_class(pattern, i)
        else:
            rx, i = re.escape(c), i + 1
        items.append(re.compile(rx, re.DOTALL))
    return items


_ALPHABET = "aab-]\\[!^*?xé"


def _gen_class(rng: random.Random) -> str:
    out = ["["]
    if rng.random() < 0.3:
        out.append(rng.choice("!^"))
    if rng.random() < 0.15:
        out.append("]")  # a leading ']' is a member
    for _ in range(rng.randint(1, 3)):
        r = rng.random()
        c = rng.choice("abx-é")
        if r < 0.2:
            out.append("\\" + rng.choice("]\\-!a"))
        elif r < 0.5:
            lo, hi = sorted(rng.choice("abxz") for _ in range(2))
            out.append(f"{lo}-{hi}")
        else:
            out.append(c)
    if rng.random() < 0.97:
        out.append("]")  # sometimes never closed
    return "".join(out)


def _gen_pattern(rng: random.Random) -> str:
    out: list[str] = []
    for _ in range(rng.randint(0, 14)):
        r = rng.random()
        if r < 0.35:
            out.append(rng.choice("aab"))
        elif r < 0.6:
            out.append("*" * rng.choice([1, 1, 1, 2]))
        elif r < 0.7:
            out.append("?")
        elif r < 0.82:
            out.append(_gen_class(rng))
        elif r < 0.92:
            out.append("\\" + rng.choice(_ALPHABET))
        else:
            out.append(rng.choice("]-!^é"))
    if rng.random() < 0.02:
        out.append("\\")  # dangling
    return "".join(out)


def _gen_key_for(rng: random.Random, pattern: str, size: int) -> str:
    """A key built to (nearly) match ``pattern``: stars expand to filler, then maybe a flip."""
    out: list[str] = []
    i = 0
    filler = max(0, size)
    while i < len(pattern):
        c = pattern[i]
        if c == "*":
            take = rng.randint(0, filler)
            filler -= take
            out.append("".join(rng.choice("aab") for _ in range(take)))
            i += 1
        elif c == "\\" and i + 1 < len(pattern):
            out.append(pattern[i + 1])
            i += 2
        elif c == "?":
            out.append(rng.choice("abé"))
            i += 1
        elif c == "[":
            out.append(rng.choice("abxz-]é!"))
            end = pattern.find("]", i + 2)
            i = len(pattern) if end < 0 else end + 1
        else:
            out.append(c)
            i += 1
    key = "".join(out)
    if key and rng.random() < 0.3:
        k = rng.randrange(len(key))
        key = key[:k] + rng.choice("abx") + key[k + 1:]
    return key


def _gen_key(rng: random.Random, pattern: str) -> str:
    r = rng.random()
    size = rng.choice([0, 3, 10, 40, 200, 1000])
    if r < 0.6:
        return _gen_key_for(rng, pattern, size)
    return "".join(rng.choice(_ALPHABET) for _ in range(rng.randint(0, size)))


def _step_bound(pattern: str, key: str) -> int:
    return (len(pattern) + 1) * (len(key) + 1)


def _check(pattern: str, key: str, counts: dict[str, int]) -> None:
    p = compile_pattern(pattern)
    got = p.matches(key)
    counted, steps = p.match_steps(key)
    assert counted is got, (pattern, key)
    assert steps <= _step_bound(pattern, key), (pattern, len(key), steps)
    if _reference_is_cheap(pattern, key):
        expected = _reference_regex(pattern).fullmatch(key) is not None
        assert got is expected, (pattern, key)
        counts["regex"] += 1
    if (len(pattern) + 1) * (len(key) + 1) <= 4_000:
        assert got is _dp_matches(_dp_items(pattern), key), (pattern, key)
        counts["dp"] += 1
    if got:
        assert key.startswith(p.prefix)
        counts["matched"] += 1
    counts["checked"] += 1


@pytest.mark.parametrize("seed", range(4))
def test_agrees_with_the_old_regex_and_stays_within_the_step_bound(seed: int) -> None:
    """Seeded random patterns (escapes, classes, lone ']', '^' negation) and keys up to 1 KB."""
    rng = random.Random(1400 + seed)
    counts = {"checked": 0, "regex": 0, "dp": 0, "matched": 0, "errors": 0}
    for _ in range(700):
        pattern = _gen_pattern(rng)
        try:
            ref = _reference_regex(pattern)
        except PatternError as e:
            # Same error, same message.
            with pytest.raises(PatternError) as info:
                compile_pattern(pattern)
            assert str(info.value) == str(e)
            counts["errors"] += 1
            continue
        assert ref is not None
        for _ in range(6):
            _check(pattern, _gen_key(rng, pattern), counts)
    # The generator exercises every branch it is meant to.
    assert counts["checked"] > 3_000
    assert counts["regex"] > counts["checked"] // 2
    assert counts["dp"] > 500
    assert 0.1 < counts["matched"] / counts["checked"] < 0.9
    assert counts["errors"] > 5


@pytest.mark.parametrize("stars", [1, 2, 3, 5, 8, 12, 16, 20])
def test_star_families_stay_within_the_step_bound(stars: int) -> None:
    """The ``*a...*b`` family that made the old regex exponential: up to 20 stars, 1 KB keys."""
    rng = random.Random(stars)
    patterns = ["*a" * stars + "b", "*a" * stars + "*b", "*a" * (stars - 1) + "*",
                "a*" * stars + "b", "*?" * stars + "b", "*[a]" * stars + "*[!a]",
                "*" + "a*" * stars + "a"]
    counts = {"checked": 0, "regex": 0, "dp": 0, "matched": 0}
    for pattern in patterns:
        for key in ["a" * 40, "0000" + "a" * 50, "a" * 1024, "a" * 1023 + "b",
                    "a" * 512 + "b" + "a" * 511, "".join(rng.choice("ab") for _ in range(1024)),
                    "", "b", "ab" * stars]:
            _check(pattern, key, counts)
    assert counts["checked"] == len(patterns) * 9
    assert counts["matched"] > 0


def test_the_issue_reproductions_complete() -> None:
    """issue 14 item 6: both took seconds to forever with the regex; now a bounded number of
    steps (and the right answer: none of these keys ends with 'b')."""
    p = compile_pattern("*a" * 12 + "b")
    assert p.matches("a" * 40) is False
    assert p.match_steps("a" * 40)[1] <= _step_bound(p.source, "a" * 40)
    q = compile_pattern("*a" * 8 + "*b")
    key = "0000" + "a" * 50
    assert q.matches(key) is False
    assert q.match_steps(key)[1] <= _step_bound(q.source, key)
    assert q.matches(key + "b") is True


@pytest.mark.parametrize(
    ("pattern", "key"),
    [("*a*a*a*b", "a" * 300), ("*?*?*?*?*b", "a" * 300), ("*[ab]*[!x]*a*b", "ab" * 150)],
)
def test_steps_grow_at_most_linearly_in_the_key(pattern: str, key: str) -> None:
    """Doubling the key at most doubles the steps (plus the pattern's length): not a power."""
    p = compile_pattern(pattern)
    _, small = p.match_steps(key)
    _, big = p.match_steps(key * 2)
    assert big <= 2 * small + 2 * len(pattern) + 2
