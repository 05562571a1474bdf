"""Glob patterns for ``list_keys``: ``*``, ``?``, ``[abc]``, ``[a-z]``, ``[!a]``/``[^a]``, ``\\``.

Pure. A pattern compiles once to a regex plus its literal prefix; the prefix lets the state
answer from its ordered key index (a range scan) instead of testing every key. ``fnmatch`` is not
used because it has no escape character and accepts unclosed ``[`` silently; the contract wants a
PatternError for those.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from broker.errors import PatternError


@dataclass(frozen=True, slots=True)
class Pattern:
    """A compiled glob: ``prefix`` is the literal text every match starts with."""

    source: str
    prefix: str
    regex: re.Pattern[str] | None  # None: the pattern is exactly ``prefix*`` (or ``prefix``)
    exact: bool  # True: no wildcard at all, matches only ``prefix`` itself

    def matches(self, key: str) -> bool:
        if self.exact:
            return key == self.prefix
        if self.regex is None:
            return key.startswith(self.prefix)
        return self.regex.fullmatch(key) is not None


def _parse_class(pattern: str, i: int) -> tuple[str, int]:
    """Translate the ``[...]`` starting at ``pattern[i] == '['``; return (regex, next index)."""
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


def compile_pattern(pattern: str) -> Pattern:
    """Compile a glob, raising PatternError with the position of the first problem."""
    if not isinstance(pattern, str):
        raise PatternError(f"pattern must be a str, got {type(pattern).__name__}")
    return _compile(pattern)


@lru_cache(maxsize=1024)
def _compile(pattern: str) -> Pattern:
    parts: list[str] = []
    prefix_chars: list[str] = []
    in_prefix = True
    only_trailing_star = False
    i = 0
    n = len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\":
            if i + 1 >= n:
                raise PatternError(f"invalid pattern {pattern!r}: dangling '\\' at the end")
            lit = pattern[i + 1]
            parts.append(re.escape(lit))
            if in_prefix:
                prefix_chars.append(lit)
            i += 2
            continue
        if c == "*":
            parts.append(".*")
            if in_prefix:
                only_trailing_star = pattern[i:] == "*" * (n - i)
            in_prefix = False
            i += 1
            continue
        if c == "?":
            parts.append(".")
            in_prefix = False
            only_trailing_star = False
            i += 1
            continue
        if c == "[":
            regex, i = _parse_class(pattern, i)
            parts.append(regex)
            in_prefix = False
            only_trailing_star = False
            continue
        if c == "]":
            # A lone ']' is a literal, as in fnmatch and Redis.
            parts.append(re.escape(c))
            if in_prefix:
                prefix_chars.append(c)
            i += 1
            continue
        parts.append(re.escape(c))
        if in_prefix:
            prefix_chars.append(c)
        i += 1
    prefix = "".join(prefix_chars)
    if in_prefix:
        return Pattern(pattern, prefix, None, exact=True)
    if only_trailing_star:
        return Pattern(pattern, prefix, None, exact=False)
    return Pattern(pattern, prefix, re.compile("".join(parts), re.DOTALL), exact=False)
