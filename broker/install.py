"""A group standby takes the primary's whole state (an Install) into its data dir and core.

Owns one step: replace everything the standby holds with an ``InstallImage``, durably and in
the log's own format, so that a restart recovers exactly the installed state (then the records
appended after it). The order makes a crash at any point safe:

1. write the image's snapshot as ``snap-N`` (N = the next segment number), fsynced and renamed;
2. open the empty segment N (header fsynced) and write EPOCH;
3. delete every older segment and snapshot (recovery would skip them anyway: it starts from the
   newest snapshot).

A crash before 1 leaves the old state; after 1, recovery starts from the installed snapshot.
Must never run while the log's compaction thread writes (it waits for it first).
"""

from __future__ import annotations

import logging
import re
import time

import msgspec

from broker.core import BrokerCore, DedupTable
from broker.durable import DurableLog, fsync_dir, write_snapshot
from broker.recovery import EPOCH_FILE, load_snapshot, write_small_file
from broker.replication import InstallImage

log = logging.getLogger("sharedmem.broker.group")

_NUMBERED = re.compile(r"(?:seg-(\d{8})\.log|snap-(\d{8})\.snap)")


def install_image(core: BrokerCore, durable: DurableLog, image: InstallImage) -> None:
    """Make ``image`` the standby's durable and live state (see the module doc)."""
    while durable.compacting:  # a snapshot thread still writes into the data dir
        durable.finish_compaction()
        if durable.compacting:
            time.sleep(0.01)  # the compaction thread is joined by finish_compaction
    n = durable.segment + 1
    snapshot = msgspec.structs.replace(image.snapshot, segment=n)
    data_dir = durable.data_dir
    write_snapshot(data_dir, snapshot)
    durable.open_segment(n, snapshot.epoch)
    write_small_file(data_dir / EPOCH_FILE, snapshot.epoch)
    for path in data_dir.iterdir():
        m = _NUMBERED.fullmatch(path.name)
        if m and int(m.group(1) or m.group(2)) < n:
            path.unlink(missing_ok=True)
    fsync_dir(data_dir)
    # The installed snapshot is the only generation: what was older is another history.
    durable.base_snapshot = n
    mono, wall = time.monotonic(), time.time()
    core.namespaces.clear()
    core.dedup = DedupTable()
    durable.clear()
    core.epoch = snapshot.epoch
    load_snapshot(core, snapshot, snapshot.epoch, mono, wall)
    for retained in image.retained:
        if retained.events:
            durable.replay(retained.namespace, retained.events, mono)
    log.info("installed the primary's state: %d namespaces, %d remembered replies, epoch %s",
             len(snapshot.namespaces), len(snapshot.dedup), snapshot.epoch)
