"""Documented errors at the edges of versions, TTLs, request size and nesting depth (issue 14
item 7), on a real broker process: through the node, and from a raw zmq client that skips the
node's checks (the broker must refuse on its own)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import pytest
import zmq

from broker.errors import InvalidValue, VersionConflict
from broker.protocol import (
    Error,
    Hello,
    HelloReply,
    Request,
    Set,
    Touch,
    WriteOk,
    reply_codec,
    request_codec,
)
from broker.validation import MAX_TTL_SECONDS, MAX_VALUE_DEPTH
from node import SharedMemory, SharedMemoryConfig
from tests.conftest import BrokerProcess

pytestmark = pytest.mark.timeout(60)

BROKER_MESSAGE_LIMIT = 64 * 1024 * 1024  # BrokerConfig.max_message_bytes, the default


@contextmanager
def handle(broker: BrokerProcess, **kw: object) -> Iterator[SharedMemory]:
    cfg = SharedMemoryConfig(namespace=f"edge-{uuid.uuid4().hex[:8]}", broker=broker.address,
                             request_timeout=5.0, **kw)  # type: ignore[arg-type]
    with SharedMemory(cfg) as shm:
        yield shm


class RawClient:
    """A DEALER speaking the wire protocol directly, as a peer that skipped the node would."""

    def __init__(self, address: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)
        self.client_id = os.urandom(12)
        self.request_no = 0
        self.requests, self.replies = request_codec(), reply_codec()

    def call(self, request: Request) -> object:
        self.sock.send_multipart([b"", self.requests.encode(request)])
        assert self.sock.poll(10_000), "the broker did not answer"
        return self.replies.decode(self.sock.recv_multipart()[1])

    def set(self, namespace: str, key: str, value: bytes, *, ttl: float | None = None,
            if_version: int | None = None) -> object:
        self.request_no += 1
        return self.call(Set(self.client_id, self.request_no, namespace, 0, key, value, ttl,
                             if_version))

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


@pytest.fixture
def raw(broker_process: BrokerProcess) -> Iterator[RawClient]:
    client = RawClient(broker_process.address)
    try:
        yield client
    finally:
        client.close()


# --------------------------------------------------------------------------- versions


@pytest.mark.parametrize("version", [2**70, 2**64, 2**63, -1])
def test_out_of_range_if_version_is_invalid_value(broker_process: BrokerProcess,
                                                  version: int) -> None:
    """2**70 used to escape as a bare OverflowError from the request encoder."""
    with handle(broker_process) as shm:
        shm.set("k", 1)
        with pytest.raises(InvalidValue, match="if_version must be an int from 0 to 2\\*\\*63"):
            shm.set("k", 2, if_version=version)
        with pytest.raises(InvalidValue, match="if_version"):
            shm.delete("k", if_version=version)
        assert shm.get("k") == 1
        # The largest valid version is a plain compare-and-set that loses.
        with pytest.raises(VersionConflict):
            shm.set("k", 3, if_version=2**63 - 1)


@pytest.mark.parametrize("version", [2**63, 2**64 - 1, -1, -(2**63)])
def test_the_broker_refuses_out_of_range_versions_itself(raw: RawClient, version: int) -> None:
    """msgpack carries any int64 or uint64; the broker answered VersionConflict for these."""
    reply = raw.set("rawver", "k", b"1", if_version=version)
    assert isinstance(reply, Error) and reply.kind == "InvalidValue", reply
    assert "if_version" in reply.message
    assert isinstance(raw.set("rawver", "k", b"1", if_version=0), WriteOk)


# --------------------------------------------------------------------------- TTLs


@pytest.mark.parametrize("ttl", [1e12, MAX_TTL_SECONDS + 1, timedelta(days=365 * 11)])
def test_a_ttl_beyond_ten_years_is_invalid_value(broker_process: BrokerProcess,
                                                 ttl: object) -> None:
    """ttl=1e12 was accepted, and get_metadata() then raised ValueError/OverflowError."""
    with handle(broker_process) as shm:
        with pytest.raises(InvalidValue, match="at most 315360000 seconds"):
            shm.set("k", 1, ttl=ttl)  # type: ignore[arg-type]
        shm.set("k", 1, ttl=0)
        with pytest.raises(InvalidValue, match="at most 315360000 seconds"):
            shm.touch("k", ttl)  # type: ignore[arg-type]
        assert shm.get_metadata("k").expires_at is None


def test_get_metadata_is_valid_for_the_longest_ttl(broker_process: BrokerProcess) -> None:
    with handle(broker_process) as shm:
        shm.set("set", 1, ttl=MAX_TTL_SECONDS)
        shm.set("touched", 1, ttl=0)
        shm.touch("touched", MAX_TTL_SECONDS)
        for key in ("set", "touched"):
            expires = shm.get_metadata(key).expires_at
            assert expires is not None
            ahead = expires - datetime.now(UTC)
            assert timedelta(days=3649) < ahead <= timedelta(seconds=MAX_TTL_SECONDS)


def test_a_config_ttl_beyond_ten_years_is_refused() -> None:
    with pytest.raises(ValueError, match="ttl must be at most"):
        SharedMemoryConfig(ttl=1e12)
    assert SharedMemoryConfig(ttl=MAX_TTL_SECONDS).ttl == MAX_TTL_SECONDS


def test_the_broker_refuses_a_ttl_beyond_ten_years_itself(raw: RawClient) -> None:
    reply = raw.set("rawttl", "k", b"1", ttl=1e12)
    assert isinstance(reply, Error) and reply.kind == "InvalidValue", reply
    assert "at most" in reply.message
    assert isinstance(raw.set("rawttl", "k", b"1", ttl=0.0), WriteOk)
    raw.request_no += 1
    touch = raw.call(Touch(raw.client_id, raw.request_no, "rawttl", 0, "k", 1e12))
    assert isinstance(touch, Error) and touch.kind == "InvalidValue", touch


# --------------------------------------------------------------------------- request size


def test_the_hello_reply_states_the_message_limit(raw: RawClient) -> None:
    reply = raw.call(Hello(raw.client_id))
    assert isinstance(reply, HelloReply)
    assert reply.max_message_bytes == BROKER_MESSAGE_LIMIT


@pytest.mark.timeout(120)
def test_a_set_many_over_the_message_limit_is_refused_before_sending(
        broker_process: BrokerProcess) -> None:
    """70 values of about 1 MiB, each within max_value_bytes: the broker drops a 70 MiB frame
    unanswered, and the caller used to get BrokerUnavailable(outcome_unknown=True) after
    request_timeout for a write that can never succeed."""
    big = "x" * (1024 * 1024 - 64)
    with handle(broker_process) as shm:
        with pytest.raises(InvalidValue) as info:
            shm.set_many({f"big{i}": big for i in range(70)})
        message = str(info.value)
        assert "SetMany request is" in message and "bytes" in message
        assert f"message limit of {BROKER_MESSAGE_LIMIT} bytes" in message
        size = int(message.split("request is ")[1].split(" bytes")[0])
        assert size > BROKER_MESSAGE_LIMIT
        assert shm.list_keys("big*") == []
        # Within the limit, the same values go through.
        assert shm.set_many({f"big{i}": big for i in range(3)}) > 0
        assert shm.list_keys("big*") == ["big0", "big1", "big2"]


# --------------------------------------------------------------------------- nesting depth


@pytest.mark.parametrize("levels", [MAX_VALUE_DEPTH + 1, 900, 2000, 100_000])
def test_the_broker_refuses_values_nested_too_deep(raw: RawClient, levels: int) -> None:
    """A raw client stored 900 levels; at 2000 the reply was "internal broker error:
    RecursionError"."""
    value = b"[" * levels + b"1" + b"]" * levels
    reply = raw.set("deep", "k", value)
    assert isinstance(reply, Error) and reply.kind == "InvalidValue", reply
    assert f"nested deeper than {MAX_VALUE_DEPTH} levels" in reply.message
    objects = b'{"a":' * levels + b"1" + b"}" * levels
    reply = raw.set("deep", "k", objects)
    assert isinstance(reply, Error) and reply.kind == "InvalidValue", reply


def test_the_broker_accepts_what_the_node_accepts_at_the_depth_limit(
        broker_process: BrokerProcess, raw: RawClient) -> None:
    """The node's rule, exactly: 256 levels of elements. Brackets inside strings do not nest."""
    deepest: object = 1
    for _ in range(MAX_VALUE_DEPTH):
        deepest = [deepest]
    with handle(broker_process) as shm:
        shm.set("deepest", deepest)
        assert shm.get("deepest") == deepest
    n = MAX_VALUE_DEPTH
    assert isinstance(raw.set("deep", "ok", b"[" * n + b"1" + b"]" * n), WriteOk)
    assert isinstance(raw.set("deep", "empty", b"[" * (n + 1) + b"]" * (n + 1)), WriteOk)
    in_string = b'["' + b"[" * 5000 + b'\\"{' + b'"]'
    assert isinstance(raw.set("deep", "str", in_string), WriteOk)
