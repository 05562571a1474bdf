"""Acceptance 4: every error kind, raised with a clear message, and nothing changed."""

from __future__ import annotations

import math

import pytest

from node import (
    BrokerUnavailable,
    InvalidKey,
    InvalidNamespace,
    InvalidValue,
    KeyNotFound,
    PatternError,
    SharedMemory,
    SharedMemoryConfig,
    SharedMemoryError,
    StorageError,
)
from tests.conftest import BrokerProcess, free_port_pair

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def shm(broker_process: BrokerProcess):
    config = SharedMemoryConfig(namespace="errs", broker=broker_process.address, max_keys=3)
    with SharedMemory(config) as s:
        s.set("a", 1)
        yield s


def unchanged(shm: SharedMemory):
    before = shm.broker_digest()

    class Guard:
        def __enter__(self) -> None:
            return None

        def __exit__(self, *exc: object) -> None:
            assert shm.broker_digest() == before, "a refused call changed the broker state"
            assert shm.local_digest() == before

    return Guard()


def test_max_keys_refused_and_nothing_written(shm: SharedMemory) -> None:
    shm.set("b", 2)
    shm.set("c", 3)
    with unchanged(shm), pytest.raises(StorageError, match="full.*max_keys 3"):
        shm.set("d", 4)
    with unchanged(shm), pytest.raises(StorageError, match="max_keys"):
        shm.set_many({"a": 10, "e": 5})  # one new key too many: the whole batch is refused
    assert shm.get("a") == 1
    shm.set("a", 11)  # overwriting an existing key needs no room
    assert shm.delete("c") is True
    shm.set("d", 4)
    assert shm.list_keys() == ["a", "b", "d"]


@pytest.mark.parametrize("key, fragment", [
    ("", "empty"),
    ("x" * 1025, "1025 bytes"),
    ("bad\nkey", "control character"),
    ("nul\x00", "control character"),
    (42, "must be a str"),
    ("\ud800", "UTF-8"),
])
def test_invalid_keys(shm: SharedMemory, key: object, fragment: str) -> None:
    with unchanged(shm):
        for call in (lambda: shm.set(key, 1), lambda: shm.get(key), lambda: shm.exists(key),
                     lambda: shm.delete(key), lambda: shm.get_metadata(key),
                     lambda: shm.set_many({key: 1})):
            with pytest.raises(InvalidKey, match=fragment):
                call()


@pytest.mark.parametrize("value, fragment", [
    ({1, 2}, "set"),
    (b"raw", "bytes"),
    (math.nan, "nan"),
    (math.inf, "inf"),
    (object(), "object"),
    ({"k": {1: "int key"}}, "dict key"),
    ("x" * (1024 * 1024 + 1), "limit"),
])
def test_invalid_values(shm: SharedMemory, value: object, fragment: str) -> None:
    with unchanged(shm):
        with pytest.raises(InvalidValue, match=fragment):
            shm.set("v", value)
        with pytest.raises(InvalidValue, match=fragment):
            shm.set_many({"ok": 1, "v": value})
    assert not shm.exists("v") and not shm.exists("ok")


@pytest.mark.parametrize("pattern", ["user_[0-9", "trailing\\", "[", "[!"])
def test_invalid_patterns(shm: SharedMemory, pattern: str) -> None:
    with pytest.raises(PatternError, match="invalid pattern"):
        shm.list_keys(pattern)


def test_key_not_found_and_default(shm: SharedMemory) -> None:
    with pytest.raises(KeyNotFound, match="'missing'.*'errs'"):
        shm.get("missing")
    with pytest.raises(KeyNotFound):
        shm.get_metadata("missing")
    assert shm.get("missing", None) is None
    assert shm.delete("missing") is False
    assert issubclass(KeyNotFound, SharedMemoryError)


def test_bad_ttl_is_invalid_value(shm: SharedMemory) -> None:
    with unchanged(shm):
        for ttl in (-1, math.nan, "soon"):
            with pytest.raises(InvalidValue, match="ttl"):
                shm.set("t", 1, ttl=ttl)


def test_config_validation_names_the_field() -> None:
    for kwargs, field in [
        ({"max_keys": -1}, "max_keys"),
        ({"ttl": -5}, "ttl"),
        ({"ttl": "1h"}, "ttl"),
        ({"namespace": "has space"}, "namespace"),
        ({"namespace": ""}, "namespace"),
        ({"broker": "http://x"}, "broker"),
        ({"request_timeout": 0}, "request_timeout"),
    ]:
        with pytest.raises(ValueError, match=field):
            SharedMemoryConfig(**kwargs)
    with pytest.raises(InvalidNamespace):
        SharedMemoryConfig(namespace="a/b")


def test_namespace_reopened_with_other_max_keys(shm: SharedMemory,
                                                broker_process: BrokerProcess) -> None:
    # Settings belong to the namespace (issue 12): the later handle adopts max_keys=3 and
    # warns (tests/integration/test_defaults.py checks the warning); it is not refused.
    with SharedMemory(SharedMemoryConfig(namespace="errs", broker=broker_process.address,
                                         max_keys=7)) as other:
        assert other.config.max_keys == 3


def test_unreachable_broker_names_the_address() -> None:
    port = free_port_pair()
    address = f"tcp://127.0.0.1:{port}"
    with pytest.raises(BrokerUnavailable, match=address):
        SharedMemory(SharedMemoryConfig(broker=address, connect_timeout=0.5))
