"""Say what is not durable (issue 12 item 4): an in-memory broker warns that a restart loses
everything, and a node whose broker came back with a new history says what it lost."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from node import SharedMemory, SharedMemoryConfig
from tests.conftest import BrokerProcess, free_port_pair, wait_until

pytestmark = pytest.mark.timeout(90)


def broker_stderr(b: BrokerProcess) -> str:
    # pread: the child shares the file offset, so the parent must not seek
    return os.pread(b.stderr_file.fileno(), 1 << 20, 0).decode()


def test_in_memory_broker_warns_and_a_durable_one_does_not(tmp_path: Path) -> None:
    memory = BrokerProcess(free_port_pair()).start()
    durable = BrokerProcess(free_port_pair(), ("--data-dir", str(tmp_path))).start()
    try:
        text = broker_stderr(memory)
        assert "WARNING" in text and "no --data-dir" in text and "LOST" in text, text
        assert "no --data-dir" not in broker_stderr(durable)
    finally:
        memory.stop()
        durable.stop()


@pytest.mark.slow
def test_node_meeting_a_new_epoch_warns_how_many_keys_were_reset(
        caplog: pytest.LogCaptureFixture) -> None:
    port = free_port_pair()
    broker = BrokerProcess(port).start()
    shm = SharedMemory(SharedMemoryConfig(namespace="reset_me", broker=broker.address,
                                          retry_interval=0.25))
    try:
        shm.set_many({f"k{i}": i for i in range(7)})
        old_epoch = shm.status().epoch
        broker.kill()
        with caplog.at_level(logging.WARNING, logger="sharedmem"):
            broker = BrokerProcess(port).start()
            wait_until(lambda: shm.status().epoch not in (None, old_epoch), 30,
                       message="the node to resync to the new epoch")
        resets = [r.getMessage() for r in caplog.records if "was reset" in r.getMessage()]
        assert len(resets) == 1, caplog.text
        assert "'reset_me'" in resets[0] and "7 keys at seq 7 replaced by 0 keys" in resets[0]
    finally:
        shm.close()
        broker.stop()
