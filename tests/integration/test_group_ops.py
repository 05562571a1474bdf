"""Operating a broker group (issue 10, Operations): ``sharedmem stats`` and the metrics show
every member's role, term, position, lag and sync-set membership; ``python -m broker
switchover`` hands leadership to a named in-sync standby with no acknowledged write lost.
Real etcd (the ``etcd_cluster`` fixture), real ``python -m broker --group`` processes, driven
with the helpers of tests/integration/test_group.py."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import wait_until
from tests.history import History
from tests.integration.test_group import (
    STABLE_LEASE_TTL,
    Group,
    Member,
    Writer,
    check_end,
    current_term,
    free_port_triple,
    running_group,
    wait_progress,
)
from tests.processes import ROOT, child_env, free_port_pair


@contextlib.contextmanager
def group_with_metrics(tmp_path: Path, etcd: Any) -> Iterator[tuple[Group, dict[str, int]]]:
    """Three members, each with its own --metrics-port (name -> port)."""
    ports = {f"m{i}": free_port_pair() for i in range(3)}
    members = [Member(name, free_port_triple(), tmp_path / name, etcd.endpoint_string,
                      extra=("--metrics-port", str(port))) for name, port in ports.items()]
    g = Group(members)
    try:
        for m in members:
            m.start()
        yield g, ports
    finally:
        g.stop_all()


def cli(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node", *args], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=timeout)


def broker_cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "broker", *args], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=timeout)


def seeds(group: Group) -> str:
    return ",".join(group.addresses())


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_stats_and_metrics_show_every_member_of_the_group(tmp_path: Path,
                                                          etcd_cluster: Any) -> None:
    with group_with_metrics(tmp_path, etcd_cluster) as (group, ports):
        primary = group.wait_formed()
        term = current_term(primary)
        history = History()
        writers = [Writer("w0", group.addresses(), history).start()]
        wait_progress(writers, 30, 30, "writes through the group", group)
        writers[0].join()

        def settled() -> dict[str, Any] | None:
            r = cli("--broker", seeds(group), "stats", "--json")
            assert r.returncode == 0, r.stderr
            members = json.loads(r.stdout).get("group", {})
            standbys = [m for n, m in members.items() if n != primary.name]
            if len(standbys) == 2 and all(m["role"] == "standby" and m["lag"] == 0
                                          and m["sync"] == 1 for m in standbys):
                return members
            return None

        members = wait_until(settled, 30, 0.1, "stats to show two caught-up standbys")  # poll
        assert set(members) == {m.name for m in group.members}
        p = members[primary.name]
        assert p["role"] == "primary" and p["term"] == term and p["seq"] >= 30
        for name, m in members.items():
            assert m["term"] == term, (name, m)
            if name != primary.name:
                assert m["seq"] == p["seq"], (name, m, p)

        text = cli("--broker", seeds(group), "stats")
        assert text.returncode == 0, text.stderr
        assert "group members: 3" in text.stdout
        lines = {ln.split()[0]: ln.split() for ln in text.stdout.splitlines()
                 if ln.strip() and ln.split()[0] in members}
        assert lines[primary.name][1:3] == ["primary", str(term)]
        assert all(lines[n][1] == "standby" and lines[n][-1] == "yes"
                   for n in members if n != primary.name), lines

        # The primary's metrics carry the same table, labelled by member and role.
        def scraped() -> dict[tuple[str, str], float] | None:
            url = f"http://127.0.0.1:{ports[primary.name]}/metrics"
            with urllib.request.urlopen(url, timeout=5) as r:
                fams = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
            lag, sync = fams.get("sharedmem_group_member_lag"), \
                fams.get("sharedmem_group_member_in_sync_set")
            if lag is None or sync is None:
                return None
            out = {(s.labels["member"], s.labels["role"]): s.value for s in lag.samples}
            in_sync = {s.labels["member"]: s.value for s in sync.samples}
            return out if len(out) == 3 and sum(in_sync.values()) == 2 else None

        lags = wait_until(scraped, 15, 0.1, "the group metrics")  # poll
        assert lags[(primary.name, "primary")] == 0
        assert sorted(r for (_, r) in lags) == ["primary", "standby", "standby"]
        # A standby's own Stats shows itself and the primary it follows.
        standby = next(m for m in group.members if m is not primary)
        r = cli("--broker", standby.address, "stats", "--json")
        assert r.returncode == 0, r.stderr
        seen = json.loads(r.stdout)["group"]
        assert seen[standby.name]["role"] == "standby"
        assert seen[primary.name]["role"] == "primary"
        check_end(group, history, [])


def full(m: Member) -> str:
    assert m.proc is not None
    m.proc.stderr_file.seek(0)
    return "\n".join(ln for ln in m.proc.stderr_file.read().splitlines() if "following" not in ln)


def switchover(etcd: Any, to: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return broker_cli("switchover", "--group", "g", "--etcd", etcd.endpoint_string, "--to", to,
                      *extra)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_switchover_hands_leadership_to_the_named_standby_with_no_write_lost(
        tmp_path: Path, etcd_cluster: Any) -> None:
    with running_group(tmp_path, etcd_cluster, lease_ttl=STABLE_LEASE_TTL) as group:
        primary = group.wait_formed()
        term = current_term(primary)
        history = History()
        writers = [Writer(f"w{i}", group.addresses(), history).start() for i in range(4)]
        wait_progress(writers, 50, 30, "writes before the switchover", group)
        target = next(m for m in group.members if m is not primary)
        r = switchover(etcd_cluster, target.name)
        assert r.returncode == 0, r.stderr + "\n" + primary.stderr()
        assert r.stdout.strip() == (f"switchover done: {target.name} is the primary of group "
                                    f"g, term {term + 1}"), r.stdout
        # The named standby leads in term + 1 (no election in between), writes go on there.
        try:
            wait_until(lambda: group.primary() is target, 30, 0.05, "the target to lead")
        except AssertionError:
            raise AssertionError(f"{group.roles()}\n" + "\n".join(
                f"--- {m.name}:\n{full(m)}" for m in group.members)) from None
        assert current_term(target) == term + 1
        wait_progress(writers, 50, 30, "writes under the new primary", group)
        assert any(t == term + 1 for w in writers for _, _, t in list(w.acks))
        assert {t for w in writers for _, _, t in list(w.acks)} <= {term, term + 1}
        # The old primary is a standby of the new term and rejoins the sync set.
        old = primary.stats()
        assert old is not None and old["group_primary"] == 0, old
        wait_until(lambda: (target.stats() or {}).get("group_sync_set") == 2, 30, 0.05,
                   "the old primary and the other standby to join the new sync set")
        wait_until(lambda: (primary.stats() or {}).get("group_in_sync_set") == 1, 30, 0.05,
                   "the old primary to see itself in the sync set")
        assert all(s is not None and s["group_term"] == term + 1
                   for s in group.roles().values()), group.roles()
        check_end(group, history, writers)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_switchover_refuses_a_target_outside_the_sync_set(tmp_path: Path,
                                                          etcd_cluster: Any) -> None:
    with running_group(tmp_path, etcd_cluster, lease_ttl=STABLE_LEASE_TTL) as group:
        primary = group.wait_formed()
        term = current_term(primary)
        r = switchover(etcd_cluster, primary.name)
        assert r.returncode == 2 and "is the primary of group 'g' already" in r.stderr, r
        r = switchover(etcd_cluster, "nobody")
        assert r.returncode == 2 and "nobody is not in the sync set" in r.stderr, r
        # A paused standby leaves the sync set: it may lack acknowledged writes from then on.
        lagging = next(m for m in group.members if m is not primary)
        lagging.signal(signal.SIGSTOP)
        try:
            wait_until(lambda: (primary.stats() or {}).get("group_sync_set") == 1, 30, 0.05,
                       "the paused standby to leave the sync set")
            history = History()
            writers = [Writer("w0", group.addresses(), history).start()]
            wait_progress(writers, 20, 30, "writes without the paused standby", group)
            r = switchover(etcd_cluster, lagging.name)
            assert r.returncode == 2, r
            assert f"{lagging.name} is not in the sync set" in r.stderr, r.stderr
            assert "only an in-sync standby holds every acknowledged write" in r.stderr
            assert group.primary() is primary and current_term(primary) == term
            wait_progress(writers, 20, 30, "writes after the refusal", group)
        finally:
            lagging.signal(signal.SIGCONT)
        r = broker_cli("switchover", "--group", "g", "--etcd", etcd_cluster.endpoint_string)
        assert r.returncode == 2 and "--to" in r.stderr, r
        check_end(group, history, writers)


def pid_gone(pid: int) -> bool:
    """No such process (a zombie counts as alive: its parent has not reaped it yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "X"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_scripts_group_serves_through_its_seed_list_and_stops_every_child(
        tmp_path: Path) -> None:
    from tests.etcd_cluster import require_etcd

    require_etcd()
    from node import SharedMemory, SharedMemoryConfig

    log = (tmp_path / "group.err").open("w")
    proc = subprocess.Popen(["bash", str(ROOT / "scripts" / "group"), "--dir",
                             str(tmp_path / "g")], cwd=ROOT, env=child_env(),
                            stdout=subprocess.PIPE, stderr=log, text=True)
    assert proc.stdout is not None
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(ln.strip() for ln in proc.stdout),
                              daemon=True)  # type: ignore[union-attr]
    reader.start()
    try:
        def ready() -> bool:
            assert proc.poll() is None, (lines, (tmp_path / "group.err").read_text())
            return any(ln.startswith("sharedmem group ready") for ln in list(lines))

        wait_until(ready, 90, 0.05, "the ready line of scripts/group")  # poll
        assert lines[0] == f"sharedmem group: data and logs in {tmp_path / 'g'}"
        seeds = next(ln for ln in lines if ln.startswith("SHAREDMEM_BROKER=")).split("=", 1)[1]
        assert len(seeds.split(",")) == 3
        ready_line = next(ln for ln in lines if ln.startswith("sharedmem group ready"))
        pids = [int(p) for p in ready_line.split(" pids ")[1].split()[0].split(",")]
        assert len(pids) == 6  # three etcd members, three brokers
        assert all(not pid_gone(p) for p in pids)
        with SharedMemory(SharedMemoryConfig(namespace="tryout", broker=seeds)) as shm:
            shm.set("k", {"v": 1})
            assert shm.get("k") == {"v": 1}
        with SharedMemory(SharedMemoryConfig(namespace="tryout", broker=seeds)) as other:
            assert wait_until(lambda: other.get("k"), 10, 0.02, "the write on a second node")
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
        log.close()
    assert rc == 0, (tmp_path / "group.err").read_text()
    wait_until(lambda: all(pid_gone(p) for p in pids), 20, 0.05,
               "every child of scripts/group to be gone")  # poll
