"""The ``sharedmem`` CLI (``python -m node``) against a real broker process: every command, its
output, its exit codes (0 ok, 1 not found, 2 bad input, 3 unavailable, 4 refused), a 100 000-key
dump/load round trip, ``watch`` until a signal, and ``scripts/demo``."""

from __future__ import annotations

import json
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from importlib.metadata import entry_points
from pathlib import Path
from typing import IO

import pytest

from node import SharedMemory, SharedMemoryConfig
from node.cli import COMMANDS
from tests.conftest import (
    ROOT,
    BrokerProcess,
    child_env,
    free_port_pair,
    secure_broker,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)


def cli(*args: str, broker: BrokerProcess | None = None, stdin: str | bytes | None = None,
        stdout: IO | None = None, env: dict[str, str] | None = None,
        timeout: float = 30.0) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "node"]
    if broker is not None:
        cmd += ["--broker", broker.address]
    if isinstance(stdin, str):
        stdin = stdin.encode()
    r = subprocess.run(
        [*cmd, *args], cwd=ROOT, env=env or child_env(), input=stdin,
        stdout=stdout if stdout is not None else subprocess.PIPE, stderr=subprocess.PIPE,
        timeout=timeout,
    )
    r.stdout = r.stdout.decode() if r.stdout is not None else None
    r.stderr = r.stderr.decode()
    return r


def shm_for(broker: BrokerProcess, namespace: str, max_keys: int = 0) -> SharedMemory:
    return SharedMemory(SharedMemoryConfig(namespace=namespace, broker=broker.address,
                                           max_keys=max_keys, ttl=0))


def stats(broker: BrokerProcess) -> dict:
    r = cli("stats", "--json", broker=broker)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


# --------------------------------------------------------------------------- help


@pytest.mark.timeout(30)
def test_help_documents_every_command_and_the_exit_codes() -> None:
    r = cli("--help")
    assert r.returncode == 0, r.stderr
    for name in ["get", "set", "del", "ls", "meta", "watch", "stats", "dump", "load"]:
        assert re.search(rf"^\s+{name}\s+\S", r.stdout, re.M), f"{name} undocumented:\n{r.stdout}"
    assert set(COMMANDS) == {"get", "set", "del", "ls", "meta", "watch", "stats", "dump", "load",
                             "mget", "touch", "drop", "max-keys"}
    for code in ["0  ok", "1  not found", "2  usage", "3  broker unavailable", "4  refused",
                 "5  access denied"]:
        assert code in r.stdout
    for opt in ["--broker", "--namespace", "--max-keys", "--json", "--timeout",
                "SHAREDMEM_BROKER"]:
        assert opt in r.stdout
    w = cli("watch", "--help")
    assert w.returncode == 0 and "--from-version" in w.stdout and "--no-initial" in w.stdout
    s = cli("set", "--help")
    assert s.returncode == 0 and "--ttl" in s.stdout and "--if-version" in s.stdout
    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("sharedmem") == "node.cli:main"
    script = Path(sys.executable).parent / "sharedmem"
    if script.exists():  # installed into this venv: the console script is the same program
        r = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=20,
                           env=child_env())
        assert r.returncode == 0 and "exit codes:" in r.stdout


# --------------------------------------------------------------------------- basic commands


@pytest.mark.timeout(60)
def test_set_get_from_argument_stdin_and_environment(broker_process: BrokerProcess) -> None:
    value = {"state": "todo", "n": [1, 2.5, None, True], "s": "héllo"}
    r = cli("set", "task_1", json.dumps(value), broker=broker_process)
    assert r.returncode == 0, r.stderr
    version = int(r.stdout)
    g = cli("get", "task_1", broker=broker_process)
    assert g.returncode == 0, g.stderr
    assert json.loads(g.stdout) == value
    gj = cli("get", "task_1", "--json", broker=broker_process)  # options after the command too
    assert gj.stdout.count("\n") == 1 and json.loads(gj.stdout) == value

    r2 = cli("--json", "set", "task_2", broker=broker_process, stdin='  ["from", "stdin"]\n')
    assert r2.returncode == 0, r2.stderr
    assert json.loads(r2.stdout) == {"key": "task_2", "version": version + 1}

    env = child_env()
    env["SHAREDMEM_BROKER"] = broker_process.address
    e = cli("get", "task_2", env=env)
    assert e.returncode == 0, e.stderr
    assert json.loads(e.stdout) == ["from", "stdin"]

    with shm_for(broker_process, "shared") as shm:  # the default namespace, seen by the API
        assert shm.get("task_1") == value
        assert shm.get_metadata("task_1").version == version
        assert shm.get_metadata("task_1").expires_at is None  # CLI default: never expires


@pytest.mark.timeout(60)
def test_ls_meta_del_and_ttl(broker_process: BrokerProcess) -> None:
    with shm_for(broker_process, "lsns") as shm:
        shm.set_many({"job_1": 1, "job_2": 2, "other": 3})
        r = cli("-n", "lsns", "ls", broker=broker_process)
        assert r.returncode == 0 and r.stdout.splitlines() == ["job_1", "job_2", "other"]
        r = cli("-n", "lsns", "ls", "job_*", "--json", broker=broker_process)
        assert json.loads(r.stdout) == ["job_1", "job_2"]
        r = cli("-n", "lsns", "ls", "nothing*", broker=broker_process)
        assert r.returncode == 0 and r.stdout == ""

        r = cli("-n", "lsns", "set", "job_3", '"soon gone"', "--ttl", "30", broker=broker_process)
        assert r.returncode == 0, r.stderr
        m = cli("-n", "lsns", "meta", "job_3", broker=broker_process)
        assert m.returncode == 0, m.stderr
        lines = dict(line.split(": ", 1) for line in m.stdout.splitlines())
        assert lines["key"] == "job_3" and lines["version"] == r.stdout.strip()
        assert lines["size"] == str(len(b'"soon gone"'))
        assert 25 < float(lines["ttl"]) <= 30 and lines["expires_at"] != "never"
        mj = json.loads(cli("-n", "lsns", "meta", "job_1", "--json",
                            broker=broker_process).stdout)
        assert mj["version"] == shm.get_metadata("job_1").version
        assert mj["ttl"] is None and mj["expires_at"] is None
        assert mj["created_at"] == shm.get_metadata("job_1").created_at.isoformat()

        d = cli("-n", "lsns", "del", "job_1", broker=broker_process)
        assert d.returncode == 0, d.stderr
        assert cli("-n", "lsns", "get", "job_1", broker=broker_process).returncode == 1
        shm.sync_with_broker()
        assert not shm.exists("job_1")


@pytest.mark.timeout(60)
def test_stats_human_and_json(broker_process: BrokerProcess) -> None:
    with shm_for(broker_process, "statsns", max_keys=500) as shm:
        shm.set_many({f"k{i}": i for i in range(7)})
        s = stats(broker_process)
        assert s["namespaces"]["statsns"] == {"keys": 7, "seq": 7, "max_keys": 500}
        assert s["counters"]["writes"] >= 1 and s["counters"]["events"] >= 7
        assert s["broker"] == broker_process.address and s["epoch"] == broker_process.epoch
        h = cli("stats", broker=broker_process)
        assert h.returncode == 0, h.stderr
        assert f"epoch: {broker_process.epoch}" in h.stdout
        assert re.search(r"^\s+statsns\s+7\s+7\s+500$", h.stdout, re.M), h.stdout
        assert re.search(r"^\s+writes\s+\d+$", h.stdout, re.M), h.stdout


# --------------------------------------------------------------------------- exit codes


@pytest.mark.timeout(60)
def test_missing_key_exits_1_and_reads_create_nothing(broker_process: BrokerProcess) -> None:
    with shm_for(broker_process, "shared") as shm:
        shm.set("present", 1)
    for args in (["get", "absent"], ["meta", "absent"], ["del", "absent"]):
        r = cli(*args, broker=broker_process)
        assert r.returncode == 1, (args, r.stdout, r.stderr)
        assert "not found" in r.stderr and r.stdout == ""
    for args in (["get", "k"], ["meta", "k"], ["del", "k"]):  # namespace that does not exist
        r = cli("-n", "never-made", *args, broker=broker_process)
        assert r.returncode == 1, (args, r.stderr)
    for args in (["ls"], ["dump"]):
        r = cli("-n", "never-made", *args, broker=broker_process)  # says so (issue 12)
        assert r.returncode == 1 and r.stdout == "" and "does not exist" in r.stderr
    assert "never-made" not in stats(broker_process)["namespaces"]


@pytest.mark.timeout(60)
def test_invalid_input_exits_2_and_writes_nothing(broker_process: BrokerProcess) -> None:
    cases = [
        (["set", "k", "{bad json"], None, "not valid JSON"),
        (["set", "k"], "not json either", "not valid JSON"),
        (["set", "k"], "", "not valid JSON"),
        (["set", "k", "NaN"], None, "not valid JSON"),
        (["set", "bad\x01key", "1"], None, "InvalidKey"),
        (["set", "", "1"], None, "InvalidKey"),
        (["get", "x" * 2000], None, "InvalidKey"),
        (["ls", "[unclosed"], None, "PatternError"),
        (["dump", "tail\\"], None, "PatternError"),
        (["-n", "bad namespace", "get", "k"], None, "InvalidNamespace"),
        (["set", "k", "1", "--ttl", "-1"], None, "--ttl"),
        (["set", "k", "1", "--if-version", "x"], None, "--if-version"),
        (["--max-keys", "-3", "ls"], None, "--max-keys"),
        (["frobnicate"], None, "invalid choice"),
        ([], None, "required"),
        (["--broker", "http://nope", "get", "k"], None, "--broker"),
    ]
    for args, stdin, message in cases:
        r = cli(*args, broker=broker_process, stdin=stdin)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert message in r.stderr, (args, r.stderr)
    assert "shared" not in stats(broker_process)["namespaces"]  # nothing reached the broker


@pytest.mark.timeout(30)
def test_unreachable_broker_exits_3_within_the_timeout() -> None:
    address = f"tcp://127.0.0.1:{free_port_pair()}"
    for args in (["get", "k"], ["set", "k", "1"], ["stats"], ["watch"]):
        t0 = time.monotonic()
        r = cli("--broker", address, "--timeout", "0.5", *args)
        elapsed = time.monotonic() - t0
        assert r.returncode == 3, (args, r.stderr)
        assert "BrokerUnavailable" in r.stderr and address in r.stderr
        assert elapsed < 10, f"{args} took {elapsed:.1f}s with --timeout 0.5"


@pytest.mark.timeout(60)
def test_refusals_exit_4(broker_process: BrokerProcess) -> None:
    v1 = int(cli("set", "k", '"v1"', broker=broker_process).stdout)
    r = cli("set", "k", '"lost"', "--if-version", str(v1 + 100), broker=broker_process)
    assert r.returncode == 4 and "VersionConflict" in r.stderr, r.stderr
    r = cli("set", "k", '"lost"', "--if-version", "0", broker=broker_process)  # only if absent
    assert r.returncode == 4 and "VersionConflict" in r.stderr, r.stderr
    r = cli("del", "k", "--if-version", str(v1 + 1), broker=broker_process)
    assert r.returncode == 4 and "VersionConflict" in r.stderr, r.stderr
    assert json.loads(cli("get", "k", broker=broker_process).stdout) == "v1"
    r = cli("set", "k", '"won"', "--if-version", str(v1), broker=broker_process)
    assert r.returncode == 0 and int(r.stdout) > v1
    assert cli("set", "fresh", "1", "--if-version", "0", broker=broker_process).returncode == 0

    with shm_for(broker_process, "small", max_keys=2):
        # Without --max-keys the CLI opens with the namespace's own max_keys.
        assert cli("-n", "small", "set", "a", "1", broker=broker_process).returncode == 0
        assert cli("-n", "small", "set", "b", "2", broker=broker_process).returncode == 0
        full = cli("-n", "small", "set", "c", "3", broker=broker_process)
        assert full.returncode == 4 and "full" in full.stderr, full.stderr
        other = cli("-n", "small", "--max-keys", "7", "get", "a", broker=broker_process)
        assert other.returncode == 4, other.stderr
        assert "max_keys=2" in other.stderr and "max_keys=7" in other.stderr
        same = cli("-n", "small", "--max-keys", "2", "get", "a", broker=broker_process)
        assert same.returncode == 0 and same.stdout.strip() == "1"


@pytest.mark.timeout(90)
def test_access_denied_exits_5(tmp_path: Path) -> None:
    broker, keys = secure_broker(tmp_path, '{ "app" = ["read", "write"], "ro" = ["read"] }')
    try:
        def as_(who: str, *args: str) -> subprocess.CompletedProcess:
            return cli("--curve-key-file", str(keys / f"{who}.key_secret"),
                       "--broker-key-file", str(keys / "broker.key"), "--timeout", "5", *args,
                       broker=broker)

        for ns in ("app", "ro", "hidden"):
            assert as_("carol", "-n", ns, "set", "k", f'"{ns}"').returncode == 0
        assert as_("alice", "-n", "app", "set", "k2", "2").returncode == 0
        r = as_("alice", "-n", "ro", "get", "k")
        assert r.returncode == 0 and json.loads(r.stdout) == "ro"
        for args in (["-n", "ro", "set", "k", "1"], ["-n", "hidden", "get", "k"],
                     ["-n", "hidden", "ls"], ["-n", "nowhere", "meta", "k"]):
            r = as_("alice", *args)
            assert r.returncode == 5, (args, r.stderr)
            assert "AccessDenied" in r.stderr
        st = json.loads(as_("alice", "stats", "--json").stdout)
        assert set(st["namespaces"]) == {"app", "ro"}  # only what alice may read
        r = as_("mallory", "get", "k")  # a key the broker does not know
        assert r.returncode == 5 and "AccessDenied" in r.stderr, r.stderr
        env = child_env()
        env["SHAREDMEM_CURVE_KEY_FILE"] = str(keys / "alice.key_secret")
        env["SHAREDMEM_BROKER_KEY_FILE"] = str(keys / "broker.key")
        r = cli("-n", "app", "get", "k2", broker=broker, env=env)
        assert r.returncode == 0 and r.stdout.strip() == "2", r.stderr
        r = cli("--curve-key-file", str(tmp_path / "missing"), "--broker-key-file",
                str(keys / "broker.key"), "get", "k", broker=broker)
        assert r.returncode == 2 and "curve_key_file" in r.stderr, r.stderr
    finally:
        broker.stop()


# --------------------------------------------------------------------------- watch


class Lines:
    """Lines of a child's pipe, read by a background thread; ``next`` waits with a deadline."""

    def __init__(self, pipe: IO[str]) -> None:
        self._q: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, args=(pipe,), daemon=True).start()

    def _read(self, pipe: IO[str]) -> None:
        for line in pipe:
            self._q.put(line.rstrip("\n"))
        self._q.put(None)

    def next(self, timeout: float = 10.0) -> str:
        try:
            line = self._q.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line within {timeout}s; so far {self.seen}") from None
        if line is None:
            raise AssertionError(f"stream ended; so far {self.seen}")
        self.seen.append(line)
        return line

    def until(self, predicate, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            line = self.next(max(0.01, deadline - time.monotonic()))
            if predicate(line):
                return line

    def rest(self, timeout: float = 10.0) -> list[str]:
        """Every remaining line up to end of stream."""
        out = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._q.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"stream did not end; got {out}") from None
            if line is None:
                return out
            out.append(line)


def start_watch(broker: BrokerProcess, *args: str) -> tuple[subprocess.Popen, Lines, Lines]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "node", "--broker", broker.address, *args], cwd=ROOT,
        env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    return proc, Lines(proc.stdout), Lines(proc.stderr)


def stop(proc: subprocess.Popen, sig: int) -> int:
    proc.send_signal(sig)
    try:
        return proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        raise AssertionError(f"watch did not exit on signal {sig}") from None


@pytest.mark.timeout(60)
def test_watch_prints_initial_values_then_changes_and_exits_0_on_sigterm(
        broker_process: BrokerProcess) -> None:
    with shm_for(broker_process, "w", max_keys=100) as shm:
        v0 = shm.set("job_0", {"n": 0})
        shm.set("unrelated", 1)
        proc, out, err = start_watch(broker_process, "-n", "w", "watch", "job_*")
        try:
            first = json.loads(out.next())
            assert first["key"] == "job_0" and first["op"] == "set" and first["initial"] is True
            assert first["value"] == {"n": 0} and first["version"] == v0
            assert first["modified_at"] == shm.get_metadata("job_0").last_modified.isoformat()
            marker = json.loads(out.next())
            assert marker["op"] == "initial_done" and marker["version"] == shm.seq
            # Everything after the marker is live: the watch is in place.
            v1 = shm.set("job_1", "a")
            shm.set("unrelated", 2)  # does not match job_*
            v2 = shm.set("job_1", ["b"])
            v3 = shm.set("job_2", 2, ttl=0.3)
            assert shm.delete("job_0")
            got = [json.loads(out.next()) for _ in range(5)]
            assert [(c["key"], c["op"]) for c in got[:3]] == [
                ("job_1", "set"), ("job_1", "set"), ("job_2", "set")]
            # the delete and the broker's expiry of job_2 race: either order, in log order
            assert {(c["key"], c["op"]) for c in got[3:]} == {
                ("job_0", "delete"), ("job_2", "expire")}
            assert [c["version"] for c in got[:3]] == [v1, v2, v3]
            assert [c["value"] for c in got[:3]] == ["a", ["b"], 2]
            assert all(c["value"] is None and c["modified_at"] is None for c in got[3:])
            assert all(c["initial"] is False for c in got)
            assert got[3]["version"] < got[4]["version"]
            assert "watching 'job_*'" in err.next()
        finally:
            code = stop(proc, signal.SIGTERM)
        assert code == 0, err.seen
        assert out.rest() == []  # nothing but the changes above


@pytest.mark.timeout(60)
def test_watch_no_initial_and_from_version_exit_0_on_sigint(
        broker_process: BrokerProcess) -> None:
    with shm_for(broker_process, "w2") as shm:
        base = shm.set("a", 1)
        shm.set("b", 2)
        shm.delete("a")
        # --from-version replays the log after `base`, then the marker.
        proc, out, err = start_watch(broker_process, "-n", "w2", "watch", "--from-version",
                                     str(base))
        try:
            replay = [json.loads(out.next()) for _ in range(3)]
            assert [(c["key"], c["op"]) for c in replay] == [
                ("b", "set"), ("a", "delete"), (None, "initial_done")]
        finally:
            assert stop(proc, signal.SIGINT) == 0, err.seen

        # --no-initial: no current values, no marker; the stderr line says the watch is ready.
        proc, out, err = start_watch(broker_process, "-n", "w2", "watch", "--no-initial")
        try:
            assert "watching '*'" in err.next()
            v = shm.set("c", {"deep": [1]})
            c = json.loads(out.next())
            assert (c["key"], c["op"], c["version"], c["value"]) == ("c", "set", v, {"deep": [1]})
        finally:
            assert stop(proc, signal.SIGINT) == 0, err.seen
        assert out.rest() == []


@pytest.mark.timeout(60)
def test_watch_waits_for_a_namespace_that_does_not_exist_yet(
        broker_process: BrokerProcess) -> None:
    proc, out, err = start_watch(broker_process, "-n", "later", "watch")
    try:
        assert "does not exist yet" in err.next()
        assert "later" not in stats(broker_process)["namespaces"]  # watching created nothing
        with shm_for(broker_process, "later", max_keys=10) as shm:
            shm.set("k", "v")
            c = json.loads(out.until(lambda line: '"k"' in line))
            assert c["value"] == "v" and c["op"] == "set"
    finally:
        assert stop(proc, signal.SIGTERM) == 0, err.seen


# --------------------------------------------------------------------------- dump / load


def read_dump(path: Path) -> dict[str, dict]:
    out = {}
    with path.open("rb") as f:
        for line in f:
            rec = json.loads(line)
            out[rec["key"]] = rec
    return out


@pytest.mark.timeout(90)
def test_dump_load_round_trips_100k_keys(broker_process: BrokerProcess, tmp_path: Path) -> None:
    """Acceptance: the CLI round-trips a dump/load of 100 000 keys."""
    n = 100_000
    t0 = time.monotonic()
    with shm_for(broker_process, "src") as shm:
        for start in range(0, n, 10_000):
            shm.set_many({f"key/{i:06d}": {"i": i, "tags": ["x"] * (i % 3), "s": "é" * (i % 5)}
                          for i in range(start, start + 10_000)},
                         ttl=600 if start == 0 else 0)  # the first 10 000 keys with a TTL
        shm.set("key/odd \\ \"quoted\"", None)
        src_digest = shm.broker_digest()

    dump_file = tmp_path / "src.jsonl"
    with dump_file.open("wb") as f:
        r = cli("-n", "src", "dump", broker=broker_process, stdout=f, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # no progress bar when stderr is not a terminal

    load = cli("-n", "dst", "load", "--batch-size", "2000", broker=broker_process,
               stdin=dump_file.read_bytes(), timeout=60)
    assert load.returncode == 0, load.stderr
    assert f"loaded {n + 1} keys" in load.stdout

    st = stats(broker_process)["namespaces"]
    assert st["src"]["keys"] == st["dst"]["keys"] == n + 1
    assert st["dst"]["max_keys"] == 0

    again = tmp_path / "dst.jsonl"
    with again.open("wb") as f:
        assert cli("-n", "dst", "dump", broker=broker_process, stdout=f).returncode == 0
    a, b = read_dump(dump_file), read_dump(again)
    assert len(a) == n + 1 and a.keys() == b.keys()
    assert all(a[k]["value"] == b[k]["value"] for k in a)
    assert a["key/odd \\ \"quoted\""]["value"] is None
    with_ttl = {k for k in a if a[k]["ttl"] is not None}
    assert len(with_ttl) == 10_000 and all(k < "key/010000" for k in with_ttl)
    for k in with_ttl:  # TTL kept: rounded up to whole seconds, minus the time taken
        assert a[k]["ttl"] - 30 < b[k]["ttl"] <= a[k]["ttl"] + 1
    assert all(b[k]["ttl"] is None for k in b if k not in with_ttl)

    with shm_for(broker_process, "src") as shm:
        assert shm.broker_digest() == src_digest  # dumping changed nothing
    assert time.monotonic() - t0 < 60


def dump_all_contents(broker: BrokerProcess) -> dict[str, dict[str, object]]:
    """Every namespace's key -> value, as 'dump --all' prints them (no TTLs)."""
    r = cli("dump", "--all", broker=broker)
    assert r.returncode == 0, r.stderr
    out: dict[str, dict[str, object]] = {}
    current: dict[str, object] = {}
    for line in r.stdout.splitlines():
        rec = json.loads(line)
        if "namespace" in rec:
            current = out.setdefault(rec["namespace"], {})
        else:
            current[rec["key"]] = rec["value"]
    return out


@pytest.mark.timeout(90)
def test_dump_all_and_load_all_carry_every_namespace_to_a_fresh_broker(
        broker_process: BrokerProcess, tmp_path: Path) -> None:
    """Issue 12 item 8: three namespaces (one empty, one with a max_keys, one with TTLs) go
    through 'dump --all' / 'load --all' into a fresh broker: the same namespaces, max_keys,
    values and TTLs. Versions restart (they are the target log's sequence numbers)."""
    with shm_for(broker_process, "alpha") as a:
        a.set_many({f"a/{i}": {"i": i} for i in range(50)})
        a.set("a/0", "rewritten")  # a second version, so the source versions have gaps
        a.delete("a/1")
    with shm_for(broker_process, "beta", max_keys=100) as b:
        b.set_many({"b/x": [1, 2], "b/y": None}, ttl=600)
        b.set("b/z", "é \\ \"q\"")
    shm_for(broker_process, "gamma").close()  # exists, holds nothing

    dump_file = tmp_path / "all.jsonl"
    with dump_file.open("wb") as f:
        r = cli("dump", "--all", broker=broker_process, stdout=f)
    assert r.returncode == 0, r.stderr
    headers = [json.loads(line) for line in dump_file.read_text().splitlines()
               if "namespace" in json.loads(line)]
    assert headers == [{"namespace": "alpha", "max_keys": 0},
                       {"namespace": "beta", "max_keys": 100},
                       {"namespace": "gamma", "max_keys": 0}]

    target = BrokerProcess(free_port_pair()).start()
    try:
        r = cli("--json", "load", "--all", broker=target, stdin=dump_file.read_bytes())
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == {"loaded": 52,
                                        "namespaces": {"alpha": 49, "beta": 3, "gamma": 0}}
        src, dst = stats(broker_process)["namespaces"], stats(target)["namespaces"]
        assert set(dst) == {"alpha", "beta", "gamma"}
        for name in dst:
            assert (dst[name]["keys"], dst[name]["max_keys"]) == \
                (src[name]["keys"], src[name]["max_keys"]), name
        assert dump_all_contents(target) == dump_all_contents(broker_process)
        with shm_for(target, "beta", max_keys=100) as b:
            assert b.get("b/z") == "é \\ \"q\""
            expires = b.get_metadata("b/x").expires_at
            assert expires is not None
            assert 500 < (expires - datetime.now(UTC)).total_seconds() <= 601
            assert b.get_metadata("b/z").expires_at is None
            assert b.get_metadata("b/z").version == 3  # a fresh log: versions restart
        with shm_for(target, "alpha") as a:
            assert a.get("a/0") == "rewritten" and not a.exists("a/1")

        # Loading again into the now non-empty target keeps its namespaces' own limits
        # and rewrites the values (new versions), like a plain 'load'.
        r = cli("load", "--all", broker=target, stdin=dump_file.read_bytes())
        assert r.returncode == 0, r.stderr
        assert "loaded 52 keys into 3 namespaces" in r.stdout
        assert dump_all_contents(target) == dump_all_contents(broker_process)
    finally:
        target.stop()


def test_load_all_refuses_key_lines_before_a_namespace_line(
        broker_process: BrokerProcess) -> None:
    r = cli("load", "--all", broker=broker_process, stdin='{"key": "a", "value": 1}\n')
    assert r.returncode == 2 and "line 1" in r.stderr and "dump --all" in r.stderr, r.stderr
    bad = '{"namespace": "ok", "max_keys": 0}\n{"namespace": "n2", "max_keys": -1}\n'
    r = cli("load", "--all", broker=broker_process, stdin=bad)
    assert r.returncode == 2 and "line 2" in r.stderr and "max_keys" in r.stderr, r.stderr
    assert "ok" not in stats(broker_process)["namespaces"]  # checked before anything is written


@pytest.mark.timeout(60)
def test_load_checks_every_line_before_writing(broker_process: BrokerProcess) -> None:
    good = '{"key": "a", "value": 1, "ttl": null}\n'
    for bad, message in [
        ('{"key": "b", "value": ', "line 2"),
        ('{"key": "b"}', "line 2"),
        ('["b", 1]', "line 2"),
        ('{"key": "b\\u0000", "value": 1}', "line 2"),
        ('{"key": "b", "value": 1, "ttl": -5}', "line 2"),
        ('{"key": "b", "value": 1, "ttl": "soon"}', "line 2"),
    ]:
        r = cli("-n", "loadns", "load", broker=broker_process, stdin=good + bad + "\n")
        assert r.returncode == 2, (bad, r.stderr)
        assert message in r.stderr, (bad, r.stderr)
    assert "loadns" not in stats(broker_process)["namespaces"]

    # Blank lines are skipped, a later line for a key wins, a TTL is honoured.
    text = ('{"key": "a", "value": 1, "ttl": null}\n\n{"key": "b", "value": 2, "ttl": 2}\n'
            '{"key": "a", "value": 3}\n')
    r = cli("-n", "loadns", "--json", "load", broker=broker_process, stdin=text)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"loaded": 2, "namespace": "loadns"}
    with shm_for(broker_process, "loadns") as shm:
        assert shm.get("a") == 3
        meta = shm.get_metadata("b")
        assert meta.expires_at is not None
        assert 0 < (meta.expires_at - datetime.now(UTC)).total_seconds() <= 2
        wait_until(lambda: not shm.exists("b"), timeout=10, message="b to expire")
        assert shm.list_keys() == ["a"]


@pytest.mark.timeout(60)
def test_progress_counter_only_on_a_terminal(broker_process: BrokerProcess) -> None:
    import os
    import pty

    lines = "".join(json.dumps({"key": f"p{i:05d}", "value": i, "ttl": None}) + "\n"
                    for i in range(12_000)).encode()
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "node", "--broker", broker_process.address, "-n", "prog",
         "load"], cwd=ROOT, env=child_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=slave)
    os.close(slave)
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    out, _ = proc.communicate(lines, timeout=30)
    reader.join(10)
    os.close(master)
    assert proc.returncode == 0 and b"loaded 12000 keys" in out
    tty = b"".join(chunks)
    assert b"\rloaded 12000/12000 keys" in tty, tty[-200:]
    # The same through a pipe: no progress output at all (tested on dump in the 100k test).
    r = cli("-n", "prog", "dump", broker=broker_process)
    assert r.returncode == 0 and r.stderr == "" and r.stdout.count("\n") == 12_000


# --------------------------------------------------------------------------- demo


@pytest.mark.timeout(180)
def test_demo_claims_every_task_once_and_finishes_them_all() -> None:
    r = subprocess.run(["bash", str(ROOT / "scripts" / "demo")], cwd=ROOT, env=child_env(),
                       capture_output=True, text=True, timeout=150)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    lines = r.stdout.splitlines()
    assert all(line.startswith("[") for line in lines), r.stdout
    claims = Counter(m.group(2) for line in lines
                     if (m := re.match(r"\[(worker-\w+)\] claimed (task_\d+) ", line)))
    done = Counter(m.group(2) for line in lines
                   if (m := re.match(r"\[(worker-\w+)\] done (task_\d+) ", line)))
    tasks = {f"task_{i}" for i in range(1, 9)}
    assert set(claims) == tasks and set(claims.values()) == {1}, claims
    assert set(done) == tasks and set(done.values()) == {1}, done
    claimed_by = {m.group(2): m.group(1) for line in lines
                  if (m := re.match(r"\[(worker-\w+)\] claimed (task_\d+) ", line))}
    final = {}
    for line in lines:  # the CLI dump at the end of the demo
        if line.startswith("[demo]   {"):
            rec = json.loads(line.split("   ", 1)[1])
            final[rec["key"]] = rec["value"]
    assert final.keys() == tasks
    assert all(v["state"] == "done" and v["owner"] == claimed_by[k] for k, v in final.items())
    assert any("[planner] summary: all 8 tasks done" in line for line in lines)


# --------------------------------------------------------------------------- polish (issue 12)


def broker_cli(*args: str, script: bool = False) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "sharedmem-broker"
    cmd = [str(exe)] if script else [sys.executable, "-m", "broker"]
    return subprocess.run([*cmd, *args], cwd=ROOT, env=child_env(), capture_output=True,
                          text=True, timeout=30)


@pytest.mark.timeout(60)
def test_version_on_both_clis() -> None:
    from importlib.metadata import version

    expected = version("sharedmem")
    r = cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"sharedmem {expected}", r.stdout
    b = broker_cli("--version")
    assert b.returncode == 0 and b.stdout.strip() == f"sharedmem-broker {expected}", b.stdout


@pytest.mark.timeout(60)
def test_broker_help_lists_every_subcommand_under_the_name_it_was_called_by() -> None:
    r = broker_cli("--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: python -m broker")
    for sub in ("repair --data-dir DIR", "keygen NAME"):
        assert f"python -m broker {sub}" in r.stdout, r.stdout
    if not (Path(sys.executable).parent / "sharedmem-broker").exists():
        pytest.skip("the sharedmem-broker console script is not installed in this venv")
    s = broker_cli("--help", script=True)
    assert s.returncode == 0 and s.stdout.startswith("usage: sharedmem-broker"), s.stdout
    assert "sharedmem-broker keygen NAME" in s.stdout
    k = broker_cli("keygen", "--help", script=True)
    assert k.returncode == 0 and k.stdout.startswith("usage: sharedmem-broker keygen")


@pytest.mark.timeout(60)
def test_an_address_without_scheme_is_explained() -> None:
    b = broker_cli("--bind", "127.0.0.1:7800")
    assert b.returncode == 2 and "did you mean 'tcp://127.0.0.1:7800'?" in b.stderr, b.stderr
    r = cli("--broker", "127.0.0.1:7800", "ls")
    assert r.returncode == 2 and "did you mean 'tcp://127.0.0.1:7800'?" in r.stderr, r.stderr


@pytest.mark.timeout(60)
def test_raw_output_and_the_json_hint(broker_process: BrokerProcess) -> None:
    assert cli("set", "greeting", '"hello\\nworld"', broker=broker_process).returncode == 0
    assert cli("set", "obj", '{"a": [1, 2]}', broker=broker_process).returncode == 0
    r = cli("--raw", "get", "greeting", broker=broker_process)
    assert r.returncode == 0 and r.stdout == "hello\nworld\n", repr(r.stdout)
    o = cli("get", "obj", "--raw", broker=broker_process)
    assert o.returncode == 0 and o.stdout == '{"a":[1,2]}\n', repr(o.stdout)
    bad = cli("set", "greeting", "hello", broker=broker_process)
    assert bad.returncode == 2, bad.stderr
    assert "did you mean '\"hello\"'?" in bad.stderr, bad.stderr
    assert json.loads(cli("get", "greeting", broker=broker_process).stdout) == "hello\nworld"


@pytest.mark.timeout(60)
def test_a_namespace_that_does_not_exist_is_named(broker_process: BrokerProcess) -> None:
    for args in (["get", "k"], ["meta", "k"], ["del", "k"], ["ls"], ["dump"]):
        r = cli("-n", "no_such_ns", *args, broker=broker_process)
        assert r.returncode == 1, (args, r.stderr)
        assert "namespace 'no_such_ns' does not exist" in r.stderr, (args, r.stderr)
    assert "no_such_ns" not in stats(broker_process)["namespaces"]  # reads created nothing


def test_readme_says_where_the_sharedmem_command_is() -> None:
    readme = (ROOT / "README.md").read_text()
    assert ".venv/bin/sharedmem" in readme and "source .venv/bin/activate" in readme
