"""Glob patterns for ``list_keys``: ``*``, ``?``, ``[abc]``, ``[a-z]``, ``[!a]``/``[^a]``, ``\\``.

Pure. A pattern compiles once to its literal prefix and a matcher whose worst case is
O(len(pattern) x len(key)) -- never exponential, whatever the pattern (issue 14 item 6: a
backtracking regex took exponential time on ``"*a"*12 + "b"``). The prefix lets the state answer
from its ordered key index (a range scan) instead of testing every key. ``fnmatch`` is not used
because it has no escape character, accepts unclosed ``[`` silently, and translates to the same
backtracking regex.

Theory of operation. Every token but ``*`` matches exactly one character, so a pattern is
``S0 * S1 * ... * Sk``: segments of one-character items between stars. With no star, the key
matches iff it has ``len(S0)`` characters and each matches its item. With stars, ``S0`` must
match at the start, ``Sk`` at the end, and the middle segments in order in between: taking the
leftmost place for each middle segment is never wrong (whatever a later place would leave for
the rest, an earlier one leaves more, and a star absorbs the difference), so there is no
backtracking at all. Each segment is searched for once, over at most the whole key:
O(len(Si) x len(key)) per segment, O(len(pattern) x len(key)) in all.

The primitives are C: ``str.startswith``/``str.find`` for an all-literal segment, otherwise a
regex of the segment's items, which has no quantifier and no alternation, so ``re`` never
backtracks in it (it tries each start position once, at most len(segment) steps each).
``Pattern.match_steps`` runs the same driver with pure-Python primitives that count every
item-against-character comparison; tests use it to prove the bound without timing anything.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

from broker.errors import PatternError


@dataclass(frozen=True, slots=True)
class _Class:
    """A precompiled ``[...]``: member characters, inclusive ranges, and negation."""

    chars: frozenset[str]
    ranges: tuple[tuple[str, str], ...]
    negate: bool

    def accepts(self, c: str) -> bool:
        hit = c in self.chars or any(lo <= c <= hi for lo, hi in self.ranges)
        return hit is not self.negate

    def regex(self) -> str:
        body = "".join(re.escape(c) for c in sorted(self.chars))
        body += "".join(f"{re.escape(lo)}-{re.escape(hi)}" for lo, hi in self.ranges)
        return f"[^{body}]" if self.negate else f"[{body}]"


# One item matches one character: a literal str of length 1, ANY (``?``), or a _Class.
_ANY = None
_Item = str | _Class | None


def _item_accepts(item: _Item, c: str) -> bool:
    if item is None:
        return True
    if isinstance(item, str):
        return item == c
    return item.accepts(c)


def _item_regex(item: _Item) -> str:
    if item is None:
        return "."
    if isinstance(item, str):
        return re.escape(item)
    return item.regex()


@dataclass(frozen=True, slots=True)
class _Segment:
    """One-character items between two stars, with a C primitive to place them."""

    items: tuple[_Item, ...]
    literal: str | None  # the segment as text when every item is a literal
    regex: re.Pattern[str] | None  # quantifier-free, when some item is not a literal

    @classmethod
    def of(cls, items: list[_Item]) -> _Segment:
        if all(isinstance(i, str) for i in items):
            return cls(tuple(items), "".join(items), None)  # type: ignore[arg-type]
        rx = re.compile("".join(_item_regex(i) for i in items), re.DOTALL)
        return cls(tuple(items), None, rx)

    def at(self, key: str, pos: int) -> bool:
        """Whether the segment matches ``key`` at ``pos`` (the caller checked the length)."""
        if self.literal is not None:
            return key.startswith(self.literal, pos)
        assert self.regex is not None
        return self.regex.match(key, pos) is not None

    def find(self, key: str, pos: int, end: int) -> int:
        """Leftmost place >= ``pos`` where the segment fits within ``key[:end]``, or -1."""
        if self.literal is not None:
            return key.find(self.literal, pos, end)
        assert self.regex is not None
        m = self.regex.search(key, pos, end)
        return -1 if m is None else m.start()

    # Counting twins: the same answers, one step per item-against-character comparison.

    def at_counted(self, key: str, pos: int, steps: list[int]) -> bool:
        for k, item in enumerate(self.items):
            steps[0] += 1
            if not _item_accepts(item, key[pos + k]):
                return False
        return True

    def find_counted(self, key: str, pos: int, end: int, steps: list[int]) -> int:
        for start in range(pos, end - len(self.items) + 1):
            if self.at_counted(key, start, steps):
                return start
        steps[0] += 1  # an empty search range still costs the call
        return -1


@dataclass(frozen=True, slots=True)
class Pattern:
    """A compiled glob: ``prefix`` is the literal text every match starts with."""

    source: str
    prefix: str
    exact: bool  # True: no wildcard at all, matches only ``prefix`` itself
    prefix_only: bool  # True: exactly ``prefix*`` -- a match is ``key.startswith(prefix)``
    segments: tuple[_Segment, ...]  # S0 .. Sk (one segment when there is no star)
    min_len: int  # characters any match has at least (sum of the segments' lengths)

    def matches(self, key: str) -> bool:
        """Whether ``key`` matches; O(len(pattern) x len(key)) in the worst case."""
        if self.exact:
            return key == self.prefix
        if self.prefix_only:
            return key.startswith(self.prefix)
        return self._run(key, None)

    def select(self, keys: Iterable[str]) -> list[str]:
        """The keys that match, in their order."""
        if self.exact:
            return [k for k in keys if k == self.prefix]
        if self.prefix_only:
            prefix = self.prefix
            return [k for k in keys if k.startswith(prefix)]
        run = self._run
        return [k for k in keys if run(k, None)]

    def match_steps(self, key: str) -> tuple[bool, int]:
        """(matches, steps) by the counting twin of the matcher: for tests of the bound."""
        if self.exact or self.prefix_only:
            return self.matches(key), min(len(key), len(self.prefix)) + 1
        steps = [0]
        return self._run(key, steps), steps[0]

    def _run(self, key: str, steps: list[int] | None) -> bool:
        n = len(key)
        segs = self.segments
        if len(segs) == 1:  # no star: a fixed-length match
            if n != self.min_len:
                return False
            return segs[0].at(key, 0) if steps is None else segs[0].at_counted(key, 0, steps)
        if n < self.min_len:
            return False
        head, tail = segs[0], segs[-1]
        end = n - len(tail.items)
        if steps is None:
            if not (head.at(key, 0) and tail.at(key, end)):
                return False
        elif not (head.at_counted(key, 0, steps) and tail.at_counted(key, end, steps)):
            return False
        pos = len(head.items)
        for seg in segs[1:-1]:
            # Leftmost placement is always safe (module docstring): no backtracking.
            if steps is None:
                i = seg.find(key, pos, end)
            else:
                i = seg.find_counted(key, pos, end, steps)
            if i < 0:
                return False
            pos = i + len(seg.items)
        return True


def _parse_class(pattern: str, i: int) -> tuple[_Class, int]:
    """Parse the ``[...]`` starting at ``pattern[i] == '['``; return (class, next index)."""
    j = i + 1
    negate = False
    if j < len(pattern) and pattern[j] in "!^":
        negate = True
        j += 1
    chars: set[str] = set()
    ranges: list[tuple[str, str]] = []
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
            ranges.append((c, hi))
            j += 3
        else:
            chars.add(c)
            j += 1
    return _Class(frozenset(chars), tuple(ranges), negate), j


def compile_pattern(pattern: str) -> Pattern:
    """Compile a glob, raising PatternError with the position of the first problem."""
    if not isinstance(pattern, str):
        raise PatternError(f"pattern must be a str, got {type(pattern).__name__}")
    return _compile(pattern)


@lru_cache(maxsize=1024)
def _compile(pattern: str) -> Pattern:
    segments: list[list[_Item]] = [[]]
    prefix_chars: list[str] = []
    in_prefix = True
    i = 0
    n = len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\":
            if i + 1 >= n:
                raise PatternError(f"invalid pattern {pattern!r}: dangling '\\' at the end")
            item: _Item = pattern[i + 1]
            i += 2
        elif c == "*":
            if segments[-1] or len(segments) == 1:
                segments.append([])  # consecutive stars are one star
            in_prefix = False
            i += 1
            continue
        elif c == "?":
            item = _ANY
            i += 1
        elif c == "[":
            item, i = _parse_class(pattern, i)
        else:
            # Includes a lone ']', a literal as in fnmatch and Redis.
            item = c
            i += 1
        if in_prefix:
            if isinstance(item, str):
                prefix_chars.append(item)
            else:
                in_prefix = False
        segments[-1].append(item)
    prefix = "".join(prefix_chars)
    exact = len(segments) == 1 and all(isinstance(it, str) for it in segments[0])
    prefix_only = (len(segments) == 2 and not segments[1]
                   and all(isinstance(it, str) for it in segments[0]))
    return Pattern(
        source=pattern,
        prefix=prefix,
        exact=exact,
        prefix_only=prefix_only,
        segments=tuple(_Segment.of(s) for s in segments),
        min_len=sum(len(s) for s in segments),
    )
