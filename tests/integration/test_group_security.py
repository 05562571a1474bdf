"""The replication link's security (docs/security.md, docs/groups.md) with real
processes: 3 etcd members and 3 ``python -m broker --group`` members.

- With ``--config`` (CURVE) the group forms and replicates between the ``[members]`` keys; a
  client key that is valid for requests, and a plain socket, cannot complete the handshake on a
  member's replication endpoint, and what they send there changes nothing.
- Without ``--config`` (loopback), forged higher-term ``Append`` and ``Refuse`` messages, sent
  as a stranger and under a connected member's routing identity, change nothing and get no
  answer; and a ``Refuse`` sent on a route taken over by a forged ``Follow`` only makes the
  primary ask etcd. Same primary, same term, no step-down, and the history and every member's
  digest hold.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.auth
from zmq.utils.monitor import recv_monitor_message

from broker.protocol import (
    Event,
    Fetch,
    FetchReply,
    Hello,
    HelloReply,
    Set,
    Stats,
    StatsReply,
    WriteOk,
)
from broker.records import NamespaceRecord
from broker.replication import Ack, Append, Follow, Refuse, ReplCodec
from tests.conftest import ROOT, child_env, wait_until
from tests.history import History, replay_digest
from tests.integration.test_group import (
    NS,
    STABLE_LEASE_TTL,
    Group,
    Member,
    Writer,
    current_term,
    free_port_triple,
    offline_digests,
    running_group,
    wait_progress,
)
from tests.raw_client import raw_call

MEMBERS = ("m0", "m1", "m2")


# ------------------------------------------------------------------------------ CURVE helpers


def make_keys(directory: Path) -> Path:
    """Key pairs for the three members, the client alice and mallory (listed nowhere), and one
    config file per member (its own [broker] pair, the same clients and members)."""
    keys = directory / "keys"
    keys.mkdir(parents=True)
    for name in (*MEMBERS, "alice", "mallory"):
        zmq.auth.create_certificates(str(keys), name)
    members = "".join(f'\n[members.{m}]\npublic_key_file = "keys/{m}.key"\n' for m in MEMBERS)
    for m in MEMBERS:
        (directory / f"{m}.toml").write_text(f"""
[broker]
secret_key_file = "keys/{m}.key_secret"

[clients.alice]
public_key_file = "keys/alice.key"
permissions = {{ "*" = ["admin"] }}
{members}""")
    return keys


def curve(sock: zmq.Socket, keys: Path, who: str, server: str) -> zmq.Socket:
    pub, sec = zmq.auth.load_certificate(str(keys / f"{who}.key_secret"))
    sock.curve_publickey, sock.curve_secretkey = pub, sec
    sock.curve_serverkey = zmq.auth.load_certificate(str(keys / f"{server}.key"))[0]
    return sock


def member_of(address: str, members: list[Member]) -> Member:
    return next(m for m in members if m.address == address)


@dataclass
class CurveMember(Member):
    keys: Path | None = None

    def request(self, request: Any, timeout: float = 2.0) -> Any:
        assert self.keys is not None
        keys, name = self.keys, self.name
        return raw_call(self.address, request, timeout,
                        prepare=lambda s: curve(s, keys, "alice", name))

    def stats(self, timeout: float = 1.0) -> dict[str, int] | None:
        r = self.request(Stats(), timeout)
        return r.counters if isinstance(r, StatsReply) else None


class CurveWriter(Writer):
    """The group's raw writer, as client alice (each member's own server key)."""

    def __init__(self, name: str, members: list[CurveMember], history: History) -> None:
        super().__init__(name, [m.address for m in members], history)
        self.members = members

    def _connect(self, address: str) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)
        m = member_of(address, self.members)  # type: ignore[arg-type]
        assert m.keys is not None
        self.sock = curve(self.ctx.socket(zmq.REQ), m.keys, "alice", m.name)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)


@contextlib.contextmanager
def curve_group(tmp_path: Path, etcd: Any) -> Iterator[Group]:
    keys = make_keys(tmp_path)
    members = [CurveMember(name, free_port_triple(), tmp_path / name, etcd.endpoint_string,
                           1, ("--config", str(tmp_path / f"{name}.toml")), keys=keys,
                           lease_ttl=STABLE_LEASE_TTL)
               for name in MEMBERS]
    g = Group(list(members))
    try:
        for m in members:
            m.start()
        yield g
    finally:
        g.stop_all()


def fetch_all(m: CurveMember | Member) -> list[Event]:
    req = m.request if isinstance(m, CurveMember) else None
    assert req is not None
    hello = req(Hello(b"checker"))
    assert isinstance(hello, HelloReply), hello
    events: list[Event] = []
    while True:
        r = req(Fetch(NS, hello.epoch, len(events) + 1, 1, 100_000), 5.0)
        assert isinstance(r, FetchReply) and r.available, r
        if not r.events:
            return events
        events += r.events


def check_end_curve(group: Group, history: History, writers: list[Writer]) -> None:
    """As test_group.check_end, through CURVE: the history against the primary's log, then
    every member's durable state equal to it."""
    for w in writers:
        w.join()
    primary = group.wait_formed(30, sync=1)
    final = CurveWriter("final", group.members, history)  # type: ignore[arg-type]
    reply = final._request(Set(final.client_id, 1, NS, 0, "final", b"1"))
    assert isinstance(reply, WriteOk)
    history.attempt("final", "set", "final", 1)
    history.ack("final", "set", "final", 1, reply.seq)
    events = fetch_all(primary)
    assert history.check(events).acks > 0
    want = replay_digest(NS, events)

    def caught_up() -> bool:
        for m in group.members:
            s = m.stats(0.5)
            if s is None or (m is not primary and s.get("group_lag") != 0):
                return False
        ps = primary.stats(0.5)
        return ps is not None and ps.get("group_max_lag", 1) == 0 \
            and ps["group_followers"] == len(group.members) - 1
    wait_until(caught_up, 30, 0.05, "every standby to catch up")
    group.stop_all()
    assert offline_digests(group) == {m.name: want for m in group.members}


def connect_watched(sock: zmq.Socket, endpoint: str, timeout: float = 10.0) -> str:
    """Connect ``sock`` and watch its monitor until the handshake succeeds or fails."""
    mon = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED
                                  | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                                  | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                                  | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
    try:
        sock.connect(endpoint)
        if not mon.poll(int(timeout * 1000)):
            return "none"
        event = recv_monitor_message(mon)["event"]
        return "succeeded" if event == zmq.EVENT_HANDSHAKE_SUCCEEDED else "failed"
    finally:
        sock.disable_monitor()
        mon.close(linger=0)


def forged(term: int, as_member: str) -> list[bytes]:
    codec = ReplCodec()
    return [codec.encode(Append(term + 100, 1, [NamespaceRecord("evil", 0)])),
            codec.encode(Append(term + 100, 10**6, [])),
            codec.encode(Refuse(term + 100, "intruder")),
            codec.encode(Ack(as_member, term, 10**9)),
            codec.encode(Follow(as_member, term + 100))]


def assert_unchanged(group: Group, primary: Member, term: int) -> None:
    assert group.primary() is primary and current_term(primary) == term, group.roles()
    for m in group.members:
        s = m.stats()
        assert s is not None and s["group_steps_down"] == 0, (m.name, s)
        assert s["group_term"] == term, (m.name, s)


# ------------------------------------------------------------------------------ the tests


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_with_curve_the_group_replicates_and_a_client_key_cannot_speak_on_the_link(
        tmp_path: Path, etcd_cluster: Any) -> None:
    with curve_group(tmp_path, etcd_cluster) as group:
        primary = group.wait_formed(40)
        term = current_term(primary)
        hello = primary.request(Hello(b"x"))  # type: ignore[attr-defined]
        assert isinstance(hello, HelloReply) and hello.term == term
        history = History()
        writers: list[Writer] = [
            CurveWriter(f"w{i}", group.members, history).start()  # type: ignore[arg-type]
            for i in range(2)]
        wait_progress(writers, 50, 40, "writes through a CURVE group", group)
        keys = group.members[0].keys  # type: ignore[attr-defined]
        ctx = zmq.Context.instance()
        for target in group.members:
            standby_name = next(m.name for m in group.members if m is not target)
            # alice is a valid client (her requests above were acknowledged), and mallory is
            # listed nowhere: neither completes the handshake on the replication endpoint,
            # even under a member's routing identity; a plain socket does not either.
            for who in ("alice", "mallory", None):
                s = ctx.socket(zmq.DEALER)
                s.setsockopt(zmq.LINGER, 0)
                s.setsockopt(zmq.IDENTITY, standby_name.encode())
                if who is not None:
                    curve(s, keys, who, target.name)
                assert connect_watched(s, f"tcp://127.0.0.1:{target.port + 2}") == "failed", \
                    (who, target.name)
                for body in forged(term, standby_name):
                    with contextlib.suppress(zmq.Again):  # no connection: nothing queued
                        s.send(body, zmq.NOBLOCK)
                assert not s.poll(300), "the replication endpoint answered a non-member"
                s.close(linger=0)
        wait_progress(writers, 30, 30, "writes after the forged messages", group)
        assert_unchanged(group, primary, term)
        check_end_curve(group, history, writers)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_without_curve_forged_higher_term_append_and_refuse_change_nothing(
        tmp_path: Path, etcd_cluster: Any) -> None:
    from tests.integration.test_group import check_end

    with running_group(tmp_path, etcd_cluster, lease_ttl=STABLE_LEASE_TTL) as group:
        primary = group.wait_formed(40)
        term = current_term(primary)
        history = History()
        writers = [Writer(f"w{i}", group.addresses(), history).start() for i in range(2)]
        wait_progress(writers, 50, 40, "writes through the group", group)
        ctx = zmq.Context.instance()
        standbys = [m for m in group.members if m is not primary]
        for target in group.members:
            for identity in ("intruder", *(m.name for m in standbys if m is not target)):
                s = ctx.socket(zmq.DEALER)
                s.setsockopt(zmq.LINGER, 1000)
                s.setsockopt(zmq.IDENTITY, identity.encode())
                # Plain ZMTP: what it sends is delivered.
                assert connect_watched(s, f"tcp://127.0.0.1:{target.port + 2}") == "succeeded"
                for body in forged(term, identity):
                    s.send(body)
                # Nothing comes back, under a member's identity either: a connected member's
                # route is never handed to a second connection claiming its name.
                assert not s.poll(300), f"{target.name} answered a forged {identity!r}"
                s.close()
        wait_progress(writers, 30, 30, "writes after the forged messages", group)
        assert_unchanged(group, primary, term)

        # The worst a local process can do without CURVE: Follow as a standby (a fresh
        # identity), which takes that standby's route (the Install comes to it), and then
        # Refuse a higher term on that route. The primary only asks etcd, and stays.
        victim = standbys[0]
        codec = ReplCodec()
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 1000)
        s.setsockopt(zmq.IDENTITY, f"{victim.name}#forged".encode())
        assert connect_watched(s, f"tcp://127.0.0.1:{primary.port + 2}") == "succeeded"
        s.send(codec.encode(Follow(victim.name, term)))
        assert s.poll(10_000), "the primary sent no Install to a Follow on a fresh identity"
        s.send(codec.encode(Refuse(term + 100, "intruder")))
        # It reached the primary (which logs either outcome); then nothing may have changed.
        wait_until(lambda: any(m in primary.stderr() for m in (
            "an unauthenticated Refuse of term", "steps down")), 10, 0.05,
            "the primary to act on the forged Refuse on the taken route")
        s.close()
        wait_progress(writers, 30, 30, "writes after the taken route", group)
        assert_unchanged(group, primary, term)
        check_end(group, history, writers)


@pytest.mark.parametrize(("toml_extra", "member", "message"), [
    ("", "m0", "lists no [members.m0]"),
    ('[members.m0]\npublic_key_file = "keys/m1.key"\n', "m0",
     "is not the key of this broker's secret_key_file"),
    ('[members.m0]\npublic_key_file = "keys/alice.key"\n', "m0",
     "a member key is never a client's"),
    ('[members.m0]\npublic_key_file = "keys/m0.key"\n[members.m1]\n'
     'public_key_file = "keys/m0.key"\n', "m0", "same key as member m0"),
])
def test_group_security_config_is_checked(tmp_path: Path, toml_extra: str, member: str,
                                          message: str) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    for name in ("m0", "m1", "alice"):
        zmq.auth.create_certificates(str(keys), name)
    (tmp_path / "c.toml").write_text(f"""
[broker]
secret_key_file = "keys/{member}.key_secret"

[clients.alice]
public_key_file = "keys/alice.key"
permissions = {{ "*" = ["read"] }}

{toml_extra}""")
    r = subprocess.run([sys.executable, "-m", "broker", "--bind", "tcp://127.0.0.1:1",
                        "--config", str(tmp_path / "c.toml"), "--group", "g", "--member",
                        member, "--data-dir", str(tmp_path / "d"), "--etcd",
                        "http://127.0.0.1:1"],
                       cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=30)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert message in r.stderr, r.stderr

