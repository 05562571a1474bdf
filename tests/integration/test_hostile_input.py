"""Garbage on any broker socket is logged, answered where a reply is owed, and never stops the
broker or changes its state."""

from __future__ import annotations

import random

import msgspec
import pytest
import zmq

from broker.core import BrokerCore
from broker.errors import ProtocolError
from broker.protocol import (
    Delete,
    Error,
    Set,
    SetMany,
    Stats,
    StatsReply,
    reply_codec,
    request_codec,
)
from node import SharedMemory, SharedMemoryConfig
from tests.conftest import BrokerProcess, wait_until

pytestmark = pytest.mark.timeout(60)


def pub_address(broker: BrokerProcess) -> str:
    return f"tcp://127.0.0.1:{broker.port + 1}"


def test_garbage_on_every_socket_never_stops_the_broker(broker_process: BrokerProcess) -> None:
    rng = random.Random(1234)
    with SharedMemory(SharedMemoryConfig(namespace="victim", broker=broker_process.address)) as s:
        s.set("kept", {"v": 1})
        before = s.broker_digest()
        ctx = zmq.Context()
        try:
            req_codec, rep_codec = request_codec(), reply_codec()
            dealer = ctx.socket(zmq.DEALER)
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.connect(broker_process.address)
            valid = req_codec.encode(Set(b"c" * 12, 1, "victim", 10000, "kept", b'{"v":2}', None))
            sent_with_delimiter = 0
            # What a correct broker must end with: the legitimate writes (garbage that happens to
            # decode as a valid write is legitimate input) replayed on a reference core.
            reference = BrokerCore()
            replay = [Set(b"r" * 12, 1, "victim", 10000, "kept", b'{"v":1}', None)]
            for i in range(2000):
                kind = i % 5
                if kind == 0:
                    body = rng.randbytes(rng.randrange(0, 200))
                elif kind == 1:  # valid message, bytes flipped
                    b = bytearray(valid)
                    b[rng.randrange(len(b))] ^= 0xFF
                    body = bytes(b)
                elif kind == 2:  # truncated
                    body = valid[: rng.randrange(len(valid))]
                elif kind == 3:  # wrong types in a well-formed msgpack map
                    body = msgspec.msgpack.encode({"type": "Set", "client_id": 5, "key": [1]})
                else:  # wrong frame layout
                    dealer.send_multipart([rng.randbytes(3), rng.randbytes(5), b"x"])
                    continue
                dealer.send_multipart([b"", body])
                sent_with_delimiter += 1
                try:
                    decoded = req_codec.decode(body)
                except ProtocolError:
                    continue
                if isinstance(decoded, (Set, SetMany, Delete)):
                    replay.append(decoded)
            # every message with an envelope delimiter gets an Error reply (or, for a flipped
            # byte that still decodes as a valid request, a normal reply)
            errors = 0
            for _ in range(sent_with_delimiter):
                assert dealer.poll(5000), "broker stopped answering"
                raw = dealer.recv_multipart()[1]  # [b"", reply, (events of a write)]
                reply = rep_codec.decode(raw)
                errors += isinstance(reply, Error)
            assert errors >= sent_with_delimiter * 0.9
            # garbage on the publisher: non-subscription messages and bogus topics
            xsub = ctx.socket(zmq.XSUB)
            xsub.setsockopt(zmq.LINGER, 0)
            xsub.connect(pub_address(broker_process))
            for _ in range(500):
                xsub.send(rng.randbytes(rng.randrange(0, 50)))
            xsub.send(b"\x01victim")  # no NUL terminator: refused
            xsub.send(b"\x01vic\xfftim\x00")  # not UTF-8: refused
            # the broker still answers and its state is what it was, except flipped-but-valid
            # requests that happened to be well-formed writes: we sent none that decode to a
            # different namespace/key, so compare the digest.
            dealer.send_multipart([b"", req_codec.encode(Stats())])
            assert dealer.poll(5000)
            stats = rep_codec.decode(dealer.recv_multipart()[1])
            assert isinstance(stats, StatsReply)
            assert broker_process.alive
            for request in replay:
                reference.commit(reference.decide(request, 0.0, 0.0), 0.0)
            ref = reference.namespaces["victim"]
            assert s.broker_digest() == (ref.seq, ref.digest())
            assert len(replay) < 200  # most garbage was refused, as it should be
            wait_until(lambda: s.local_digest() == s.broker_digest(), 5,
                       message="replica to follow")
            assert before[0] == 1
            s.set("after", 1)
            assert s.get("after") == 1
        finally:
            ctx.destroy(linger=0)


def test_subscriptions_are_exact_namespaces(broker_process: BrokerProcess) -> None:
    """Topic ``ns1`` must never deliver ``ns10``: topics are NUL-terminated."""
    cfg = SharedMemoryConfig
    with SharedMemory(cfg(namespace="ns1", broker=broker_process.address)) as ns1, \
            SharedMemory(cfg(namespace="ns10", broker=broker_process.address)) as ns10:
        ns10.set("k", "ten")
        ns1.set("k", "one")
        assert ns1.get("k") == "one" and ns10.get("k") == "ten"
        assert ns1.seq == 1 and ns10.seq == 1
        assert ns1.list_keys() == ["k"]
