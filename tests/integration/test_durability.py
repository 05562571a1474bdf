"""Issue 3: acknowledged writes survive SIGKILL, torn tails are dropped, a corrupt middle stops
start-up until repaired, compaction keeps everything, and a full disk refuses writes cleanly."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from broker.core import BrokerCore
from broker.durable import SNAP_HEADER, DurableLog, read_snapshot, scan_segment, seg_path
from broker.errors import StorageError
from broker.protocol import Set
from broker.recovery import CorruptLog, recover
from broker.turn import persist
from node import SharedMemory, SharedMemoryConfig
from tests.conftest import ROOT, BrokerProcess, child_env, free_port_pair, start_agent, wait_until

WRITER = r"""
import os, sys, time
from node import SharedMemory, SharedMemoryConfig, BrokerUnavailable, StorageError
broker, name, stop_file, ack_file = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
# acks go to a file: a pipe nobody reads until the end would fill up and block the writer
acks = open(ack_file, "w", buffering=1)
cfg = SharedMemoryConfig(namespace="crash", broker=broker, max_keys=0, ttl=0,
                         request_timeout=3.0, retry_interval=0.2, connect_timeout=30)
shm = SharedMemory(cfg)
print("ready", flush=True)
i = 0
while not os.path.exists(stop_file):
    key = f"{name}_{i}"
    try:
        version = shm.set(key, {"writer": name, "i": i})
    except (BrokerUnavailable, StorageError):
        continue  # outcome unknown or broker down: the same key and value again
    acks.write(f"ack {key} {version}\n")
    i += 1
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    try:
        if shm.local_digest() == shm.broker_digest():
            acks.write("converged\n")
            break
    except (BrokerUnavailable, StorageError):
        pass
    time.sleep(0.05)  # poll
shm.close()
acks.close()
"""


def durable_broker(port: int, data_dir: Path, *extra: str) -> BrokerProcess:
    return BrokerProcess(port, ("--data-dir", str(data_dir), *extra)).start()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_crash_loop_keeps_every_acknowledged_write(tmp_path: Path) -> None:
    cycles = int(os.environ.get("SHAREDMEM_CRASH_CYCLES", "20"))
    rng = random.Random(int(os.environ.get("SHAREDMEM_SEED", "7")))
    port = free_port_pair()
    data = tmp_path / "data"
    stop_file = tmp_path / "stop"
    broker = durable_broker(port, data, "--compact-bytes", "300000")
    ack_files = [tmp_path / f"acks-w{n}.txt" for n in range(4)]
    writers = [start_agent(WRITER, broker.address, f"w{n}", str(stop_file), str(ack_files[n]))
               for n in range(4)]
    try:
        for w in writers:
            assert w.stdout is not None and w.stdout.readline().strip() == "ready"
        epoch = broker.epoch
        for _ in range(cycles):
            # let them write a while, then crash the broker mid-stream
            with SharedMemory(SharedMemoryConfig(namespace="crash", broker=broker.address,
                                                 max_keys=0, connect_timeout=30)) as probe:
                target = probe.seq + rng.randrange(50, 400)
                try:
                    wait_until(lambda p=probe, t=target: p.seq >= t, 60,  # noqa: B023
                               message="writers to make progress")
                except AssertionError:
                    dead = [(w.returncode, w.stderr.read() if w.stderr else "")
                            for w in writers if w.poll() is not None]
                    raise AssertionError(
                        f"no progress: probe {probe.status()}, broker digest "
                        f"{probe.broker_digest()}, broker alive {broker.alive}, "
                        f"dead writers {dead}") from None
            broker.kill()
            broker = durable_broker(port, data, "--compact-bytes", "300000")
            assert broker.epoch == epoch  # fsync=always: the history continues
        stop_file.write_text("stop")
        outputs = []
        for w, ack_file in zip(writers, ack_files, strict=True):
            _, err = w.communicate(timeout=120)
            assert w.returncode == 0, err
            outputs.append(ack_file.read_text())
    finally:
        for w in writers:
            if w.poll() is None:
                w.kill()
                w.wait(10)
        broker.stop()
    broker = durable_broker(port, data)
    try:
        with SharedMemory(SharedMemoryConfig(namespace="crash", broker=broker.address,
                                             max_keys=0, connect_timeout=30)) as check:
            total = 0
            for n, out in enumerate(outputs):
                lines = out.split("\n")
                assert "converged" in lines, f"writer w{n} did not converge"
                acks = [line.split() for line in lines if line.startswith("ack ")]
                versions = [int(v) for _, _, v in acks]
                assert versions == sorted(versions) and len(set(versions)) == len(versions), \
                    "versions went backwards or repeated"
                for _, key, version in acks:
                    i = int(key.split("_")[1])
                    assert check.get(key) == {"writer": f"w{n}", "i": i}, key
                    assert check.get_metadata(key).version == int(version)
                total += len(acks)
            assert total > cycles * 50
            # Nothing unattempted: every key is one a writer tried, with the value it tried
            # (a writer tries key i only after key i-1 was acknowledged, so at most one
            # unacknowledged key per writer can exist: the one in flight at the end).
            acked_per_writer = {f"w{n}": sum(1 for line in out.split("\n")
                                             if line.startswith("ack "))
                                for n, out in enumerate(outputs)}
            for key in check.list_keys("*"):
                writer, _, i = key.partition("_")
                assert writer in acked_per_writer and int(i) <= acked_per_writer[writer], key
                assert check.get(key) == {"writer": writer, "i": int(i)}, key
            assert check.local_digest() == check.broker_digest()
    finally:
        broker.stop()


# ---------------------------------------------------------------------- file-level tests


def write_batches(data: Path, n: int) -> list[str]:
    """Write ``n`` acknowledged single-key batches; return the digest after each."""
    log = DurableLog(data)
    core = BrokerCore(log=log)
    recover(core, log)
    digests = []
    for i in range(n):
        turn = core.run_turn(
            [(None, Set(b"c" * 12, i + 1, "ns", 0, f"k{i}", b'{"i":%d}' % i, None))], 0.0, 1.0)
        assert persist(core, log, turn)
        digests.append(core.namespaces["ns"].digest())
    log.close()
    return digests


def recover_digest(data: Path) -> str:
    log = DurableLog(data)
    core = BrokerCore(log=log)
    try:
        recover(core, log)
        return core.namespaces["ns"].digest()
    finally:
        log.close()


@pytest.mark.timeout(120)
def test_torn_tail_at_every_offset_of_the_last_record(tmp_path: Path) -> None:
    data = tmp_path / "orig"
    digests = write_batches(data, 5)
    seg = seg_path(data, 1)
    res = scan_segment(seg)
    assert res.error is None and len(res.records) == 6  # namespace record + 5 batches
    size = seg.stat().st_size
    last_start = max(cut for cut in range(size) if len(scan_segment_bytes(seg, cut).records) == 5
                     and scan_segment_bytes(seg, cut).error is None)
    assert last_start < size
    for cut in range(last_start, size):
        trial = tmp_path / f"cut{cut}"
        shutil.copytree(data, trial)
        with open(seg_path(trial, 1), "r+b") as f:
            f.truncate(cut)
        assert recover_digest(trial) == digests[3], f"cut at {cut}"
        assert seg_path(trial, 1).stat().st_size == last_start  # torn bytes dropped
        shutil.rmtree(trial)
    assert recover_digest(data) == digests[4]


def scan_segment_bytes(seg: Path, cut: int):
    tmp = seg.with_name("probe.bin")
    tmp.write_bytes(seg.read_bytes()[:cut])
    try:
        return scan_segment(tmp)
    finally:
        tmp.unlink()


@pytest.mark.timeout(120)
def test_corruption_in_the_middle_refuses_start_until_repair(tmp_path: Path) -> None:
    data = tmp_path / "data"
    digests = write_batches(data, 6)
    seg = seg_path(data, 1)
    raw = bytearray(seg.read_bytes())
    middle = len(raw) // 2
    raw[middle] ^= 0xFF
    seg.write_bytes(bytes(raw))
    with pytest.raises(CorruptLog) as info:
        recover_digest(data)
    assert str(seg) in str(info.value) and "offset" in str(info.value)
    # the broker process refuses to start, naming file and offset
    port = free_port_pair()
    proc = subprocess.run(
        [sys.executable, "-m", "broker", "--bind", f"tcp://127.0.0.1:{port}",
         "--data-dir", str(data)],
        cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode != 0
    assert str(seg) in proc.stderr and f"offset {info.value.offset}" in proc.stderr
    repaired = subprocess.run([sys.executable, "-m", "broker", "repair", "--data-dir", str(data)],
                              cwd=ROOT, env=child_env(), capture_output=True, text=True,
                              timeout=60)
    assert repaired.returncode == 0 and "truncated" in repaired.stdout
    digest = recover_digest(data)
    assert digest in digests[:-1]  # exactly a prefix of the history, up to the bad record


def compacting_broker(tmp_path: Path) -> tuple[int, Path, BrokerProcess, SharedMemoryConfig]:
    """A durable broker that compacts every 100 kB, its port, data dir and a handle config."""
    port = free_port_pair()
    data = tmp_path / "data"
    broker = durable_broker(port, data, "--compact-bytes", "100000")
    return port, data, broker, SharedMemoryConfig(namespace="compact", broker=broker.address,
                                                  max_keys=0, ttl=0)


def compacting_load(shm: SharedMemory) -> dict[str, object]:
    """3 000 keys in 300 batches of 10, every 7th batch's first key deleted again: enough
    bytes for a broker with ``--compact-bytes 100000`` to compact several times. Returns what
    the namespace must hold."""
    expected: dict[str, object] = {}
    for i in range(300):
        batch = {f"k{i}_{j}": {"i": i, "j": j, "pad": "p" * 40} for j in range(10)}
        shm.set_many(batch)
        expected.update(batch)
        if i % 7 == 0:
            shm.delete(f"k{i}_0")
            expected.pop(f"k{i}_0")
    return expected


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_compaction_under_load_keeps_all_data_and_restart_restores_digest(
    tmp_path: Path,
) -> None:
    port, data, broker, cfg = compacting_broker(tmp_path)
    try:
        with SharedMemory(cfg) as shm:
            expected = compacting_load(shm)
            snaps = wait_until(lambda: sorted(data.glob("snap-*.snap")), 30,
                               message="a snapshot")
            assert snaps
            before = shm.broker_digest()
            assert shm.local_digest() == before
        broker.kill()
        assert len(list(data.glob("seg-*.log"))) <= 3  # old segments were removed
        broker = durable_broker(port, data)
        with SharedMemory(cfg) as shm:
            assert shm.broker_digest() == before
            assert shm.local_digest() == before
            assert len(shm.list_keys("k*")) == len(expected)
            for key in random.Random(1).sample(sorted(expected), 200):
                assert shm.get(key) == expected[key]
    finally:
        broker.stop()


def flip_payload_byte(path: Path) -> None:
    """Corrupt one byte in the middle of a snapshot's payload (its header stays valid)."""
    raw = bytearray(path.read_bytes())
    raw[SNAP_HEADER.size + (len(raw) - SNAP_HEADER.size) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_an_unreadable_newest_snapshot_after_compaction_falls_back_to_the_older_generation(
    tmp_path: Path,
) -> None:
    """docs/consistency.md section 7, fixed defect: compaction used to delete every older
    snapshot and segment, so one bad byte in the newest snapshot left a directory no restart
    and no repair could read. Now the previous generation stays: start-up falls back to it
    (naming the bad file), and repair moves the bad file aside."""
    port, data, broker, cfg = compacting_broker(tmp_path)
    try:
        with SharedMemory(cfg) as shm:
            expected = compacting_load(shm)  # acknowledged: it must survive
            # two generations on disk: the newest snapshot and the one before it
            snaps = wait_until(lambda: (s := sorted(data.glob("snap-*.snap")))[1:] and s, 30,
                               message="two snapshots")
            before = shm.broker_digest()
        broker.kill()
        newest = sorted(data.glob("snap-*.snap"))[-1]
        assert len(snaps) >= 2
        flip_payload_byte(newest)
        with pytest.raises(CorruptLog):
            read_snapshot(newest)
        broker = durable_broker(port, data)  # falls back, no manual step
        broker.stderr_file.seek(0)
        said = broker.stderr_file.read()
        assert str(newest) in said and "falling back" in said, said
        with SharedMemory(cfg) as shm:
            assert shm.broker_digest() == before  # every acknowledged write is there
            assert len(shm.list_keys("k*")) == len(expected)
            for key in random.Random(2).sample(sorted(expected), 100):
                assert shm.get(key) == expected[key]
        broker.stop()
        repaired = subprocess.run(
            [sys.executable, "-m", "broker", "repair", "--data-dir", str(data)],
            cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=60)
        assert repaired.returncode == 0, repaired.stderr
        assert f"{newest}.bad" in repaired.stdout and "new epoch" not in repaired.stdout
        assert not newest.exists() and Path(f"{newest}.bad").exists()
        broker = durable_broker(port, data)
        with SharedMemory(cfg) as shm:
            assert shm.broker_digest() == before
    finally:
        broker.stop()


def _mount_tmpfs(path: Path, size: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_disk_full_refuses_writes_keeps_reads_and_resumes(tmp_path: Path) -> None:
    mnt = tmp_path / "tiny"
    if not _mount_tmpfs(mnt, "4m"):
        pytest.skip("needs root and tmpfs mounts to make a small disk")
    port = free_port_pair()
    broker = None
    try:
        data = mnt / "data"
        broker = durable_broker(port, data, "--compact-bytes", str(1 << 30))
        filler = mnt / "filler"
        cfg = SharedMemoryConfig(namespace="full", broker=broker.address, max_keys=0, ttl=0)
        with SharedMemory(cfg) as shm:
            shm.set("before", "safe")
            # fill the disk around the broker, leaving ~200 KB
            free = shutil.disk_usage(mnt).free
            filler.write_bytes(b"\0" * (free - 200_000))
            acked = {}
            refused = None
            for i in range(1000):
                try:
                    shm.set(f"big{i}", "x" * 20_000)
                    acked[f"big{i}"] = "x" * 20_000
                except StorageError as exc:
                    refused = exc
                    break
            assert refused is not None, "the disk never filled"
            assert "No space left" in str(refused) or "nothing changed" in str(refused)
            digest = shm.broker_digest()
            # a refused write changed nothing, and reads keep working
            with pytest.raises(StorageError):
                shm.set("during", "x" * 20_000)
            assert shm.broker_digest() == digest
            assert shm.get("before") == "safe"
            assert all(shm.get(k) == v for k, v in acked.items())
            # space comes back: writes work again
            filler.unlink()
            version = shm.set("after", "resumed")
            assert shm.get("after") == "resumed" and version == digest[0] + 1
        broker.kill()
        broker = durable_broker(port, data)
        with SharedMemory(cfg) as shm:
            assert shm.get("before") == "safe" and shm.get("after") == "resumed"
            assert all(shm.get(k) == v for k, v in acked.items())
    finally:
        if broker is not None:
            broker.stop()
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_unclean_stop_under_everysec_starts_a_new_epoch_whatever_the_new_policy(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    log = DurableLog(data, fsync="everysec")
    core = BrokerCore(log=log)
    recover(core, log)
    epoch = core.epoch
    turn = core.run_turn([(None, Set(b"c" * 12, 1, "ns", 0, "k", b"1", None))], 0.0, 1.0)
    assert persist(core, log, turn)
    log.close()  # no CLEAN marker: as after a crash
    log2 = DurableLog(data, fsync="always")
    core2 = BrokerCore(log=log2)
    recover(core2, log2)
    try:
        assert core2.epoch != epoch  # events published under everysec may be lost
        assert core2.namespaces["ns"].seq == 1
        # the remembered reply names the new epoch (a retry is answered, not re-applied)
        reply = core2.dedup.lookup(b"c" * 12, 1)
        assert reply is not None and reply.epoch == core2.epoch
    finally:
        log2.close()


def test_a_failed_flush_refuses_a_write_and_its_retry_in_the_same_turn() -> None:
    """If the original and its retry land in one turn whose flush fails, both are refused:
    the retry must not be told WriteOk for a write that was rolled back."""
    import zmq

    from broker.log import MemoryLog
    from broker.protocol import Error, WriteOk, reply_codec, request_codec
    from broker.server import Broker, BrokerConfig

    class FailingOnce(MemoryLog):
        failures = 1

        def flush(self) -> None:
            if self.failures:
                self.failures -= 1
                raise StorageError("write to the log failed (injected); nothing changed")

    port = free_port_pair()
    broker = Broker(BrokerConfig(bind=[f"tcp://127.0.0.1:{port}"]),
                    core=BrokerCore(log=FailingOnce()))
    broker.start()
    ctx = zmq.Context()
    try:
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(f"tcp://127.0.0.1:{port}")
        body = request_codec().encode(Set(b"r" * 12, 1, "ns", 0, "k", b"1", None))
        # queue both before the broker can run a turn: the loop drains them together
        broker.core.log.failures = 1
        dealer.send_multipart([b"", body])
        dealer.send_multipart([b"", body])
        replies = []
        for _ in range(2):
            assert dealer.poll(5000)
            replies.append(reply_codec().decode(dealer.recv_multipart()[1]))
        if all(isinstance(r, Error) for r in replies):
            assert "ns" not in broker.core.namespaces or broker.core.namespaces["ns"].seq == 0
        else:
            # the two landed in different turns: the first was refused, the retry applied
            assert isinstance(replies[0], Error) and isinstance(replies[1], WriteOk)
            assert broker.core.namespaces["ns"].seq == 1
        # a further retry is answered consistently with the state
        dealer.send_multipart([b"", body])
        assert dealer.poll(5000)
        last = reply_codec().decode(dealer.recv_multipart()[1])
        assert isinstance(last, WriteOk) and last.seq == 1
        assert broker.core.namespaces["ns"].seq == 1
    finally:
        ctx.destroy(linger=0)
        broker.stop()
