"""The subscription barrier, checked on the wire: a snapshot is answered only once the asking
node's ``<ns>\\0<nonce>`` subscription has reached the broker's XPUB (ZMQ_NOTES.md)."""

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
