"""The broker's /metrics and /healthz over real HTTP, parsed by prometheus_client's own parser
(issue 12 acceptance 6): HELP on every family, counters as _total, durations in seconds, the
--metrics-host option, and /healthz 200 while serving and 503 before the loop reports, when it
is stuck, and while stopping."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker.metrics import MetricsServer
from broker.protocol import StatsReply
from node import SharedMemory, SharedMemoryConfig
from tests.conftest import BrokerProcess, free_port_pair, wait_until


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def families(text: str) -> dict[str, object]:
    return {f.name: f for f in text_string_to_metric_families(text)}


@pytest.mark.timeout(60)
def test_metrics_and_healthz_of_a_running_broker_parse_with_prometheus_client() -> None:
    port = free_port_pair()
    b = BrokerProcess(free_port_pair(), ("--metrics-port", str(port),
                                         "--metrics-host", "127.0.0.2")).start()
    base = f"http://127.0.0.2:{port}"
    try:
        with SharedMemory(SharedMemoryConfig(namespace="scraped", broker=b.address,
                                             max_keys=9)) as shm:
            shm.set_many({"a": 1, "b": 2})

            def scraped() -> dict | None:
                status, text = get(base + "/metrics")
                assert status == 200
                fams = families(text)
                keys = fams.get("sharedmem_namespace_keys")
                if keys is None:
                    return None
                by_ns = {s.labels["namespace"]: s.value for s in keys.samples}  # type: ignore[attr-defined]
                return fams if by_ns.get("scraped") == 2 else None

            fams = wait_until(scraped, 10, interval=0.05, message="metrics to show 2 keys")  # poll
            events = fams["sharedmem_events"]
            assert events.type == "counter" and events.documentation  # type: ignore[attr-defined]
            assert [(s.name, s.value) for s in events.samples] == [  # type: ignore[attr-defined]
                ("sharedmem_events_total", 2.0)]
            for fam in fams.values():
                assert fam.documentation, f"{fam.name} has no HELP"  # type: ignore[attr-defined]
            assert "sharedmem_uptime_seconds" in fams and "sharedmem_uptime_ms" not in fams
            uptime = fams["sharedmem_uptime_seconds"].samples[0].value  # type: ignore[attr-defined]
            assert 0 < uptime < 3600  # seconds, not milliseconds
            limits = fams["sharedmem_namespace_max_keys"].samples  # type: ignore[attr-defined]
            assert {s.labels["namespace"]: s.value for s in limits}["scraped"] == 9
            info = fams["sharedmem_broker_info"].samples[0]  # type: ignore[attr-defined]
            assert info.name == "sharedmem_broker_info" and info.labels["epoch"] == b.epoch
        status, body = get(base + "/healthz")
        assert (status, body.strip()) == (200, "ok")
        assert get(base + "/nope")[0] == 404
        # Only on the host asked for: 127.0.0.1 does not answer.
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)
    finally:
        b.stop()


def test_healthz_is_503_until_the_loop_reports_when_it_is_stuck_and_while_stopping() -> None:
    now = [100.0]
    server = MetricsServer("127.0.0.1", 0, stale_after=5.0, clock=lambda: now[0])
    url = f"http://127.0.0.1:{server.port}/healthz"
    try:
        status, body = get(url)
        assert status == 503 and "starting" in body
        server.update(StatsReply("e1", {}, {"writes": 3}))
        assert get(url)[0] == 200
        text = get(f"http://127.0.0.1:{server.port}/metrics")[1]
        assert families(text)["sharedmem_writes"].samples[0].value == 3  # type: ignore[attr-defined]
        now[0] += 6.0  # the loop has not reported for longer than stale_after
        status, body = get(url)
        assert status == 503 and "stuck" in body
        server.update(StatsReply("e1", {}, {}))
        assert get(url)[0] == 200
    finally:
        server.close()
    assert server.health() == (False, "stopping")
