"""Issue 7 acceptance: coordination -- watch / on_change, update, compare-and-set, touch and
consistent reads, across real processes.

Topology: a ``python -m broker`` child process; the node under test lives in this process (so
its fault hook ``_node.pause_reading`` is reachable), every other node is an *agent*: a Python
process with a node of its own, driven by JSON lines on stdin/stdout (one process = one node per
broker address, so in-process handles would share a node and prove nothing).

Writers are modelled exactly: an agent reports the version each write was acknowledged with, and
the tests rebuild from those the history a watcher must reproduce (deletes return a bool, so a
single writer reports its replica's seq after the delete, which is the delete's version).
"""

from __future__ import annotations

import asyncio
import json
import queue
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest

from node import (
    AsyncSharedMemory,
    ChangeEvent,
    KeyNotFound,
    SharedMemory,
    SharedMemoryConfig,
    Watcher,
)
from tests.conftest import ROOT, BrokerProcess, child_env, free_port_pair, wait_until

HEARTBEAT = 0.5  # the broker's default heartbeat interval
PAD = 4000  # bytes of padding per value in the overflow tests: fills socket buffers quickly

# ---------------------------------------------------------------------- agents (other nodes)

AGENT_CODE = r"""
import json, os, sys, time
from node import KeyNotFound, SharedMemory, SharedMemoryConfig, VersionConflict

shm = SharedMemory(SharedMemoryConfig(**json.loads(sys.argv[1])))


def reply(**fields):
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def wait_for(cond, timeout, interval=0.001):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)  # poll
    return True


reply(ready=True, seq=shm.seq)
for line in sys.stdin:
    cmd = json.loads(line)
    op = cmd["op"]
    if op == "ops":  # [["set", key, i] | ["delete", key]] -> the acknowledged versions
        pad = "x" * cmd.get("pad", 0)
        acks = []
        for item in cmd["ops"]:
            if item[0] == "set":
                acks.append(shm.set(item[1], {"i": item[2], "pad": pad}))
            else:
                if not shm.delete(item[1]):
                    raise SystemExit(f"delete of absent key {item[1]!r}")
                acks.append(shm.seq)  # single writer: the replica's seq is the delete's version
        reply(acks=acks)
    elif op == "set_exit":  # write, report, and exit at once (no close, no flush of anything)
        reply(version=shm.set(cmd["key"], cmd["value"]))
        os._exit(0)
    elif op == "update":
        values = [shm.update(cmd["key"], lambda v: (v or 0) + 1) for _ in range(cmd["n"])]
        reply(values=values)
    elif op == "create":
        try:
            reply(won=shm.set(cmd["key"], {"owner": cmd["owner"]}, if_version=0))
        except VersionConflict as exc:
            reply(conflict=exc.current_version)
    elif op == "wait_present":
        ok = wait_for(lambda: shm.exists(cmd["key"]), cmd["within"])
        reply(present=ok, t=time.monotonic())
    elif op == "wait_gone":
        ok = wait_for(lambda: not shm.exists(cmd["key"]), cmd["within"])
        reply(gone_at=time.monotonic() if ok else None)
    elif op == "hold":  # watch the key until monotonic time `until`; when was it first missing?
        missing = None
        while time.monotonic() < cmd["until"]:
            if not shm.exists(cmd["key"]):
                missing = time.monotonic()
                break
            time.sleep(0.005)  # poll
        reply(missing_at=missing)
    elif op == "meta":
        try:
            m = shm.get_metadata(cmd["key"])
        except KeyNotFound:
            reply(missing=True)
        else:
            reply(missing=False, version=m.version,
                  expires_at=None if m.expires_at is None else m.expires_at.timestamp())
    elif op == "exit":
        break
shm.close()
"""


class Agent:
    """A node in another process. Answers are read by a thread, so a read never hangs."""

    def __init__(self, config: dict[str, Any]) -> None:
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", AGENT_CODE, json.dumps(config)], cwd=ROOT, env=child_env(),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read()[-3000:]

    def send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def recv(self, timeout: float = 30.0) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"agent gave no answer in {timeout}s:\n{self.stderr()}") from None
        if line is None:
            self.proc.wait(10)
            raise AssertionError(f"agent exited ({self.proc.returncode}):\n{self.stderr()}")
        return json.loads(line)

    def call(self, timeout: float = 30.0, **cmd: Any) -> dict[str, Any]:
        self.send(**cmd)
        return self.recv(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send(op="exit")
                self.proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(10)
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass
        self._stderr.close()


class Agents:
    def __init__(self) -> None:
        self.started: list[Agent] = []

    def start_many(self, broker: BrokerProcess, namespace: str, n: int) -> list[Agent]:
        """Start ``n`` agents at once (they boot in parallel), return them once all are ready."""
        config = {"namespace": namespace, "broker": broker.address, "max_keys": 0, "ttl": 0,
                  "connect_timeout": 30.0, "request_timeout": 30.0}
        new = [Agent(config) for _ in range(n)]
        self.started += new
        for agent in new:
            assert agent.recv(60).get("ready"), "agent did not start"
        return new

    def start(self, broker: BrokerProcess, namespace: str) -> Agent:
        return self.start_many(broker, namespace, 1)[0]

    def close(self) -> None:
        for agent in self.started:
            agent.close()


@pytest.fixture
def agents() -> Iterator[Agents]:
    a = Agents()
    try:
        yield a
    finally:
        a.close()


@pytest.fixture
def make_broker() -> Iterator[Callable[..., BrokerProcess]]:
    """``python -m broker`` children with extra command-line options, stopped at teardown."""
    started: list[BrokerProcess] = []

    def make(*args: str) -> BrokerProcess:
        b = BrokerProcess(free_port_pair(), tuple(args)).start()
        started.append(b)
        return b

    try:
        yield make
    finally:
        for b in started:
            b.stop()


def config(broker: BrokerProcess, namespace: str, **kw: Any) -> SharedMemoryConfig:
    return SharedMemoryConfig(namespace=namespace, broker=broker.address, max_keys=0, ttl=0, **kw)


# ---------------------------------------------------------------------- the writer's history

MATCH = [f"w{i:02d}" for i in range(30)]  # keys the watchers' pattern "w*" matches
OTHER = [f"x{i}" for i in range(6)]  # keys it does not


@dataclass(frozen=True)
class Change:
    version: int
    op: str
    key: str
    value: Any


class Script:
    """Random sets and deletes (deletes only of present keys, so each one is an event)."""

    def __init__(self, seed: int, pad: int = 0) -> None:
        self.rng = random.Random(seed)
        self.pad = pad
        self.present: set[str] = set()
        self.n = 0
        self.history: list[Change] = []

    def ops(self, count: int) -> list[list[Any]]:
        out: list[list[Any]] = []
        for _ in range(count):
            key = self.rng.choice(MATCH + OTHER)
            if key in self.present and self.rng.random() < 0.25:
                self.present.discard(key)
                out.append(["delete", key])
            else:
                self.n += 1
                self.present.add(key)
                out.append(["set", key, self.n])
        return out

    def run(self, agent: Agent, count: int, timeout: float = 30.0) -> list[Change]:
        """Have ``agent`` write ``count`` changes; return them with their acknowledged versions."""
        return self.finish(agent, self.send(agent, count), timeout)

    def send(self, agent: Agent, count: int) -> list[list[Any]]:
        """Start ``agent`` writing ``count`` changes (``finish`` collects the versions)."""
        ops = self.ops(count)
        agent.send(op="ops", ops=ops, pad=self.pad)
        return ops

    def finish(self, agent: Agent, ops: list[list[Any]], timeout: float = 30.0) -> list[Change]:
        acks = agent.recv(timeout)["acks"]
        assert len(acks) == len(ops)
        first = self.history[-1].version + 1 if self.history else acks[0]
        # One writer, no TTLs: the acknowledged versions are consecutive.
        assert acks == list(range(first, first + len(acks))), acks[:10]
        new = [Change(v, op[0], op[1], {"i": op[2], "pad": "x" * self.pad}
                      if op[0] == "set" else None) for v, op in zip(acks, ops, strict=True)]
        self.history += new
        return new

    @property
    def last(self) -> int:
        return self.history[-1].version

    def expected(self, after: int = 0, upto: int | None = None,
                 prefix: str = "w") -> list[tuple[str, str, int, Any]]:
        """The changes a watcher of ``prefix*`` must see, in log order."""
        return [(c.key, c.op, c.version, c.value) for c in self.history
                if c.version > after and (upto is None or c.version <= upto)
                and c.key.startswith(prefix)]

    def view(self, at: int | None = None, prefix: str = "w") -> dict[str, tuple[int, Any]]:
        """{key: (version, value)} of the matching keys as of version ``at``."""
        out: dict[str, tuple[int, Any]] = {}
        for c in self.history:
            if at is not None and c.version > at:
                break
            if not c.key.startswith(prefix):
                continue
            if c.op == "set":
                out[c.key] = (c.version, c.value)
            else:
                out.pop(c.key, None)
        return out


def tuples(events: list[ChangeEvent]) -> list[tuple[str, str, int, Any]]:
    return [(e.key, e.op, e.version, e.value) for e in events]


def caught_up(shm: SharedMemory, version: int) -> Callable[[], bool]:
    # local_digest takes the node's lock, under which the I/O thread applies *and* hands the
    # changes to watchers: once it shows ``version``, every change up to it is queued.
    return lambda: shm.local_digest()[0] >= version


def drain(watcher: Watcher) -> list[ChangeEvent]:
    """Everything already queued on ``watcher`` (never waits)."""
    out = []
    while (e := watcher.get(timeout=0)) is not None:
        out.append(e)
    return out


def collect(watcher: Watcher, done: Callable[[list[ChangeEvent]], bool],
            timeout: float = 10.0) -> list[ChangeEvent]:
    """Changes until ``done(changes)``; fails after ``timeout`` seconds."""
    out: list[ChangeEvent] = []
    deadline = time.monotonic() + timeout
    while not done(out):
        remaining = deadline - time.monotonic()
        e = watcher.get(timeout=max(0.0, remaining)) if remaining > 0 else None
        if e is None:
            raise AssertionError(f"watch stream stalled after {len(out)} changes: "
                                 f"{tuples(out)[-5:]}")
        out.append(e)
    return out


def split_initial(events: list[ChangeEvent]) -> tuple[list[ChangeEvent], ChangeEvent,
                                                      list[ChangeEvent]]:
    markers = [i for i, e in enumerate(events) if e.op == "initial_done"]
    assert len(markers) == 1, f"expected exactly one initial_done marker, got {len(markers)}"
    i = markers[0]
    return events[:i], events[i], events[i + 1:]


def check_initial(initial: list[ChangeEvent], marker: ChangeEvent, script: Script) -> None:
    """Initial values: each marked initial, in key order, equal to the state at the marker."""
    assert all(e.initial and e.op == "set" and not e.resync for e in initial), initial[:3]
    assert [e.key for e in initial] == sorted(e.key for e in initial)
    assert {e.key: (e.version, e.value) for e in initial} == script.view(marker.version)
    assert not marker.initial and not marker.resync


def apply(view: dict[str, Any], events: list[ChangeEvent]) -> dict[str, Any]:
    for e in events:
        if e.op == "set":
            view[e.key] = e.value
        elif e.op in ("delete", "expire"):
            view.pop(e.key, None)
    return view


def node_view(shm: SharedMemory, pattern: str = "w*") -> dict[str, Any]:
    return {k: shm.get(k) for k in shm.list_keys(pattern)}


# ---------------------------------------------------------------------- 1. watch


@pytest.mark.timeout(60)
def test_watch_initial_values_marker_then_live_changes_of_another_node(
    broker_process: BrokerProcess, agents: Agents,
) -> None:
    a = agents.start(broker_process, "watch")
    script = Script(seed=1)
    script.run(a, 60)
    with SharedMemory(config(broker_process, "watch")) as b:
        wait_until(caught_up(b, script.last), 10, message="b has a's first writes")
        with b.watch("w*") as w:
            head = collect(w, lambda es: bool(es) and es[-1].op == "initial_done")
            initial, marker, _ = split_initial(head)
            assert marker.version == script.last  # b had every write when the watch began
            assert initial, "the script leaves some w* keys behind"
            check_initial(initial, marker, script)
            live = script.run(a, 120)
            n = len(script.expected(after=marker.version))
            events = collect(w, lambda es: len(es) >= n)
            wait_until(caught_up(b, script.last), 10, message="b has a's live writes")
            events += drain(w)
        assert tuples(events) == script.expected(after=marker.version)
        assert all(not e.initial and not e.resync for e in events)
        assert all(e.modified_at is not None for e in events if e.op == "set")
        versions = [e.version for e in events]
        assert versions == sorted(set(versions))  # strictly increasing
        assert versions[-1] <= live[-1].version
        view = apply({e.key: e.value for e in initial}, events)
        assert view == node_view(b) == {k: v for k, (_, v) in script.view().items()}


def overflow_run(make_broker: Callable[..., BrokerProcess], agents: Agents,
                 retention: int) -> tuple[SharedMemory, list[ChangeEvent], Script]:
    """b watches "w*" while its SUB overflows: b stops reading while a writes 2000 changes of
    ~4 kB each through a broker and a SUB socket with high-water marks of 10 messages."""
    broker = make_broker("--hwm", "10", "--log-retention", str(retention))
    a = agents.start(broker, "ovf")
    script = Script(seed=retention, pad=PAD)
    script.run(a, 40)
    b = SharedMemory(config(broker, "ovf", receive_hwm=10))
    try:
        wait_until(caught_up(b, script.last), 10, message="b has a's first writes")
        w = b.watch("w*")
        script.run(a, 40)  # live, b reading
        b._node.pause_reading.set()
        try:
            script.run(a, 2000, timeout=60)
        finally:
            b._node.pause_reading.clear()
        script.run(a, 20)  # after the stall
        wait_until(caught_up(b, script.last), 30, interval=0.02,
                   message="b caught up after the overflow")
        events = drain(w)
        w.close()
        return b, events, script
    except BaseException:
        b.close()
        raise


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_watch_gets_missed_changes_exactly_once_after_overflow_repair(
    make_broker: Callable[..., BrokerProcess], agents: Agents,
) -> None:
    b, events, script = overflow_run(make_broker, agents, retention=100_000)
    with b:
        st = b.status().namespace
        assert st.repairs >= 1, "b never missed an event: the overflow did not happen"
        assert st.resyncs == 0, "the log held every missed event: no snapshot was needed"
        initial, marker, live = split_initial(events)
        check_initial(initial, marker, script)
        assert not any(e.resync or e.initial for e in live)
        versions = [e.version for e in live]
        dupes = sorted({v for v in versions if versions.count(v) > 1})
        assert not dupes, f"duplicate versions: {dupes[:10]}"
        expected = script.expected(after=marker.version)
        missing = sorted({x[2] for x in expected} - set(versions))
        assert not missing, f"{len(missing)} acknowledged versions never reached the watcher"
        assert tuples(live) == expected  # every change, once, in log order
        assert b.local_digest() == b.broker_digest()
        view = apply({e.key: e.value for e in initial}, live)
        assert view == node_view(b) == {k: v for k, (_, v) in script.view().items()}


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_watch_gets_the_diff_after_a_snapshot_resync(
    make_broker: Callable[..., BrokerProcess], agents: Agents,
) -> None:
    b, events, script = overflow_run(make_broker, agents, retention=50)
    with b:
        st = b.status().namespace
        assert st.resyncs >= 1, "the log kept only 50 events: b must have taken a snapshot"
        initial, marker, after = split_initial(events)
        check_initial(initial, marker, script)
        resynced = [e for e in after if e.resync]
        logged = [e for e in after if not e.resync]
        assert resynced, "a snapshot resync must reach the watcher as resync=True changes"
        assert not any(e.initial for e in after)
        by_version = {c.version: c for c in script.history}
        for e in resynced:  # the diff: current values (at their versions) and deletions
            assert e.key.startswith("w") and e.op in ("set", "delete"), e
            if e.op == "set":
                c = by_version[e.version]
                assert (c.key, c.op, c.value) == (e.key, "set", e.value)
        versions = [e.version for e in logged]
        assert versions == sorted(set(versions)), "log-order changes repeated or reordered"
        for e in logged:  # the changes read from the stream or the log are the writer's own
            c = by_version[e.version]
            assert (c.key, c.op, c.value) == (e.key, e.op, e.value)
        assert b.local_digest() == b.broker_digest()
        view = apply({e.key: e.value for e in initial}, after)
        assert view == node_view(b) == {k: v for k, (_, v) in script.view().items()}
        # from_version older than the log: the current values, marked resync, then the marker
        with b.watch("w*", from_version=1) as w2:
            backlog = collect(w2, lambda es: bool(es) and es[-1].op == "initial_done")
        values, marker2, _ = split_initial(backlog)
        assert all(e.resync and e.op == "set" for e in values)
        assert {e.key: e.value for e in values} == node_view(b)
        assert marker2.version == b.seq


@pytest.mark.timeout(60)
def test_watch_from_version_resumes_after_that_version(
    broker_process: BrokerProcess, agents: Agents,
) -> None:
    a = agents.start(broker_process, "resume")
    script = Script(seed=3)
    script.run(a, 150)
    with SharedMemory(config(broker_process, "resume")) as b:
        wait_until(caught_up(b, script.last), 10, message="b has a's writes")
        for n in (0, 1, script.history[70].version, script.last - 1, script.last):
            with b.watch("w*", from_version=n) as w:
                backlog = collect(w, lambda es: bool(es) and es[-1].op == "initial_done")
            changes, marker, _ = split_initial(backlog)
            assert tuples(changes) == script.expected(after=n), f"from_version={n}"
            assert not any(e.initial or e.resync for e in changes)
            assert marker.version == script.last
        # resume, then live changes continue the same stream without a seam
        n = script.history[100].version
        with b.watch("w*", from_version=n) as w:
            script.run(a, 60)
            want = script.expected(after=n)
            events = collect(w, lambda es: len(es) >= len(want) + 1)
            wait_until(caught_up(b, script.last), 10, message="b has the live writes")
            events += drain(w)
        changes, marker, live = split_initial(events)
        assert tuples(changes + live) == want


@pytest.mark.timeout(60)
def test_watches_opened_during_a_write_stream_have_no_seam(
    broker_process: BrokerProcess, agents: Agents,
) -> None:
    """Backlog (initial values, or the log after from_version) then live changes: nothing lost
    or repeated at the seam, for watches opened while another node writes flat out."""
    a = agents.start(broker_process, "seam")
    script = Script(seed=6)
    script.run(a, 50)
    with SharedMemory(config(broker_process, "seam")) as b:
        wait_until(caught_up(b, script.last), 10, message="b has a's first writes")
        end = script.last + 2000
        ops = script.send(a, 2000)
        opened: list[tuple[int | None, Watcher]] = []
        while b.seq < end - 100 and len(opened) < 40:
            seq = b.seq
            opened.append((None, b.watch("w*")))
            opened.append((max(0, seq - 7), b.watch("w*", from_version=max(0, seq - 7))))
            wait_until(lambda s=seq: b.seq >= min(s + 20, end), 10, interval=0.001,
                       message="more of a's writes")
        script.finish(a, ops)
        assert len(opened) >= 10, "the writes ended before the watches were opened"
        wait_until(caught_up(b, script.last), 10, message="b has all of a's writes")
        for n, w in opened:
            events = drain(w)
            w.close()
            head, marker, live = split_initial(events)
            if n is None:
                check_initial(head, marker, script)
                assert tuples(live) == script.expected(after=marker.version)
            else:
                assert not any(e.initial or e.resync for e in head)
                assert tuples(head + live) == script.expected(after=n), f"from_version={n}"


@pytest.mark.timeout(60)
def test_watch_from_version_ahead_of_this_replica_repeats_nothing(
    broker_process: BrokerProcess, agents: Agents,
) -> None:
    """A consumer resumes on a node that lags the node it last read from."""
    a = agents.start(broker_process, "ahead")
    script = Script(seed=4)
    script.run(a, 20)
    with SharedMemory(config(broker_process, "ahead")) as b:
        wait_until(caught_up(b, script.last), 10, message="b has a's first writes")
        b._node.pause_reading.set()
        try:
            # The I/O thread has stopped reading once a heartbeat went unheard.
            wait_until(lambda: b.status().namespace.last_heard_age > HEARTBEAT + 0.2, 5,
                       message="b's reading paused")
            script.run(a, 30)
            resume_from = script.last  # the consumer has seen everything up to here
            assert b.seq < resume_from  # precondition: b lags
            w = b.watch("w*", from_version=resume_from)
        finally:
            b._node.pause_reading.clear()
        with w:
            script.run(a, 30)
            wait_until(caught_up(b, script.last), 10, message="b caught up")
            events = drain(w)
        changes = [e for e in events if e.op != "initial_done"]
        assert [e.op for e in events].count("initial_done") == 1
        repeated = [e.version for e in changes if e.version <= resume_from]
        assert repeated == [], f"changes at or before from_version={resume_from} repeated"
        assert tuples(changes) == script.expected(after=resume_from)


# ---------------------------------------------------------------------- 1b. on_change


@pytest.mark.timeout(60)
def test_on_change_gets_live_changes_and_cancel_stops_it(
    broker_process: BrokerProcess, agents: Agents,
) -> None:
    a = agents.start(broker_process, "cb")
    script = Script(seed=5)
    script.run(a, 30)
    with SharedMemory(config(broker_process, "cb")) as b:
        wait_until(caught_up(b, script.last), 10, message="b has a's first writes")
        start = script.last
        got: list[ChangeEvent] = []
        handle = b.on_change("w*", got.append)
        script.run(a, 80)
        want = script.expected(after=start)
        wait_until(lambda: len(got) >= len(want), 10, message="callbacks for a's writes")
        wait_until(caught_up(b, script.last), 10, message="b has a's writes")
        handle.cancel()
        assert not handle._thread.is_alive()
        n = len(got)
        assert tuples(got) == want  # live only: no initial values, no marker
        assert not any(e.initial or e.resync for e in got)
        with b.watch("w*", initial=False) as sentinel:
            script.run(a, 40)
            more = script.expected(after=script.history[-41].version)
            assert more, "the script wrote w* keys"
            # The sentinel is fed by the same dispatch, in order: once it has the last change,
            # a callback that was still registered would have been handed it too.
            collect(sentinel, lambda es: len(es) >= len(more))
        assert len(got) == n, f"{len(got) - n} callbacks after cancel() returned"


@pytest.mark.timeout(60)
def test_on_change_cancel_from_the_callback_stops_it(
    broker_process: BrokerProcess, agents: Agents,
) -> None:
    a = agents.start(broker_process, "cbself")
    with SharedMemory(config(broker_process, "cbself")) as b:
        queued = threading.Event()
        calls: list[tuple[int, bool]] = []
        cancelled = threading.Event()
        handles: list[Any] = []

        def callback(change: ChangeEvent) -> None:
            calls.append((change.version, cancelled.is_set()))
            if not cancelled.is_set():
                queued.wait(30)  # hold the first call until every change is queued
                handles[0].cancel()  # "that was the one I waited for"
                cancelled.set()

        handles.append(b.on_change("w*", callback))
        acks = a.call(op="ops", ops=[["set", f"w{i:02d}", i] for i in range(20)])["acks"]
        wait_until(caught_up(b, acks[-1]), 10, message="b has a's writes")
        queued.set()
        wait_until(lambda: not handles[0]._thread.is_alive(), 10, message="callback thread end")
        late = [v for v, after in calls if after]
        assert late == [], f"{len(late)} callbacks after cancel() returned (versions {late[:5]})"


@pytest.mark.timeout(60)
def test_on_change_no_new_callback_after_cancel_returns_with_a_busy_callback(
    broker_process: BrokerProcess, agents: Agents,
) -> None:
    a = agents.start(broker_process, "cbbusy")
    with SharedMemory(config(broker_process, "cbbusy")) as b:
        entered, release = threading.Event(), threading.Event()
        calls: list[tuple[int, bool]] = []
        returned = threading.Event()

        def callback(change: ChangeEvent) -> None:
            calls.append((change.version, returned.is_set()))
            entered.set()
            release.wait(30)  # a callback busy in user code

        handle = b.on_change("w*", callback)
        try:
            acks = a.call(op="ops", ops=[["set", f"w{i:02d}", i] for i in range(20)])["acks"]
            wait_until(caught_up(b, acks[-1]), 10, message="b has a's writes")
            assert entered.wait(10)
            handle.cancel(timeout=0.5)  # the busy callback outlives the join
            returned.set()
        finally:
            release.set()
        wait_until(lambda: not handle._thread.is_alive(), 10, message="callback thread end")
        late = [v for v, after in calls if after]
        assert late == [], f"{len(late)} callbacks began after cancel() returned"


# ---------------------------------------------------------------------- 2. update


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_update_from_8_processes_loses_no_increment(
    broker_process: BrokerProcess, agents: Agents,
) -> None:
    workers = agents.start_many(broker_process, "counter", 8)
    for w in workers:  # all are ready and blocked on stdin: this is the starting gun
        w.send(op="update", key="counter", n=200)
    results = [w.recv(100)["values"] for w in workers]
    with SharedMemory(config(broker_process, "counter")) as check:
        assert check.get("counter", consistent=True) == 1600
    for values in results:
        assert values == sorted(values) and len(values) == 200
    # each increment was applied to the value before it: every count 1..1600 written once
    assert sorted(v for values in results for v in values) == list(range(1, 1601))


# ---------------------------------------------------------------------- 3. compare-and-set


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_cas_create_exactly_one_of_8_processes_wins(
    broker_process: BrokerProcess, agents: Agents,
) -> None:
    workers = agents.start_many(broker_process, "cas", 8)
    with SharedMemory(config(broker_process, "cas")) as check:
        for rnd in range(3):
            key = f"lock{rnd}"
            for i, w in enumerate(workers):  # all blocked on stdin: released together
                w.send(op="create", key=key, owner=i)
            results = [w.recv(30) for w in workers]
            winners = [i for i, r in enumerate(results) if "won" in r]
            assert len(winners) == 1, results
            version = results[winners[0]]["won"]
            conflicts = [r["conflict"] for r in results if "conflict" in r]
            assert conflicts == [version] * 7, results
            assert check.get(key, consistent=True) == {"owner": winners[0]}
            assert check.get_metadata(key).version == version


# ---------------------------------------------------------------------- 4. touch


@pytest.mark.timeout(60)
def test_touch_extends_the_ttl_on_every_node(
    broker_process: BrokerProcess, agents: Agents,
) -> None:
    b = agents.start(broker_process, "touch")
    with SharedMemory(config(broker_process, "touch")) as a:
        t0 = time.monotonic()
        version = a.set("ext", "v", ttl=0.5)
        assert a.touch("ext", 30) == version + 1  # the change's seq...
        meta = a.get_metadata("ext")
        assert meta.version == version  # ...but the key's version is unchanged
        assert meta.expires_at is not None
        left = (meta.expires_at - datetime.now(UTC)).total_seconds()
        assert 28 < left <= 30.05
        assert b.call(op="wait_present", key="ext", within=5)["present"]
        # 1.2 s after the set, twice its original TTL, b still has the key
        assert b.call(op="hold", key="ext", until=t0 + 1.2, timeout=10)["missing_at"] is None
        assert a.get("ext") == "v"
        bm = b.call(op="meta", key="ext")
        assert not bm["missing"] and bm["version"] == version
        assert 27 < bm["expires_at"] - time.time() <= 30.05
        # touch to 0: never expires, on every node
        a.touch("ext", 0)
        assert a.get_metadata("ext").expires_at is None
        wait_until(lambda: b.call(op="meta", key="ext")["expires_at"] is None, 5,
                   interval=0.02, message="b sees the key made permanent")


@pytest.mark.timeout(60)
def test_touch_shortens_the_ttl_on_every_node(
    broker_process: BrokerProcess, agents: Agents,
) -> None:
    b = agents.start(broker_process, "shrink")
    with SharedMemory(config(broker_process, "shrink")) as a:
        version = a.set("k", "v", ttl=30)
        assert b.call(op="wait_present", key="k", within=5)["present"]
        with a.watch("k", initial=False) as w:
            t_touch = time.monotonic()
            touched = a.touch("k", 0.3)
            meta = a.get_metadata("k")
            assert meta.version == version and meta.expires_at is not None
            assert (meta.expires_at - datetime.now(UTC)).total_seconds() <= 0.3
            gone_at = b.call(op="wait_gone", key="k", within=5)["gone_at"]
            assert gone_at is not None, "the touched key never expired on b"
            assert gone_at - t_touch >= 0.3 - 0.01, "expired on b before its new TTL"
            assert gone_at - t_touch <= 0.3 + HEARTBEAT + 0.5, "b kept the key too long"
            wait_until(lambda: not a.exists("k"), 2, message="expiry on a")
            events = collect(w, lambda es: len(es) >= 2)
        assert [(e.key, e.op) for e in events] == [("k", "touch"), ("k", "expire")]
        assert events[0].version == touched and events[1].version > touched
        with pytest.raises(KeyNotFound):
            a.touch("k", 10)  # expired: nothing to touch
        with pytest.raises(KeyNotFound):
            a.touch("never-written", 10)
        assert a.get("k", None) is None


# ---------------------------------------------------------------------- 4b. consistent reads


@pytest.mark.timeout(60)
def test_consistent_get_sees_the_write_of_a_node_that_just_exited(
    broker_process: BrokerProcess, agents: Agents,
) -> None:
    with SharedMemory(config(broker_process, "cons")) as a:
        for rnd, paused in enumerate((True, False)):
            b = agents.start(broker_process, "cons")
            key = f"k{rnd}"
            if paused:  # make a lag for sure: its I/O thread stops reading the stream
                a._node.pause_reading.set()
            try:
                if paused:
                    wait_until(lambda: a.status().namespace.last_heard_age > HEARTBEAT + 0.2,
                               5, message="a's reading paused")
                version = b.call(op="set_exit", key=key, value={"round": rnd})["version"]
                assert b.proc.wait(10) == 0
                if paused:
                    assert a.get(key, None) is None  # precondition: a plain read is stale
            finally:
                a._node.pause_reading.clear()
            assert a.get(key, consistent=True) == {"round": rnd}
            assert a.get_metadata(key).version == version
            assert key in a.list_keys("k*", consistent=True)


# ---------------------------------------------------------------------- async API


@pytest.mark.timeout(60)
def test_async_watch_gets_changes_of_another_node(
    broker_process: BrokerProcess, agents: Agents,
) -> None:
    a = agents.start(broker_process, "async")
    first = a.call(op="ops", ops=[["set", "k0", 0]])["acks"]
    ops = [["set", "k1", 1], ["set", "other", 2], ["set", "k2", 3], ["set", "k1", 4],
           ["delete", "k1"]]

    async def main() -> tuple[list[ChangeEvent], list[int]]:
        async with AsyncSharedMemory(config(broker_process, "async")) as shm:
            assert await shm.get("k0", consistent=True) == {"i": 0, "pad": ""}
            events: list[ChangeEvent] = []
            async with shm.watch("k*") as watcher:
                writer = asyncio.create_task(asyncio.to_thread(a.call, op="ops", ops=ops))
                async with asyncio.timeout(20):
                    async for change in watcher:
                        events.append(change)
                        if (change.key, change.op) == ("k1", "delete"):
                            break
                acks = (await writer)["acks"]
            return events, acks

    events, acks = asyncio.run(main())
    initial, marker, live = split_initial(events)
    assert [(e.key, e.version, e.value, e.initial) for e in initial] == [
        ("k0", first[0], {"i": 0, "pad": ""}, True)]
    assert marker.version == first[0]
    assert tuples(live) == [
        ("k1", "set", acks[0], {"i": 1, "pad": ""}),
        ("k2", "set", acks[2], {"i": 3, "pad": ""}),
        ("k1", "set", acks[3], {"i": 4, "pad": ""}),
        ("k1", "delete", acks[4], None),
    ]
