"""A standby's group commit (broker/group_shell.py ``_drain_dealer``): the Appends queued for a
standby while it could not take them are made durable by one fsync and acknowledged by one Ack
for the highest lsn, and that weakens nothing: every acknowledged write is on every member's
disk (the history checker against the primary's log, then each member's data dir recovered
offline and compared with that log).

Real processes: a 3-member etcd (the ``etcd_cluster`` fixture) and three ``python -m broker
--group`` members. How the Appends come to queue: the primary ships every turn to every
follower but waits only for its sync set. The standby ``m2`` is SIGSTOPped until the primary
(lease and ack timeout 1 s) has removed it from the sync set and committed more writes
without it; those turns wait in m2's socket. ``m2`` runs with ``--lease-ttl 10`` (its own
silence detection waits 10 s), so when it resumes it takes the queue instead of following
again for a full Install; it is started after the other two have formed, so it is never the
primary.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_until
from tests.history import History
from tests.integration.test_group import (
    Group,
    Member,
    Writer,
    check_end,
    free_port_triple,
    wait_progress,
)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_standby_makes_the_appends_queued_while_it_was_stopped_durable_at_once(
        tmp_path: Path, etcd_cluster: Any) -> None:
    etcd = etcd_cluster.endpoint_string
    first = [Member(f"m{i}", free_port_triple(), tmp_path / f"m{i}", etcd) for i in range(2)]
    late = Member("m2", free_port_triple(), tmp_path / "m2", etcd,
                  extra=("--lease-ttl", "10"))  # argparse: the last --lease-ttl wins
    group = Group(first)
    try:
        for m in first:
            m.start()
        group.wait_formed(30, sync=1)
        group.members.append(late.start())
        primary = group.wait_formed(30, sync=2)
        assert primary is not late
        history = History()
        writers = [Writer(f"w{i}", group.addresses(), history).start() for i in range(2)]
        wait_progress(writers, 50, 30, "writes through the group of 3", group)
        before = late.stats()
        assert before is not None and before["group_largest_append_batch"] >= 1, before

        late.signal(signal.SIGSTOP)
        try:
            wait_until(lambda: (primary.stats() or {}).get("group_sync_set") == 1, 30, 0.05,
                       "the primary to drop the stopped standby from its sync set")
            lsn_at_stop = (primary.stats() or {}).get("group_lsn", 0)
            # Writes the stopped standby has not taken: their Appends queue for it.
            wait_progress(writers, 40, 30, "writes without the stopped standby", group)
        finally:
            late.signal(signal.SIGCONT)
        wait_until(lambda: (primary.stats() or {}).get("group_sync_set") == 2, 30, 0.05,
                   "the resumed standby to rejoin the sync set")
        after = late.stats()
        assert after is not None
        # Batching happened: one fsync made several queued Appends durable ...
        assert after["group_largest_append_batch"] > 1, (before, after)
        # ... taken from the queue, not replaced by a full Install (the standby warns when it
        # follows again: after a gap, a failed apply, or silence).
        assert "following again" not in late.stderr(), late.stderr()
        assert (primary.stats() or {}).get("group_lsn", 0) > lsn_at_stop
        wait_progress(writers, 30, 30, "writes after it rejoined", group)
        # Every acknowledged write is in the primary's log exactly once, and every member's
        # data dir, recovered offline, equals that log.
        check_end(group, history, writers)
    finally:
        for m in (*first, late):
            if m.alive:
                try:
                    m.signal(signal.SIGCONT)
                except ProcessLookupError:
                    pass
        group.members = [*first, late]
        group.stop_all()
