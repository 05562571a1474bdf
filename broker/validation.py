"""Validation of keys, namespaces and values: pure, used by the node before sending and by the
broker before deciding (a peer that skipped the node's checks is still refused).

Values are encoded to JSON exactly once, here, by the writer. We walk the value first because
msgspec (like most fast encoders) happily encodes sets, bytes, NaN, datetimes and dataclasses;
the contract says those are not JSON and must raise InvalidValue.
"""

from __future__ import annotations

import math
import re

import msgspec

from broker.errors import InvalidKey, InvalidNamespace, InvalidValue

MAX_KEY_BYTES = 1024
DEFAULT_MAX_VALUE_BYTES = 1024 * 1024
MAX_VALUE_DEPTH = 256

_NAMESPACE_RE = re.compile(r"[A-Za-z0-9_.\-]{1,128}")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # Unicode category Cc

_json_encoder = msgspec.json.Encoder()


def check_namespace(namespace: object) -> str:
    """Return ``namespace`` if it is ``[A-Za-z0-9_.-]{1,128}``, else raise InvalidNamespace."""
    if not isinstance(namespace, str):
        raise InvalidNamespace(f"namespace must be a str, got {type(namespace).__name__}")
    if not _NAMESPACE_RE.fullmatch(namespace):
        raise InvalidNamespace(
            f"invalid namespace {namespace!r}: use 1-128 characters from [A-Za-z0-9_.-]"
        )
    return namespace


def check_key(key: object) -> str:
    """Return ``key`` if it is a valid key, else raise InvalidKey saying what is wrong."""
    if not isinstance(key, str):
        raise InvalidKey(f"key must be a str, got {type(key).__name__}")
    if not key:
        raise InvalidKey("key must not be empty")
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise InvalidKey(f"key {key[:40]!r} is not valid UTF-8: {exc.reason}") from None
    if size > MAX_KEY_BYTES:
        raise InvalidKey(f"key {key[:40]!r}... is {size} bytes; the limit is {MAX_KEY_BYTES}")
    bad = _CONTROL_RE.search(key)
    if bad:
        raise InvalidKey(
            f"key {key[:80]!r} contains control character {bad.group()!r} at {bad.start()}"
        )
    return key


def _check_json(value: object, key: str, depth: int) -> None:
    if depth > MAX_VALUE_DEPTH:
        raise InvalidValue(f"value for key {key!r} is nested deeper than {MAX_VALUE_DEPTH} levels")
    if value is None or isinstance(value, (bool, str)):
        return
    if isinstance(value, int):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidValue(f"value for key {key!r} contains {value!r}, which is not JSON")
        return
    if isinstance(value, (list, tuple)):
        for item in value:
            _check_json(item, key, depth + 1)
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise InvalidValue(
                    f"value for key {key!r} has a dict key {k!r} of type "
                    f"{type(k).__name__}; JSON object keys must be str"
                )
            _check_json(v, key, depth + 1)
        return
    raise InvalidValue(
        f"value for key {key!r} contains a {type(value).__name__}, which is not JSON "
        "(use None, bool, int, float, str, list or dict)"
    )


def encode_value(key: str, value: object, max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES) -> bytes:
    """Encode ``value`` as JSON bytes, raising InvalidValue if it is not plain JSON or too big."""
    _check_json(value, key, 0)
    try:
        data = _json_encoder.encode(value)
    except (TypeError, ValueError, OverflowError, msgspec.EncodeError) as exc:
        raise InvalidValue(f"value for key {key!r} cannot be encoded as JSON: {exc}") from None
    if len(data) > max_value_bytes:
        raise InvalidValue(
            f"value for key {key!r} is {len(data)} bytes of JSON; the limit is {max_value_bytes}"
        )
    return data


def check_encoded_value(key: str, data: bytes, max_value_bytes: int) -> None:
    """Broker-side check of a value that arrived already encoded (size and well-formedness)."""
    if len(data) > max_value_bytes:
        raise InvalidValue(
            f"value for key {key!r} is {len(data)} bytes of JSON; the limit is {max_value_bytes}"
        )
    try:
        msgspec.json.decode(data)
    except msgspec.DecodeError as exc:
        raise InvalidValue(f"value for key {key!r} is not valid JSON: {exc}") from None
