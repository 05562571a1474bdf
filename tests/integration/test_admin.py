"""node/admin.py against a real broker: the admin calls the CLI and the benchmark share
(issue 13 item 3), and Head's own reply struct (issue 13 item 7)."""

from __future__ import annotations

import time

import pytest

from broker.errors import InvalidKey, StorageError, VersionConflict
from broker.protocol import Error, HeadReply, WriteOk
from node import SharedMemory, SharedMemoryConfig, admin
from node.replies import expect
from tests.conftest import BrokerProcess


def test_head_stats_and_digest_through_the_admin_module(broker_process: BrokerProcess) -> None:
    config = SharedMemoryConfig(namespace="adm", broker=broker_process.address, max_keys=0)
    with SharedMemory(config) as shm:
        deadline = time.monotonic() + 10
        absent = admin.head(shm.node, "never-opened", deadline)
        assert absent == HeadReply(absent.epoch, "never-opened", 0)
        assert "never-opened" not in admin.stats(shm.node, deadline).namespaces  # created nothing
        version = shm.set("k", 1)
        head = admin.head(shm.node, "adm", deadline)
        assert (head.epoch, head.seq) == (shm.status().epoch, version)
        remote = admin.digest(shm.node, "adm", deadline)
        assert (remote.seq, remote.digest) == shm.local_digest()
        assert admin.stats(shm.node, deadline).namespaces["adm"]["seq"] == version


def test_expect_raises_the_named_class_or_says_what_came() -> None:
    with pytest.raises(InvalidKey, match="bad key"):
        expect(Error("InvalidKey", "bad key"), WriteOk, "a write")
    with pytest.raises(VersionConflict) as conflict:
        expect(Error("VersionConflict", "moved", 7), WriteOk, "a write")
    assert conflict.value.current_version == 7
    with pytest.raises(StorageError, match="unexpected reply to Head: WriteOk"):
        expect(WriteOk("e", 1), HeadReply, "Head")
    assert expect(WriteOk("e", 1), WriteOk, "a write") == WriteOk("e", 1)
