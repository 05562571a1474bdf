"""Bulk operations and broker-side reads against real brokers (issue 12 item 5, acceptance 4):
delete_pattern of 50 000 keys is one atomic batch on every node, permissions, bad patterns, the
namespace limit changed for every node (and after a restart), and the CLI commands that read
from the broker without copying the namespace (its RSS stays flat on a 40 MB namespace)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from broker.core import BrokerCore
from broker.durable import DurableLog
from broker.protocol import SetMaxKeys
from broker.recovery import recover
from broker.turn import persist
from node import (
    AccessDenied,
    AsyncSharedMemory,
    KeyNotFound,
    PatternError,
    SharedMemory,
    SharedMemoryConfig,
    StorageError,
)
from tests.conftest import (
    ROOT,
    BrokerProcess,
    child_env,
    run_agent,
    secure_broker,
    start_agent,
    wait_until,
)


def cfg(broker: BrokerProcess, namespace: str, **kw: object) -> SharedMemoryConfig:
    kw.setdefault("max_keys", 0)
    return SharedMemoryConfig(namespace=namespace, broker=broker.address, **kw)  # type: ignore[arg-type]


def cli(broker: BrokerProcess, *args: str, timeout: float = 60.0
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node", "--broker", broker.address, *args],
                          cwd=ROOT, env=child_env(), capture_output=True, text=True,
                          timeout=timeout)


# --------------------------------------------------------------------------- atomicity

OBSERVER = r"""
import json, sys, threading, time
from node import SharedMemory, SharedMemoryConfig
shm = SharedMemory(SharedMemoryConfig(namespace="bulk", broker=sys.argv[1], max_keys=0))
n = int(sys.argv[2])
watcher = shm.watch("user_*", initial=False)
samples = []
stop = threading.Event()

def sample():
    # Another reader on this node: every count it sees must be all or nothing.
    while not stop.is_set():
        samples.append(len(shm.list_keys("user_*")))

shm.sync_with_broker()
assert len(shm.list_keys("user_*")) == n, "not filled"
t = threading.Thread(target=sample)
t.start()
print("ready", flush=True)
versions = []
while len(versions) < n:
    ch = watcher.get(timeout=30)
    assert ch is not None, f"only {len(versions)} deletes seen"
    assert ch.op == "delete", ch
    versions.append(ch.version)
deadline = time.monotonic() + 30
while (not samples or samples[-1] != 0) and time.monotonic() < deadline:
    time.sleep(0.001)  # poll: the sampler is at most one list_keys behind
stop.set()
t.join()
print(json.dumps({"versions": [versions[0], versions[-1]], "count": len(versions),
                  "consecutive": versions == list(range(versions[0], versions[0] + n)),
                  "sample_values": sorted(set(samples)), "samples": len(samples),
                  "others": shm.list_keys("other*")}), flush=True)
shm.close()
"""


@pytest.mark.timeout(180)
def test_delete_pattern_of_50k_keys_is_one_atomic_batch_on_every_node(
        broker_process: BrokerProcess) -> None:
    n = 50_000
    with SharedMemory(cfg(broker_process, "bulk")) as shm:
        for i in range(0, n, 10_000):
            shm.set_many({f"user_{j}": j for j in range(i, i + 10_000)})
        shm.set_many({"other_1": 1, "other_2": 2, "user": "no underscore"})
        observer = start_agent(OBSERVER, broker_process.address, str(n))
        try:
            assert observer.stdout is not None
            line = observer.stdout.readline().strip()
            assert line == "ready", observer.stderr.read() if observer.stderr else line
            seq_before = shm.seq
            deleted = shm.delete_pattern("user_*")
            assert deleted == n
            assert shm.list_keys("user_*") == []  # read-your-writes on the writer
            out, err = observer.communicate(timeout=120)
        finally:
            if observer.poll() is None:
                observer.kill()
                observer.wait(10)
        assert observer.returncode == 0, err
        report = json.loads(out.strip().splitlines()[-1])
        assert report["count"] == n and report["consecutive"] is True
        # One batch: exactly the seqs right after the writer's last write, nothing between.
        assert report["versions"] == [seq_before + 1, seq_before + n]
        assert shm.seq == seq_before + n
        # No reader on the other node ever saw a part of the keys gone.
        assert report["sample_values"] == [0, n], report
        assert report["others"] == ["other_1", "other_2"]
        assert shm.get("user") == "no underscore"


def test_delete_many_get_many_and_drop_namespace(broker_process: BrokerProcess) -> None:
    with SharedMemory(cfg(broker_process, "many", max_keys=10)) as shm:
        shm.set_many({"a": 1, "b": [2], "c": {"x": 3}})
        assert shm.get_many(["c", "zz", "a"]) == {"c": {"x": 3}, "a": 1}
        assert list(shm.get_many(["c", "a"], consistent=True)) == ["c", "a"]
        assert shm.delete_many(["a", "zz", "a"]) == 1
        assert shm.delete_many([]) == 0
        assert shm.get_many(["a", "b"]) == {"b": [2]}
        with pytest.raises(PatternError):
            shm.delete_pattern("[unclosed")
        with pytest.raises(PatternError):
            shm.list_keys("bad\\")
        seq = shm.seq
        assert shm.drop_namespace() == 2
        assert shm.list_keys() == [] and shm.seq == seq + 2
        info = shm.namespace_info()
        assert (info.keys, info.max_keys, info.seq) == (0, 10, seq + 2)
        shm.set("again", 1)  # the namespace still works after the drop
        assert shm.get("again") == 1


def test_async_bulk_calls(broker_process: BrokerProcess) -> None:
    import asyncio

    async def main() -> None:
        async with AsyncSharedMemory(cfg(broker_process, "abulk")) as shm:
            await shm.set_many({"k1": 1, "k2": 2, "j": 3})
            assert await shm.get_many(["k1", "j", "none"]) == {"k1": 1, "j": 3}
            assert await shm.delete_pattern("k*") == 2
            assert await shm.delete_many(["j"]) == 1
            await shm.set_max_keys(5)
            assert (await shm.namespace_info()).max_keys == 5
            assert shm.config.max_keys == 5
            await shm.set("x", 1)
            assert await shm.drop_namespace() == 1

    asyncio.run(main())


# --------------------------------------------------------------------------- max_keys


def test_set_max_keys_is_seen_by_every_node_and_refused_below_the_count(
        broker_process: BrokerProcess) -> None:
    with SharedMemory(cfg(broker_process, "lim", max_keys=3)) as shm:
        shm.set_many({"a": 1, "b": 2})
        with pytest.raises(StorageError, match="holds 2 keys"):
            shm.set_max_keys(1)
        shm.set_max_keys(2)
        out = run_agent("""
import sys
from node import SharedMemory, SharedMemoryConfig, StorageError
with SharedMemory(SharedMemoryConfig(namespace="lim", broker=sys.argv[1], max_keys=None)) as s:
    print(s.config.max_keys, s.namespace_info().max_keys)
    try:
        s.set("c", 3)
    except StorageError as exc:
        print("refused", "max_keys 2" in str(exc))
""", broker_process.address).stdout.split()
        assert out == ["2", "2", "refused", "True"]
        shm.set_max_keys(0)  # unlimited, again for every node
        shm.set("c", 3)
        assert cli(broker_process, "-n", "lim", "max-keys").stdout.strip() == "0"
        r = cli(broker_process, "-n", "lim", "max-keys", "1")
        assert r.returncode == 4 and "holds 3 keys" in r.stderr, r.stderr
        r = cli(broker_process, "-n", "lim", "--json", "max-keys", "50")
        assert r.returncode == 0 and json.loads(r.stdout) == {
            "namespace": "lim", "max_keys": 50, "keys": 3}
        assert shm.namespace_info().max_keys == 50


def test_a_changed_max_keys_survives_a_restart_from_the_log(tmp_path: Path) -> None:
    data = tmp_path / "data"
    log = DurableLog(data)
    core = BrokerCore(log=log)
    recover(core, log)
    for no, limit in ((1, 5), (2, 9)):  # the first creates the namespace, the second changes it
        turn = core.run_turn([(None, SetMaxKeys(b"c" * 12, no, "ns", limit))], 0.0, 1.0)
        assert persist(core, log, turn)
    log.close()
    log = DurableLog(data)
    core = BrokerCore(log=log)
    try:
        recover(core, log)
        assert core.namespaces["ns"].max_keys == 9  # the last record wins
    finally:
        log.close()


# --------------------------------------------------------------------------- permissions


@pytest.mark.timeout(120)
def test_bulk_deletes_need_write_and_drop_needs_admin(tmp_path: Path) -> None:
    broker, keys = secure_broker(tmp_path, '{ "app1" = ["read", "write"], "app2" = ["read"] }')

    def sec(who: str, namespace: str) -> SharedMemoryConfig:
        return SharedMemoryConfig(namespace=namespace, broker=broker.address, max_keys=0,
                                  curve_key_file=str(keys / f"{who}.key_secret"),
                                  broker_key_file=str(keys / "broker.key"))

    try:
        with SharedMemory(sec("carol", "app2")) as admin:
            admin.set_many({"user_1": 1, "user_2": 2})
            with SharedMemory(sec("alice", "app2")) as reader:
                with pytest.raises(AccessDenied, match="may not write"):
                    reader.delete_pattern("user_*")
                with pytest.raises(AccessDenied, match="may not write"):
                    reader.delete_many(["user_1"])
                assert reader.get_many(["user_1", "user_2"]) == {"user_1": 1, "user_2": 2}
            with SharedMemory(sec("alice", "app1")) as writer:
                writer.set_many({"user_1": 1, "user_3": 3})
                assert writer.delete_pattern("user_*") == 2
                with pytest.raises(AccessDenied, match="may not admin"):
                    writer.drop_namespace()
                with pytest.raises(AccessDenied, match="may not admin"):
                    writer.set_max_keys(5)
            assert admin.list_keys("user_*") == ["user_1", "user_2"]  # nothing was deleted
            assert admin.drop_namespace() == 2
    finally:
        broker.stop()


# --------------------------------------------------------------------------- CLI


def test_cli_bulk_commands(broker_process: BrokerProcess) -> None:
    with SharedMemory(cfg(broker_process, "clib")) as shm:
        shm.set_many({"user_1": "one", "user_2": {"n": 2}, "keep": 1})
        r = cli(broker_process, "-n", "clib", "--json", "mget", "user_1", "nope", "user_2")
        assert r.returncode == 1 and "'nope'" in r.stderr
        assert json.loads(r.stdout) == {"user_1": "one", "user_2": {"n": 2}}
        assert cli(broker_process, "-n", "clib", "--raw", "get", "user_1").stdout == "one\n"
        r = cli(broker_process, "-n", "clib", "touch", "keep", "300")
        assert r.returncode == 0, r.stderr
        meta = json.loads(cli(broker_process, "-n", "clib", "--json", "meta", "keep").stdout)
        assert meta["version"] == 3 and 0 < meta["ttl"] <= 300
        assert cli(broker_process, "-n", "clib", "touch", "nope", "1").returncode == 1
        bad = cli(broker_process, "-n", "clib", "del", "--pattern", "user_[")
        assert bad.returncode == 2 and "PatternError" in bad.stderr
        r = cli(broker_process, "-n", "clib", "del", "--pattern", "user_*")
        assert (r.returncode, r.stdout.strip()) == (0, "deleted 2 keys"), r.stderr
        assert shm.list_keys() == ["keep"]
        assert cli(broker_process, "-n", "clib", "ls").stdout.split() == ["keep"]
        r = cli(broker_process, "-n", "clib", "drop")
        assert r.returncode == 0 and "deleted 1 keys" in r.stdout
        wait_until(lambda: shm.list_keys() == [])
        missing = cli(broker_process, "-n", "nosuchns", "del", "--pattern", "*")
        assert missing.returncode == 1 and "does not exist" in missing.stderr
        assert cli(broker_process, "-n", "nosuchns", "drop").returncode == 1
        with pytest.raises(KeyNotFound):
            shm.get("keep")


RSS_OF_GET = r"""
import resource, subprocess, sys
subprocess.run([sys.executable, "-m", "node", "--broker", sys.argv[1], "-n", sys.argv[2],
                "get", "k0"], check=True, stdout=subprocess.DEVNULL)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)  # KiB on Linux
"""


@pytest.mark.timeout(180)
def test_cli_get_of_one_key_never_copies_a_40mb_namespace(broker_process: BrokerProcess) -> None:
    with SharedMemory(cfg(broker_process, "small")) as small:
        small.set("k0", "x")
    with SharedMemory(cfg(broker_process, "big")) as big:
        blob = "x" * 10_000
        for i in range(0, 4000, 100):  # 4000 x 10 kB = 40 MB
            big.set_many({f"k{j}": blob for j in range(i, i + 100)})
        assert big.namespace_info().keys == 4000

    def max_rss_kib(namespace: str) -> int:
        # A fresh parent per measurement: RUSAGE_CHILDREN is the largest of its reaped children,
        # i.e. exactly the CLI process.
        return int(run_agent(RSS_OF_GET, broker_process.address, namespace).stdout.strip())

    baseline = max_rss_kib("small")
    on_big = max_rss_kib("big")
    growth_mib = (on_big - baseline) / 1024
    print(f"CLI max RSS: {baseline} KiB (small), {on_big} KiB (40 MB namespace)")
    assert growth_mib < 10, f"CLI get grew by {growth_mib:.1f} MiB on a 40 MB namespace"
