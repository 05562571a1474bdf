"""The subscription barrier, checked on the wire: a snapshot is answered only once the asking
node's ``<ns>\\0<nonce>`` subscription has reached the broker's XPUB (docs/protocol.md
section 12)."""

from __future__ import annotations

import pytest
import zmq

from broker.protocol import Snapshot, SnapshotReply, reply_codec, request_codec, topic_for
from tests.conftest import BrokerProcess

pytestmark = pytest.mark.timeout(30)


def test_snapshot_waits_for_the_nonce_subscription(broker_process: BrokerProcess) -> None:
    ctx = zmq.Context()
    try:
        dealer = ctx.socket(zmq.DEALER)
        sub = ctx.socket(zmq.SUB)
        for s in (dealer, sub):
            s.setsockopt(zmq.LINGER, 0)
        dealer.connect(broker_process.address)
        sub.connect(f"tcp://127.0.0.1:{broker_process.port + 1}")
        nonce = b"0123abcd"
        dealer.send_multipart([b"", request_codec().encode(Snapshot("bar", 0, 7, nonce))])
        # Without the barrier subscription the broker must hold the answer back.
        assert dealer.poll(500) == 0
        sub.setsockopt(zmq.SUBSCRIBE, topic_for("bar"))
        sub.setsockopt(zmq.SUBSCRIBE, topic_for("bar") + nonce)
        assert dealer.poll(5000), "snapshot never answered after the barrier subscription"
        empty, raw = dealer.recv_multipart()
        reply = reply_codec().decode(raw)
        assert isinstance(reply, SnapshotReply)
        assert (reply.snap_id, reply.namespace, reply.seq) == (7, "bar", 0)
        # and the namespace subscription is live: the next heartbeat reaches us
        assert sub.poll(5000)
        topic, _ = sub.recv_multipart()
        assert topic == topic_for("bar")
    finally:
        ctx.destroy(linger=0)


def test_nonce_seen_first_then_snapshot_answers_at_once(broker_process: BrokerProcess) -> None:
    ctx = zmq.Context()
    try:
        dealer = ctx.socket(zmq.DEALER)
        sub = ctx.socket(zmq.SUB)
        for s in (dealer, sub):
            s.setsockopt(zmq.LINGER, 0)
        sub.connect(f"tcp://127.0.0.1:{broker_process.port + 1}")
        nonce = b"feedbeef"
        sub.setsockopt(zmq.SUBSCRIBE, topic_for("early"))
        sub.setsockopt(zmq.SUBSCRIBE, topic_for("early") + nonce)
        dealer.connect(broker_process.address)
        # The subscription may still be in flight; the answer comes either way, exactly once.
        dealer.send_multipart([b"", request_codec().encode(Snapshot("early", 0, 1, nonce))])
        assert dealer.poll(5000)
        reply = reply_codec().decode(dealer.recv_multipart()[1])
        assert isinstance(reply, SnapshotReply) and reply.snap_id == 1
        assert dealer.poll(300) == 0  # answered once
    finally:
        ctx.destroy(linger=0)


def test_a_big_snapshot_comes_in_chunks_and_writes_interleave(
    broker_process: BrokerProcess,
) -> None:
    """A 50 000-key snapshot is sent in chunks, one per loop turn: a write sent after the
    first chunk is acknowledged before the last one."""
    from broker.protocol import Set, SetMany, WriteOk

    codec, replies = request_codec(), reply_codec()
    ctx = zmq.Context()
    try:
        writer = ctx.socket(zmq.DEALER)
        dealer = ctx.socket(zmq.DEALER)
        sub = ctx.socket(zmq.SUB)
        for s in (writer, dealer, sub):
            s.setsockopt(zmq.LINGER, 0)
        writer.connect(broker_process.address)
        for i in range(0, 50_000, 5000):
            items = [(f"k{j:06d}", b'{"v":1}') for j in range(i, i + 5000)]
            writer.send_multipart([b"", codec.encode(SetMany(b"w" * 12, i + 1, "big", 0, items))])
            assert writer.poll(10_000)
            assert isinstance(replies.decode(writer.recv_multipart()[1]), WriteOk)
        dealer.connect(broker_process.address)
        sub.connect(f"tcp://127.0.0.1:{broker_process.port + 1}")
        sub.setsockopt(zmq.SUBSCRIBE, topic_for("big"))
        sub.setsockopt(zmq.SUBSCRIBE, topic_for("big") + b"chunky00")
        dealer.send_multipart([b"", codec.encode(Snapshot("big", 0, 3, b"chunky00"))])
        assert dealer.poll(10_000)
        first = replies.decode(dealer.recv_multipart()[1])
        assert isinstance(first, SnapshotReply) and first.chunk == 0 and not first.last
        writer.send_multipart([b"", codec.encode(
            Set(b"w" * 12, 100_000, "big", 0, "during", b"1", None))])
        chunks, write_acked_before_last = [first], False
        while not chunks[-1].last:
            poller = zmq.Poller()
            poller.register(dealer, zmq.POLLIN)
            poller.register(writer, zmq.POLLIN)
            ready = dict(poller.poll(10_000))
            assert ready, "no chunk and no write reply within 10 s"
            if writer in ready:
                ok = replies.decode(writer.recv_multipart()[1])
                assert isinstance(ok, WriteOk)
                write_acked_before_last = True
            if dealer in ready:
                chunks.append(replies.decode(dealer.recv_multipart()[1]))
        assert write_acked_before_last
        assert [c.chunk for c in chunks] == list(range(len(chunks))) and len(chunks) >= 10
        keys = [k for c in chunks for k in c.keys]
        assert len(keys) == len(set(keys)) == 50_000  # the state at the snapshot's seq
        assert all(c.seq == first.seq == 10 * 5000 for c in chunks)
    finally:
        ctx.destroy(linger=0)
