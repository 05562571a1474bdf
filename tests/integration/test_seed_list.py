"""Seed lists and request routing with real sockets and real broker processes, no group needed:
dead seeds are skipped, ``SHAREDMEM_BROKER`` takes a list, and a request channel follows a
``NotPrimary`` or rotates after a timeout with the same request bytes (so the same ids).

The hand-made peers below are plain ROUTER sockets in a thread of the test: they stand for a
standby (answers ``NotPrimary``) and a stalled member (reads, never answers), which a single
broker cannot be made to do.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import zmq

from broker.errors import BrokerUnavailable
from broker.protocol import NotPrimary, Reply, Set, WriteOk, reply_codec
from node import SharedMemory, SharedMemoryConfig
from node.node import acquire_node, release_node
from node.requests import RequestChannel, SharedRoute
from tests.processes import ROOT, BrokerProcess, child_env, free_port


def closed_tcp() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


# --------------------------------------------------------------------------- real brokers


def test_dead_seeds_first_still_reach_the_live_broker(broker_process: BrokerProcess,
                                                      tmp_path: Path) -> None:
    seeds = f"{closed_tcp()},ipc://{tmp_path}/nobody.sock,{broker_process.address}"
    with SharedMemory(SharedMemoryConfig(namespace="seeds", broker=seeds, max_keys=0, ttl=0,
                                         connect_timeout=10)) as shm:
        shm.set("k", {"v": 1})
        assert shm.get("k") == {"v": 1}
        st = shm.status()
        assert st.broker == seeds and st.connected
        assert (st.term, st.primary, st.namespace.term) == (0, "", 0)  # a single broker
        assert shm.broker_digest() == (shm.seq, shm.digest())


def test_a_silent_seed_gets_its_share_of_the_time_then_the_next_is_asked(
        broker_process: BrokerProcess) -> None:
    """Something accepts connections but never speaks (not a refusal): after its share of
    connect_timeout the next seed is asked, and the handle works."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        silent = f"tcp://127.0.0.1:{listener.getsockname()[1]}"
        with SharedMemory(SharedMemoryConfig(namespace="silent", broker=[silent,
                                                                         broker_process.address],
                                             max_keys=0, ttl=0, connect_timeout=6,
                                             retry_interval=0.2)) as shm:
            shm.set("k", 1)
            assert shm.get("k") == 1
            assert shm.status().broker == f"{silent},{broker_process.address}"


@pytest.mark.timeout(20)  # refusals are not waited out: connect_timeout is 30 s
def test_every_seed_refused_fails_at_once_naming_each(tmp_path: Path) -> None:
    a, b = closed_tcp(), f"ipc://{tmp_path}/gone.sock"
    with pytest.raises(BrokerUnavailable, match="connection refused at each") as info:
        SharedMemory(SharedMemoryConfig(broker=f"{a},{b}", connect_timeout=30))
    assert a in str(info.value) and b in str(info.value)


def test_sharedmem_broker_with_a_seed_list_in_another_process(
        broker_process: BrokerProcess) -> None:
    env = child_env()
    env["SHAREDMEM_BROKER"] = f"{closed_tcp()}, {broker_process.address}"
    code = ("from node import SharedMemory, SharedMemoryConfig\n"
            "with SharedMemory(SharedMemoryConfig(namespace='envseed', max_keys=0)) as shm:\n"
            "    shm.set('k', 'from-child')\n"
            "    print(shm.status().broker)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith(broker_process.address), r.stdout
    with SharedMemory(SharedMemoryConfig(namespace="envseed", broker=broker_process.address,
                                         max_keys=0)) as shm:
        assert shm.get("k", consistent=True) == "from-child"


def test_a_bad_seed_in_sharedmem_broker_is_refused_naming_it() -> None:
    env = child_env()
    env["SHAREDMEM_BROKER"] = "tcp://127.0.0.1:7400,127.0.0.1:7410"
    code = "from node import SharedMemory\nSharedMemory()\n"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode != 0
    assert "SHAREDMEM_BROKER: entry 2" in r.stderr and "tcp://127.0.0.1:7410" in r.stderr


def test_the_same_seed_list_shares_one_node(broker_process: BrokerProcess) -> None:
    seeds = [closed_tcp(), broker_process.address]
    ctx = zmq.Context.instance()
    a = acquire_node(",".join(seeds), ctx, connect_timeout=10, retry_interval=1.0)
    try:
        b = acquire_node(seeds, ctx, connect_timeout=10, retry_interval=1.0)
        try:
            assert a is b and a.seeds == tuple(seeds)
        finally:
            release_node(b)
    finally:
        release_node(a)


# --------------------------------------------------------------------------- hand-made peers


@dataclass
class Peer:
    """A ROUTER on loopback answering each request with ``answer(body)`` (None = never)."""

    answer: Callable[[bytes], Reply | None]
    received: list[bytes] = field(default_factory=list)
    endpoint: str = ""

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._sock = zmq.Context.instance().socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        port = self._sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        codec = reply_codec()
        while not self._stop.is_set():
            if not self._sock.poll(50):
                continue  # poll
            *envelope, body = self._sock.recv_multipart()
            self.received.append(body)
            reply = self.answer(body)
            if reply is not None:
                self._sock.send_multipart([*envelope, codec.encode(reply)])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close(linger=0)


@pytest.fixture
def peers() -> Iterator[list[Peer]]:
    made: list[Peer] = []
    yield made
    for p in made:
        p.close()


def write(client_id: bytes, request_no: int) -> Set:
    return Set(client_id, request_no, "ns", 0, "k", b"1")


def test_not_primary_resends_the_same_request_to_the_named_primary(peers: list[Peer]) -> None:
    primary = Peer(lambda body: WriteOk("e", 7, term=2))
    peers.append(primary)
    standby = Peer(lambda body: NotPrimary(2, primary.endpoint))
    peers.append(standby)
    route = SharedRoute([standby.endpoint, primary.endpoint])
    channel = RequestChannel(zmq.Context.instance(), route, retry_interval=0.5)
    try:
        reply = channel.call(write, time.monotonic() + 10, is_write=True)
    finally:
        channel.close()
    assert reply == WriteOk("e", 7, term=2)
    assert len(standby.received) == 1 and primary.received == standby.received  # same ids
    assert route.view()[:2] == (2, primary.endpoint)


def test_a_timeout_rotates_to_the_next_member_with_the_same_request(peers: list[Peer]) -> None:
    stalled = Peer(lambda body: None)
    peers.append(stalled)
    live = Peer(lambda body: WriteOk("e", 1, term=3))
    peers.append(live)
    route = SharedRoute([stalled.endpoint, live.endpoint])
    channel = RequestChannel(zmq.Context.instance(), route, retry_interval=0.2)
    try:
        assert channel.call(write, time.monotonic() + 10, is_write=True) == WriteOk("e", 1, term=3)
    finally:
        channel.close()
    assert stalled.received and live.received
    assert set(stalled.received) == set(live.received) and len(set(live.received)) == 1


def test_only_refusals_are_not_reported_as_unknown(peers: list[Peer]) -> None:
    """Every member says NotPrimary with no primary (an election that never ends): the write
    was applied nowhere, so the error says so; one unanswered send makes it unknown."""
    a = Peer(lambda body: NotPrimary(4, ""))
    peers.append(a)
    b = Peer(lambda body: NotPrimary(4, ""))
    peers.append(b)
    # retry_interval: long enough for a peer thread on a loaded CI core to answer each send;
    # the channel sends nothing with under half of it left, so no send is cut off unanswered.
    channel = RequestChannel(zmq.Context.instance(), SharedRoute([a.endpoint, b.endpoint]),
                             retry_interval=0.5)
    try:
        with pytest.raises(BrokerUnavailable, match="not the primary") as info:
            channel.call(write, time.monotonic() + 2.0, is_write=True)
        assert info.value.outcome_unknown is False
        assert a.received and b.received  # both were asked, in turn
    finally:
        channel.close()
    stalled = Peer(lambda body: None)
    peers.append(stalled)
    channel = RequestChannel(zmq.Context.instance(), SharedRoute([stalled.endpoint, a.endpoint]),
                             retry_interval=0.1)
    try:
        with pytest.raises(BrokerUnavailable, match="may or may not") as info:
            channel.call(write, time.monotonic() + 1.0, is_write=True)
        assert info.value.outcome_unknown is True
    finally:
        channel.close()


def test_a_single_broker_keeps_one_endpoint_and_its_timing(broker_process: BrokerProcess
                                                           ) -> None:
    """The default path: a plain address is a route of one; retries never leave it."""
    channel = RequestChannel(zmq.Context.instance(), broker_process.address, retry_interval=0.2)
    try:
        assert channel.route.view()[2] == [broker_process.address]
        reply = channel.call(write, time.monotonic() + 10, is_write=True)
        assert isinstance(reply, WriteOk) and reply.term == 0
        assert channel.endpoint == broker_process.address
    finally:
        channel.close()
