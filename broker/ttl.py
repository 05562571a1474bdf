"""TTL <-> deadline: the wire carries a TTL as seconds left (clocks of two processes never
agree); each process keeps a deadline on its own monotonic clock.

Why a module of its own: the state's apply and snapshots, the in-memory log's Fetch and the
core's snapshot chunks all convert, and must round the same way (a due key sends 0, never a
negative TTL). Pure.
"""

from __future__ import annotations


def deadline_after(ttl: float | None, now: float) -> float | None:
    """The deadline of a TTL received at ``now`` (None: never expires)."""
    return None if ttl is None else now + ttl


def ttl_left(deadline: float | None, now: float) -> float | None:
    """The TTL to send for a deadline at ``now``: seconds left, 0 once due (None: never)."""
    return None if deadline is None else max(0.0, deadline - now)
