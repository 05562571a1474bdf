"""Issue 5: CURVE authentication, per-namespace permissions on every socket, and hostile
input that never stops the broker nor makes it allocate without bound."""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path

import msgspec
import pytest
import zmq
import zmq.auth

from broker.protocol import (
    Delete,
    Hello,
    Open,
    Set,
    SetMany,
    Snapshot,
    Stats,
    StatsReply,
    reply_codec,
    request_codec,
    topic_for,
)
from node import AccessDenied, SharedMemory, SharedMemoryConfig
from tests.conftest import BrokerProcess, secure_broker, wait_until

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory):
    broker, keys = secure_broker(tmp_path_factory.mktemp("sec"),
                                 '{ "app1" = ["read", "write"], "app2" = ["read"] }')
    try:
        yield broker, keys
    finally:
        broker.stop()


def cfg(broker: BrokerProcess, keys: Path, who: str, namespace: str,
        **kw: object) -> SharedMemoryConfig:
    return SharedMemoryConfig(namespace=namespace, broker=broker.address, max_keys=0,
                              curve_key_file=str(keys / f"{who}.key_secret"),
                              broker_key_file=str(keys / "broker.key"), **kw)


def curve_socket(ctx: zmq.Context, kind: int, keys: Path, who: str | None) -> zmq.Socket:
    s = ctx.socket(kind)
    s.setsockopt(zmq.LINGER, 0)
    if who is not None:
        pub, sec = zmq.auth.load_certificate(str(keys / f"{who}.key_secret"))
        s.curve_publickey, s.curve_secretkey = pub, sec
        s.curve_serverkey = zmq.auth.load_certificate(str(keys / "broker.key"))[0]
    return s


def pub_address(broker: BrokerProcess) -> str:
    return f"tcp://127.0.0.1:{broker.port + 1}"


def test_unknown_key_cannot_connect_to_any_socket(secure) -> None:
    broker, keys = secure
    with pytest.raises(AccessDenied, match="refused this node's CURVE key"):
        SharedMemory(cfg(broker, keys, "mallory", "app1", connect_timeout=5))
    with pytest.raises(AccessDenied, match="requires CURVE"):  # no CURVE keys at all
        SharedMemory(SharedMemoryConfig(namespace="app1", broker=broker.address,
                                        connect_timeout=5))
    ctx = zmq.Context()
    try:
        subs = [curve_socket(ctx, zmq.SUB, keys, who) for who in ("mallory", None)]
        for s in subs:
            s.setsockopt(zmq.SUBSCRIBE, b"")
            s.connect(pub_address(broker))
        dealer = curve_socket(ctx, zmq.DEALER, keys, "mallory")
        dealer.connect(broker.address)
        dealer.send_multipart([b"", request_codec().encode(Hello(b"m" * 12))])
        with SharedMemory(cfg(broker, keys, "carol", "app1")) as carol:
            for i in range(20):
                carol.set(f"secret{i}", i)
        # heartbeats go out every 0.5 s and 20 events were published: nothing may arrive
        assert all(s.poll(1500) == 0 for s in subs)
        assert dealer.poll(200) == 0
    finally:
        ctx.destroy(linger=0)


def test_permissions_per_namespace_on_every_socket(secure) -> None:
    broker, keys = secure
    with SharedMemory(cfg(broker, keys, "carol", "app2")) as carol2, \
            SharedMemory(cfg(broker, keys, "carol", "app3")) as carol3:
        carol2.set("k", "v")
        before = carol2.broker_digest()
        with SharedMemory(cfg(broker, keys, "alice", "app1")) as a1, \
                SharedMemory(cfg(broker, keys, "alice", "app2")) as a2:
            a1.set("mine", 1)
            assert a1.get("mine") == 1
            assert a2.get("k") == "v"  # read is allowed
            with pytest.raises(AccessDenied, match="'alice' may not write namespace 'app2'"):
                a2.set("k", "hacked")
            with pytest.raises(AccessDenied):
                a2.delete("k")
            with pytest.raises(AccessDenied):
                a2.set_many({"x": 1})
            assert carol2.broker_digest() == before  # nothing changed
        with pytest.raises(AccessDenied, match="app3"):
            SharedMemory(cfg(broker, keys, "alice", "app3"))
        # A raw SUB with alice's keys subscribing to everything (and to app3 exactly) gets no
        # app3 event while carol writes there; it does get app1's.
        ctx = zmq.Context()
        try:
            sub = curve_socket(ctx, zmq.SUB, keys, "alice")
            for topic in (b"", topic_for("app3"), topic_for("app1")):
                sub.setsockopt(zmq.SUBSCRIBE, topic)
            sub.connect(pub_address(broker))
            dealer = curve_socket(ctx, zmq.DEALER, keys, "alice")
            dealer.connect(broker.address)
            dealer.send_multipart([b"", request_codec().encode(
                Snapshot("app3", 0, 1, b"nonce123"))])
            sub.setsockopt(zmq.SUBSCRIBE, topic_for("app3") + b"nonce123")
            assert dealer.poll(5000)
            reply = reply_codec().decode(dealer.recv_multipart()[1])
            assert reply.kind == "AccessDenied"
            with SharedMemory(cfg(broker, keys, "carol", "app1")) as carol1:
                for i in range(30):
                    carol3.set(f"top_secret{i}", i)
                carol1.set("public", 1)
            seen: list[bytes] = []
            end = time.monotonic() + 2.0  # four heartbeat periods of both namespaces
            while (left := end - time.monotonic()) > 0:
                if sub.poll(int(left * 1000) + 1):
                    seen.append(sub.recv_multipart()[0])
            assert topic_for("app1") in seen
            assert topic_for("app3") not in seen
        finally:
            ctx.destroy(linger=0)


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_fuzz_every_socket_authenticated_and_not(secure) -> None:
    broker, keys = secure
    seed = int(os.environ.get("SHAREDMEM_FUZZ_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    total = int(os.environ.get("SHAREDMEM_FUZZ_FRAMES", "100000"))
    assert broker.proc is not None
    with SharedMemory(cfg(broker, keys, "carol", "fuzz")) as carol:
        carol.set("kept", {"v": 1})
        rss_before = _rss(broker.proc.pid)
        codec = request_codec()
        valid = [
            codec.encode(Set(b"f" * 12, 1, "fuzz", 0, "k", b'{"a":1}', None)),
            codec.encode(SetMany(b"f" * 12, 2, "fuzz", 0, [("a", b"1"), ("b", b"2")], 5.0)),
            codec.encode(Delete(b"f" * 12, 3, "fuzz", 0, "kept")),
            codec.encode(Snapshot("fuzz", 0, 9, b"zz")),
            codec.encode(Open("fuzz", 0)),
        ]

        def mutate() -> list[bytes]:
            base = bytearray(rng.choice(valid))
            r = rng.random()
            if r < 0.3:  # flip bytes
                for _ in range(rng.randrange(1, 4)):
                    base[rng.randrange(len(base))] = rng.randrange(256)
                return [b"", bytes(base)]
            if r < 0.45:  # truncate
                return [b"", bytes(base[: rng.randrange(len(base))])]
            if r < 0.55:  # wrong types inside a well-formed map
                return [b"", msgspec.msgpack.encode(
                    {"type": rng.choice(["Set", "Snapshot", "Fetch", "Open"]),
                     "namespace": rng.choice([1, [], "fuzz", "x" * 300, None]),
                     "key": rng.choice([b"\0", 7, "ok"]), "value": rng.choice(["s", 3]),
                     "client_id": rng.choice([b"c", "c", 1]), "request_no": rng.choice([1, -5])}
                )]
            if r < 0.65:  # extra frames
                return [b"", bytes(base), rng.randbytes(rng.randrange(0, 50))]
            if r < 0.75:  # oversized claim in a tiny frame / random garbage
                return [b"", b"\xdb\xff\xff\xff\xff" + rng.randbytes(20)]
            if r < 0.85:  # no delimiter
                return [rng.randbytes(rng.randrange(1, 30))]
            return [b"", rng.randbytes(rng.randrange(0, 300))]

        ctx = zmq.Context()
        stop = threading.Event()
        try:
            authed = curve_socket(ctx, zmq.DEALER, keys, "alice")
            authed.connect(broker.address)
            anon = curve_socket(ctx, zmq.DEALER, keys, "mallory")  # never gets in
            anon.connect(broker.address)
            plain = ctx.socket(zmq.DEALER)  # no CURVE: never gets in
            plain.setsockopt(zmq.LINGER, 0)
            plain.connect(broker.address)
            xsub = curve_socket(ctx, zmq.XSUB, keys, "alice")
            xsub.connect(pub_address(broker))
            # One thread owns every socket (ZeroMQ sockets are not thread-safe): the sending
            # loop also drains replies and events as it goes.
            received = [0]
            marker_seen = threading.Event()
            replies = reply_codec()

            def drain(wait_ms: int = 0) -> None:
                while authed.poll(wait_ms):
                    frames = authed.recv_multipart()
                    received[0] += 1
                    try:
                        if isinstance(replies.decode(frames[1]), StatsReply):
                            marker_seen.set()
                    except Exception:  # noqa: BLE001 - garbage replies are fine here
                        pass
                    wait_ms = 0
                while xsub.poll(0):
                    xsub.recv_multipart()

            answered_sent = 0
            for i in range(total):
                target = i % 10
                if target < 6:
                    frames = mutate()
                    authed.send_multipart(frames)
                    if len(frames) >= 2 and frames[0] == b"":
                        answered_sent += 1  # a reply is owed: Error, or an answer
                    drain()
                    if answered_sent - received[0] > 5000:
                        # Keep at most ~5000 requests in flight: the RSS bound is about what the
                        # broker allocates per message, not about queues a slow run lets grow
                        # up to the high-water marks.
                        deadline = time.monotonic() + 60
                        while answered_sent - received[0] > 1000:
                            assert time.monotonic() < deadline, f"broker stalled (seed {seed})"
                            drain(50)
                elif target < 8:
                    # Peers that never get in: their queues fill up, then sends would block.
                    outsider = anon if target < 7 else plain
                    try:
                        outsider.send_multipart(mutate(), zmq.NOBLOCK)
                    except zmq.Again:
                        pass
                else:
                    frame = rng.choice([
                        rng.randbytes(rng.randrange(0, 60)),
                        b"\x01" + rng.randbytes(rng.randrange(0, 20)),
                        b"\x01fuzz\x00" + rng.randbytes(8),
                        b"\x00" + rng.randbytes(5),
                    ])
                    xsub.send(frame)
            # A Stats request queued behind everything alice sent: once it is answered, the
            # broker has been through the whole storm and still answers normally.
            authed.send_multipart([b"", codec.encode(Stats())])
            deadline = time.monotonic() + 120
            while not marker_seen.is_set():
                assert time.monotonic() < deadline, f"broker never got through (seed {seed})"
                drain(50)
            assert broker.alive, f"broker died (seed {seed})"
            carol.set("after", 1)
            assert carol.get("after", consistent=True) == 1
            wait_until(lambda: carol.local_digest() == carol.broker_digest(), 30,
                       message=f"replica == broker after fuzzing (seed {seed})")
            # only alice's valid-and-permitted messages could change "fuzz": she has no write
            # permission there, so "kept" must still be what carol wrote
            assert carol.get("kept") == {"v": 1}, f"seed {seed}"
            growth = _rss(broker.proc.pid) - rss_before
            assert growth < 50 * 1024 * 1024, f"broker RSS grew {growth} bytes (seed {seed})"
        finally:
            stop.set()
            ctx.destroy(linger=0)
