"""Validation of keys, namespaces and values: pure, used by the node before sending and by the
broker before deciding (a peer that skipped the node's checks is still refused).

Values are encoded to JSON exactly once, here, by the writer. We walk the value first because
msgspec (like most fast encoders) happily encodes sets, bytes, NaN, datetimes and dataclasses;
the contract says those are not JSON and must raise InvalidValue.
"""

from __future__ import annotations

import itertools
import math
import re

import msgspec

from broker.errors import InvalidKey, InvalidNamespace, InvalidValue

MAX_KEY_BYTES = 1024
DEFAULT_MAX_VALUE_BYTES = 1024 * 1024
MAX_VALUE_DEPTH = 256
# Versions travel as msgpack ints; int64 is what every peer (and msgspec) carries exactly.
VERSION_LIMIT = 2**63
# Ten years: a deadline this far ahead still converts to a datetime (get_metadata's
# expires_at) on any clock before the year 9989, and is longer than any cache entry needs.
MAX_TTL_SECONDS = 10 * 365 * 86400

_NAMESPACE_RE = re.compile(r"[A-Za-z0-9_.\-]{1,128}")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # Unicode category Cc

_json_encoder = msgspec.json.Encoder()


ENDPOINT_SCHEMES = ("tcp://", "ipc://", "inproc://")


def has_scheme(endpoint: object, schemes: tuple[str, ...] = ENDPOINT_SCHEMES) -> bool:
    """True if ``endpoint`` is a string starting with one of ``schemes``. The one endpoint
    scheme check of the config, the CLI and ``python -m broker``."""
    return isinstance(endpoint, str) and endpoint.startswith(schemes)


def scheme_hint(endpoint: object) -> str:
    """`` (did you mean 'tcp://HOST:PORT'?)`` for the common slip of a bare ``host:port``,
    else ``""``: appended to the message of a refused endpoint."""
    if isinstance(endpoint, str) and "://" not in endpoint and ":" in endpoint:
        return f" (did you mean 'tcp://{endpoint}'?)"
    return ""


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


def check_version(v: object, name: str = "if_version") -> int | None:
    """Return ``v`` if it is None or an int with 0 <= v < 2**63, else raise InvalidValue."""
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < VERSION_LIMIT:
        raise InvalidValue(f"{name} must be an int from 0 to 2**63 - 1 (0 = absent), got {v!r}")
    return v


def check_ttl_bound(ttl: float) -> float:
    """Return ``ttl`` (finite, >= 0 already) if it is at most MAX_TTL_SECONDS."""
    if ttl > MAX_TTL_SECONDS:
        raise InvalidValue(
            f"ttl must be at most {MAX_TTL_SECONDS} seconds (10 years), got {ttl!r}")
    return ttl


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


# Bracket depth of JSON bytes without recursion: drop strings (brackets inside them do not
# nest), keep only the bracket bytes, and take the running sum's maximum -- all in C.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKETS = bytes(range(256)).translate(None, b"[]{}")
_BRACKET_STEP = [0] * 256
for _b in b"[{":
    _BRACKET_STEP[_b] = 1
for _b in b"]}":
    _BRACKET_STEP[_b] = -1


def json_bracket_depth(data: bytes) -> int:
    """The deepest nesting of ``[``/``{`` in JSON bytes (0 for a scalar); never recurses."""
    brackets = _JSON_STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    if not brackets:
        return 0
    return max(0, max(itertools.accumulate(map(_BRACKET_STEP.__getitem__, brackets))))


def check_encoded_value(key: str, data: bytes, max_value_bytes: int) -> None:
    """Broker-side check of a value that arrived already encoded: size, nesting depth (the
    node's rule exactly, checked without recursion before anything decodes it) and
    well-formedness."""
    if len(data) > max_value_bytes:
        raise InvalidValue(
            f"value for key {key!r} is {len(data)} bytes of JSON; the limit is {max_value_bytes}"
        )
    # Fewer opening brackets than the limit cannot nest too deep: skip the scan (two counts).
    opens = data.count(b"[") + data.count(b"{")
    depth = json_bracket_depth(data) if opens > MAX_VALUE_DEPTH else 0
    # The node counts element depth: the innermost container of bracket depth 257 is at
    # element depth 256 and passes if empty; anything deeper never does.
    if depth > MAX_VALUE_DEPTH + 1:
        raise InvalidValue(f"value for key {key!r} is nested deeper than {MAX_VALUE_DEPTH} levels")
    try:
        decoded = msgspec.json.decode(data)
    except msgspec.DecodeError as exc:
        raise InvalidValue(f"value for key {key!r} is not valid JSON: {exc}") from None
    if depth > MAX_VALUE_DEPTH:
        _check_json(decoded, key, 0)  # recursion of at most 257 frames: safe
