"""broker/zmtp.py's message I/O on real TCP loopback sockets: ``recv_message`` returns whole
multipart messages as zero-copy frames, ``send_message`` sends them with the C-level send,
``readable`` (one ``EVENTS`` read) says when a drain loop is done.

Why these tests: the broker's loop and the node's I/O thread no longer use pyzmq's
``recv_multipart``/``send_multipart``; a helper that split or merged messages, lost an empty
frame, or raised ``Again`` in the middle of a message would corrupt both ends' framing."""

from __future__ import annotations

import time
from collections.abc import Iterator

import msgspec
import pytest
import zmq

from broker.zmtp import readable, recv_message, send_message

DEADLINE_S = 10.0


def wait_readable(sock: zmq.Socket, deadline_s: float = DEADLINE_S) -> None:
    """Block until ``sock`` has a message (a condition with a deadline, not a sleep)."""
    deadline = time.monotonic() + deadline_s
    while not readable(sock):
        left = deadline - time.monotonic()
        assert left > 0, "no message arrived in time"
        zmq.zmq_poll([(sock, zmq.POLLIN)], max(1, int(left * 1000)))


@pytest.fixture
def pair() -> Iterator[tuple[zmq.Socket, zmq.Socket]]:
    """A ROUTER (ROUTER_MANDATORY, as the broker's) and a DEALER connected to it over TCP."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    dealer = ctx.socket(zmq.DEALER)
    for s in (router, dealer):
        s.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer.connect(f"tcp://127.0.0.1:{port}")
    try:
        yield router, dealer
    finally:
        router.close(0)
        dealer.close(0)
        ctx.term()


def test_multipart_round_trip_with_frames(pair: tuple[zmq.Socket, zmq.Socket]) -> None:
    router, dealer = pair
    big = bytes(range(256)) * 400  # over pyzmq's copy threshold: a real zero-copy frame
    send_message(dealer, (b"", b"request", big))
    wait_readable(router)
    frames = recv_message(router)
    assert all(isinstance(f, zmq.Frame) for f in frames)
    assert [f.more for f in frames] == [True, True, True, False]
    identity, delimiter, body, tail = frames
    assert (len(delimiter), body.bytes, tail.bytes) == (0, b"request", big)
    assert not readable(router)
    # The received identity frame routes the reply as it is (no bytes copy needed).
    send_message(router, [identity, delimiter, b"reply", b""])
    wait_readable(dealer)
    assert [f.bytes for f in recv_message(dealer)] == [b"", b"reply", b""]


def test_drain_by_events_keeps_message_boundaries(pair: tuple[zmq.Socket, zmq.Socket]
                                                  ) -> None:
    router, dealer = pair
    sent = [[b"", b"m%d" % i] + [b""] * (i % 3) + [b"x" * (i * 50)] for i in range(200)]
    for parts in sent:
        send_message(dealer, parts)
    got: list[list[bytes]] = []
    deadline = time.monotonic() + DEADLINE_S
    while len(got) < len(sent):
        assert time.monotonic() < deadline, f"only {len(got)} of {len(sent)} arrived"
        wait_readable(router)
        while readable(router):  # the drain loops' shape: no zmq.Again ends it
            got.append([f.bytes for f in recv_message(router)[1:]])
    assert got == sent


def test_empty_socket_raises_again_and_is_not_readable(pair: tuple[zmq.Socket, zmq.Socket]
                                                       ) -> None:
    router, _ = pair
    assert not readable(router)
    with pytest.raises(zmq.Again):
        recv_message(router)


def test_unroutable_reply_raises_and_sends_nothing(pair: tuple[zmq.Socket, zmq.Socket]
                                                   ) -> None:
    router, dealer = pair
    with pytest.raises(zmq.ZMQError) as err:
        send_message(router, [b"no such peer", b"", b"lost"])
    assert err.value.errno == zmq.EHOSTUNREACH
    # Nothing half-sent is left behind: the next message to a real peer arrives whole.
    send_message(dealer, (b"", b"hello"))
    wait_readable(router)
    identity = recv_message(router)[0]
    send_message(router, [identity, b"", b"after"])
    wait_readable(dealer)
    assert [f.bytes for f in recv_message(dealer)] == [b"", b"after"]


def test_pub_sub_topic_frames_and_msgspec_decodes_a_frame_in_place() -> None:
    ctx = zmq.Context()
    pub, sub = ctx.socket(zmq.PUB), ctx.socket(zmq.SUB)
    try:
        for s in (pub, sub):
            s.setsockopt(zmq.LINGER, 0)
        port = pub.bind_to_random_port("tcp://127.0.0.1")
        sub.setsockopt(zmq.SUBSCRIBE, b"ns\x00")
        sub.connect(f"tcp://127.0.0.1:{port}")
        body = msgspec.msgpack.encode({"seq": 7, "keys": ["a", "b"]})
        # A slow joiner misses what is published before its subscription is active: publish
        # until one arrives (a condition with a deadline), then check that one.
        deadline = time.monotonic() + DEADLINE_S
        while not readable(sub):
            assert time.monotonic() < deadline, "subscription never became active"
            send_message(pub, (b"other\x00", b"not for us"))
            send_message(pub, (b"ns\x00", body, b"header"))
            zmq.zmq_poll([(sub, zmq.POLLIN)], 50)
        topic, frame, header = recv_message(sub)
        assert (topic.bytes, header.bytes) == (b"ns\x00", b"header")
        assert msgspec.msgpack.decode(frame) == {"seq": 7, "keys": ["a", "b"]}
    finally:
        pub.close(0)
        sub.close(0)
        ctx.term()
