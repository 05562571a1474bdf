"""Admin calls: requests that neither read a replica nor write, answered by the broker
(``Stats``, ``Head``, ``Digest``, and a ``Head`` as a bare round trip).

Why one module: the CLI (``sharedmem stats``, namespace probes), the API (``consistent=True``
reads, ``broker_digest``) and the benchmark (``scripts/benchkit/internals.py``) all need them;
each takes a ``Node`` (``SharedMemory.node`` for a handle's) and a monotonic deadline, sends on
the node's request channels, and unwraps the reply with ``node.replies.expect``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from broker.protocol import Digest, DigestReply, Head, HeadReply, Stats, StatsReply
from node.replies import expect

if TYPE_CHECKING:
    from node.node import Node


def stats(node: Node, deadline: float) -> StatsReply:
    """The broker's counters and the namespaces this client may read."""
    return expect(node.request(Stats(), deadline), StatsReply, "Stats")


def head(node: Node, namespace: str, deadline: float) -> HeadReply:
    """The broker's epoch and head seq of ``namespace``; creates nothing. Raises
    ``KeyNotFound``-style errors the broker names (e.g. ``AccessDenied``)."""
    return expect(node.request(Head(namespace), deadline), HeadReply, "Head")


def digest(node: Node, namespace: str, deadline: float) -> DigestReply:
    """(seq, digest) of the broker's copy of ``namespace``."""
    return expect(node.request(Digest(namespace), deadline), DigestReply, "Digest")
