"""A group member that steps down refuses every snapshot it was asked for (``NotPrimary``)
instead of sending its state, which can hold records that were never committed: the turn
whose commit failed is not rolled back, and a standby applies what it acked. The broker's
loop then calls ``Subscriptions.refuse_all`` instead of ``step`` (broker/server.py).

The race itself (a Snapshot drained in the same turn as an Append the sync set refuses) is
not reproducible on demand with processes; this drives the real ``Subscriptions`` and
``BrokerCore`` with the messages the loop would hand them, without sockets.
"""

from __future__ import annotations

from broker.access import Access
from broker.core import BrokerCore
from broker.protocol import NotPrimary, Reply, Snapshot, SnapshotReply
from broker.subscriptions import SNAPSHOT_CHUNK, Subscriptions
from tests.core.test_broker_core import EPOCH, NS, Client, shell


def barrier(subs: Subscriptions, nonce: bytes) -> None:
    subs._on_subscription(b"\x01" + NS.encode() + b"\0" + nonce)


def test_a_member_that_stepped_down_refuses_waiting_ready_and_running_snapshots() -> None:
    core, c = BrokerCore(EPOCH), Client()
    for i in range(SNAPSHOT_CHUNK + 10):  # more than one chunk: the first job keeps running
        shell(core, c.set(f"k{i}", b"1"))
    sent: list[tuple[bytes, Reply]] = []
    subs = Subscriptions(core, Access(None), lambda env, reply: sent.append((env[0], reply)))

    barrier(subs, b"n1")
    subs.on_snapshot([b"running"], Snapshot(NS, 0, 1, b"n1"), 0.0)
    subs.step()  # starts the job and sends its first chunk
    assert [(p, type(r)) for p, r in sent] == [(b"running", SnapshotReply)]
    assert core.namespaces[NS].freezes  # the job's view shadows the state
    subs.on_snapshot([b"waiting"], Snapshot(NS, 0, 2, b"n2"), 0.0)  # no barrier yet
    barrier(subs, b"n3")
    subs.on_snapshot([b"ready"], Snapshot(NS, 0, 3, b"n3"), 0.0)
    assert subs.busy and subs.pending

    refusal = NotPrimary(4, "tcp://127.0.0.1:9")
    subs.refuse_all(refusal)
    assert sorted(p for p, r in sent[1:] if r == refusal) == [b"ready", b"running", b"waiting"]
    assert len(sent) == 4  # no further chunk of anything
    assert not subs.busy and not subs.pending
    assert core.namespaces[NS].freezes == []  # the abandoned view no longer shadows writes
    subs.step()
    barrier(subs, b"n2")  # a late barrier finds nothing to start
    subs.step()
    assert len(sent) == 4
