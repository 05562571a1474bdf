"""The broker's depth check of encoded values agrees with the node's check of Python values."""

from __future__ import annotations

import random

import msgspec
import pytest

from broker.errors import InvalidValue
from broker.validation import (
    MAX_VALUE_DEPTH,
    check_encoded_value,
    encode_value,
    json_bracket_depth,
)

_STRINGS = ["", "[", "]{", '"[', '\\"[[', "\\", "é[}", "x" * 5]


def _nested(rng: random.Random, depth: int) -> object:
    """A value whose deepest element is at ``depth``, with noise around the spine."""
    inner: object = rng.choice([1, "s[", None, [], {}, 2.5, rng.choice(_STRINGS)])
    for _ in range(depth):
        siblings = [rng.choice(_STRINGS) for _ in range(rng.randint(0, 2))]
        if rng.random() < 0.5:
            inner = [*siblings, inner]
        else:
            inner = {f"k{s}": s for s in siblings} | {rng.choice(_STRINGS) + "k": inner}
    return inner


def _node_accepts(value: object) -> bool:
    try:
        encode_value("k", value, 1 << 30)
    except InvalidValue:
        return False
    return True


def _broker_accepts(data: bytes) -> bool:
    try:
        check_encoded_value("k", data, 1 << 30)
    except InvalidValue:
        return False
    return True


def _depth(value: object) -> int:
    """Bracket depth of a decoded value (recursive: only for the shallow values here)."""
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    return 0


@pytest.mark.parametrize("seed", range(3))
def test_broker_and_node_agree_around_the_depth_limit(seed: int) -> None:
    rng = random.Random(seed)
    outcomes = set()
    for _ in range(300):
        value = _nested(rng, rng.randint(MAX_VALUE_DEPTH - 3, MAX_VALUE_DEPTH + 3))
        data = msgspec.json.encode(value)
        assert json_bracket_depth(data) == _depth(value)
        node = _node_accepts(value)
        assert _broker_accepts(data) is node, (json_bracket_depth(data), data[-40:])
        outcomes.add(node)
    assert outcomes == {True, False}


@pytest.mark.parametrize("seed", range(3))
def test_bracket_depth_ignores_brackets_inside_strings(seed: int) -> None:
    rng = random.Random(100 + seed)
    for _ in range(300):
        value = _nested(rng, rng.randint(0, 20))
        data = msgspec.json.encode(value)
        assert json_bracket_depth(data) == _depth(value), data


def test_deep_garbage_is_invalid_value_without_recursion() -> None:
    for data in (b"[" * 1_000_000, b"{" * 500_000 + b"]" * 10, b'[' * 300 + b'"' + b"]" * 300):
        with pytest.raises(InvalidValue):
            check_encoded_value("k", data, 1 << 30)
