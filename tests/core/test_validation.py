"""Keys, namespaces and values: the caller's-fault errors raised before anything is sent."""

from __future__ import annotations

import datetime
import decimal
import math
from collections.abc import Callable

import msgspec
import pytest

from broker.errors import InvalidKey, InvalidNamespace, InvalidValue, SharedMemoryError
from broker.validation import (
    MAX_KEY_BYTES,
    MAX_VALUE_DEPTH,
    check_encoded_value,
    check_key,
    check_namespace,
    encode_value,
)


def _nest(levels: int) -> object:
    """``levels`` nested lists around one int (the int sits at depth ``levels``)."""
    value: object = 0
    for _ in range(levels):
        value = [value]
    return value


# --------------------------------------------------------------------------- keys


@pytest.mark.parametrize(
    "key",
    [
        "a",
        "user:42/profile",
        "ключ",  # Cyrillic
        "キー",  # Japanese
        "emoji-\U0001F600",  # outside the BMP: 4 UTF-8 bytes
        "spaces are fine",
        "a" * MAX_KEY_BYTES,
        "é" * (MAX_KEY_BYTES // 2),  # exactly 1024 bytes, 512 characters
        "*?[]\\",  # glob characters are legal in keys
    ],
)
def test_valid_keys_are_returned_unchanged(key: str) -> None:
    assert check_key(key) is key


def test_empty_key_is_invalid() -> None:
    with pytest.raises(InvalidKey, match="empty"):
        check_key("")


@pytest.mark.parametrize("key", [None, 1, b"bytes", ["a"], 1.5])
def test_non_str_key_is_invalid_and_names_the_type(key: object) -> None:
    with pytest.raises(InvalidKey) as info:
        check_key(key)
    assert type(key).__name__ in str(info.value)
    assert not isinstance(info.value, InvalidNamespace)


@pytest.mark.parametrize(
    "key",
    [
        "a" * (MAX_KEY_BYTES + 1),
        "é" * (MAX_KEY_BYTES // 2 + 1),  # 513 characters but 1026 bytes: bytes count
        "\U0001F600" * 257,  # 257 characters, 1028 bytes
    ],
)
def test_key_over_1024_utf8_bytes_is_invalid(key: str) -> None:
    with pytest.raises(InvalidKey) as info:
        check_key(key)
    message = str(info.value)
    assert str(len(key.encode("utf-8"))) in message
    assert str(MAX_KEY_BYTES) in message
    assert repr(key[:20])[:-1] in message  # the message quotes (the start of) the key


@pytest.mark.parametrize(
    ("key", "bad"),
    [
        ("a\x00b", "\x00"),
        ("line\nbreak", "\n"),
        ("tab\there", "\t"),
        ("cr\r", "\r"),
        ("\x1bescape", "\x1b"),
        ("del\x7f", "\x7f"),
        ("\x1f", "\x1f"),
    ],
)
def test_control_characters_are_invalid(key: str, bad: str) -> None:
    with pytest.raises(InvalidKey) as info:
        check_key(key)
    message = str(info.value)
    assert repr(bad) in message
    assert repr(key) in message  # names the key
    assert str(key.index(bad)) in message  # and the position


@pytest.mark.parametrize("ctrl", ["\x80", "\x85", "\x9f"])
def test_c1_control_characters_are_invalid(ctrl: str) -> None:
    with pytest.raises(InvalidKey):
        check_key(f"a{ctrl}b")


@pytest.mark.parametrize("key", ["\ud800", "ok\udfffok", "\udc80"])
def test_lone_surrogates_are_invalid(key: str) -> None:
    with pytest.raises(InvalidKey) as info:
        check_key(key)
    assert "UTF-8" in str(info.value)
    assert repr(key) in str(info.value)


def test_key_errors_are_shared_memory_errors_and_value_errors() -> None:
    with pytest.raises(SharedMemoryError):
        check_key("")
    with pytest.raises(ValueError):
        check_key("")
    assert InvalidKey.kind == "InvalidKey"


# --------------------------------------------------------------------------- namespaces


@pytest.mark.parametrize("ns", ["a", "A-b_c.1", "x" * 128, "...", "-", "0"])
def test_valid_namespaces(ns: str) -> None:
    assert check_namespace(ns) == ns


@pytest.mark.parametrize(
    "ns",
    ["", "x" * 129, "a b", "a/b", "a:b", "ns\x00", "ns\n", "é", "ns*", "a\\b"],
)
def test_invalid_namespaces_raise_invalid_namespace_naming_it(ns: str) -> None:
    with pytest.raises(InvalidNamespace) as info:
        check_namespace(ns)
    assert repr(ns) in str(info.value)
    # InvalidNamespace is an InvalidKey, so callers catching InvalidKey catch it too.
    assert isinstance(info.value, InvalidKey)
    assert info.value.kind == "InvalidNamespace"


@pytest.mark.parametrize("ns", [None, 3, b"ns"])
def test_non_str_namespace_is_invalid(ns: object) -> None:
    with pytest.raises(InvalidNamespace, match=type(ns).__name__):
        check_namespace(ns)


# --------------------------------------------------------------------------- values


class _Obj:
    pass


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ({1, 2}, "set"),
        (frozenset({1}), "frozenset"),
        (b"raw", "bytes"),
        (bytearray(b"raw"), "bytearray"),
        (_Obj(), "_Obj"),
        (datetime.datetime(2024, 1, 1), "datetime"),
        (datetime.date(2024, 1, 1), "date"),
        (decimal.Decimal("1.5"), "Decimal"),
        (1 + 2j, "complex"),
        ({"nested": [1, {"deeper": {3}}]}, "set"),
    ],
)
def test_non_json_values_are_invalid(value: object, fragment: str) -> None:
    with pytest.raises(InvalidValue) as info:
        encode_value("the-key", value)
    message = str(info.value)
    assert "'the-key'" in message
    assert fragment in message


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("wrap", [lambda x: x, lambda x: [x], lambda x: {"a": {"b": x}}])
def test_non_finite_floats_are_invalid(bad: float, wrap: Callable[[float], object]) -> None:
    with pytest.raises(InvalidValue) as info:
        encode_value("k1", wrap(bad))
    assert "'k1'" in str(info.value)
    assert "not JSON" in str(info.value)


@pytest.mark.parametrize("dict_key", [1, 1.5, None, ("t",), True])
def test_dict_with_non_str_key_is_invalid(dict_key: object) -> None:
    with pytest.raises(InvalidValue) as info:
        encode_value("k2", {"ok": 1, dict_key: 2})
    assert "'k2'" in str(info.value)
    assert type(dict_key).__name__ in str(info.value)


def test_nesting_limit_is_exact() -> None:
    data = encode_value("k", _nest(MAX_VALUE_DEPTH))
    assert msgspec.json.decode(data) == _nest(MAX_VALUE_DEPTH)
    with pytest.raises(InvalidValue) as info:
        encode_value("deep-key", _nest(MAX_VALUE_DEPTH + 1))
    assert "'deep-key'" in str(info.value)
    assert str(MAX_VALUE_DEPTH) in str(info.value)


def test_self_referencing_value_is_invalid_not_recursion_error() -> None:
    cyclic: list[object] = []
    cyclic.append(cyclic)
    with pytest.raises(InvalidValue):
        encode_value("k", cyclic)
    d: dict[str, object] = {}
    d["self"] = d
    with pytest.raises(InvalidValue):
        encode_value("k", d)


def test_size_limit_counts_encoded_json_bytes() -> None:
    assert encode_value("k", "12345678", max_value_bytes=10) == b'"12345678"'  # exactly 10
    with pytest.raises(InvalidValue) as info:
        encode_value("big-key", "123456789", max_value_bytes=10)  # 11 bytes
    message = str(info.value)
    assert "'big-key'" in message
    assert "11" in message and "10" in message
    # Multi-byte characters count as bytes, not characters.
    with pytest.raises(InvalidValue):
        encode_value("k", "éééé", max_value_bytes=9)  # 2 + 4*2 = 10 bytes


def test_default_size_limit_is_one_mebibyte() -> None:
    just_fits = "x" * (1024 * 1024 - 2)
    assert len(encode_value("k", just_fits)) == 1024 * 1024
    with pytest.raises(InvalidValue):
        encode_value("k", just_fits + "x")


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        False,
        0,
        -(2**63),
        2**64 - 1,
        0.1,
        -1.5e300,
        "",
        "unicode ✓ \U0001F600 \u2028",
        [],
        {},
        [1, "two", 3.0, None, [True, {"x": []}]],
        {"a": {"b": {"c": [1, 2, {"d": None}]}}, "é": "ü", "": 0},
    ],
)
def test_valid_json_round_trips(value: object) -> None:
    data = encode_value("k", value)
    assert isinstance(data, bytes)
    decoded = msgspec.json.decode(data)
    assert decoded == value
    assert type(decoded) is type(value)


def test_tuple_is_encoded_as_json_array() -> None:
    assert msgspec.json.decode(encode_value("k", (1, (2, 3)))) == [1, [2, 3]]


def test_check_encoded_value_refuses_oversized_and_malformed_json() -> None:
    check_encoded_value("k", b'{"a":1}', 7)
    with pytest.raises(InvalidValue, match="'k'"):
        check_encoded_value("k", b'{"a":1}', 6)
    for bad in (b"{", b"NaN", b"\xff", b"", b"[1,]"):
        with pytest.raises(InvalidValue, match="not valid JSON"):
            check_encoded_value("k", bad, 100)
