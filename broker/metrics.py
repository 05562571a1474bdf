"""The broker's Prometheus endpoint (``--metrics-port``, ``--metrics-host``): ``/metrics`` in
the exposition format, rendered by ``prometheus_client``, and ``/healthz``.

The broker's loop hands over its latest ``StatsReply`` once per heartbeat interval
(``update``); the HTTP thread only reads that frozen value, so it never touches the loop's data
structures. ``/healthz`` answers 200 while the loop keeps handing over stats (it is serving)
and 503 before the first one, after ``close`` began, or when the loop has not reported for
``stale_after`` seconds (it is stuck). Counters end in ``_total`` and durations are seconds,
as the Prometheus naming conventions ask.

``prometheus_client`` is the optional extra ``sharedmem[metrics]``: only a broker that serves
metrics imports it (a clear error otherwise), so the request path never depends on it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from broker.protocol import StatsReply

logger = logging.getLogger("sharedmem.broker.metrics")

# counter name in StatsReply.counters -> (metric name without _total, help)
COUNTERS: dict[str, tuple[str, str]] = {
    "writes": ("sharedmem_writes", "Write requests applied (refusals and resends excluded)."),
    "events": ("sharedmem_events", "Events appended to the log (sets, deletes, expiries)."),
    "duplicates": ("sharedmem_duplicates", "Retried writes answered from the dedup table."),
    "refused": ("sharedmem_refused", "Write requests refused (nothing changed)."),
    "snapshots": ("sharedmem_snapshots", "Namespace snapshots handed to joining nodes."),
    "fetches": ("sharedmem_fetches", "Fetch requests for gap repair."),
    "expired": ("sharedmem_expired", "Keys removed because their TTL ran out."),
    "fsyncs": ("sharedmem_fsyncs", "fsync calls of the durable log."),
    "compactions": ("sharedmem_compactions", "Log compactions (snapshot + new segment)."),
}
# gauge name in StatsReply.counters -> (metric name, help, scale to the metric's unit)
GAUGES: dict[str, tuple[str, str, float]] = {
    "subscribers": ("sharedmem_subscribers", "Event-stream subscriptions (namespace topics).",
                    1.0),
    "pending_snapshots": ("sharedmem_pending_snapshots",
                          "Snapshots waiting for their subscription barrier.", 1.0),
    "events_per_s": ("sharedmem_events_per_second",
                     "Events per second over the last stats window.", 1.0),
    "fsync_us_avg": ("sharedmem_fsync_average_seconds", "Mean duration of one fsync.", 1e-6),
}


def metric_families(stats: StatsReply) -> Iterator[Any]:
    """The metric families of one stats snapshot (prometheus_client core objects)."""
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        InfoMetricFamily,
    )

    yield InfoMetricFamily("sharedmem_broker", "This broker incarnation.",
                           value={"epoch": stats.epoch})
    c = stats.counters
    for name, (metric, help_text) in COUNTERS.items():
        if name in c:
            yield CounterMetricFamily(metric, help_text, value=c[name])
    if "fsync_us_total" in c:
        yield CounterMetricFamily("sharedmem_fsync_seconds", "Time spent in fsync.",
                                  value=c["fsync_us_total"] / 1e6)
    for name, (metric, help_text, scale) in GAUGES.items():
        if name in c:
            yield GaugeMetricFamily(metric, help_text, value=c[name] * scale)
    if "uptime_ms" in c:
        yield GaugeMetricFamily("sharedmem_uptime_seconds", "Seconds since the broker started.",
                                value=c["uptime_ms"] / 1000)
    for field, help_text in (("keys", "Keys stored in the namespace."),
                             ("seq", "Seq of the namespace's last event."),
                             ("max_keys", "The namespace's key limit (0 = unlimited).")):
        g = GaugeMetricFamily(f"sharedmem_namespace_{field}", help_text, labels=["namespace"])
        for ns, values in sorted(stats.namespaces.items()):
            g.add_metric([ns], values[field])
        yield g
    yield from group_families(stats)


# StatsReply.group field -> (metric name, help); labels member and role
GROUP_GAUGES: dict[str, tuple[str, str]] = {
    "term": ("sharedmem_group_member_term", "The member's term (-1: not known here)."),
    "seq": ("sharedmem_group_member_seq",
            "The member's durable position in the term (-1: not known here)."),
    "lag": ("sharedmem_group_member_lag",
            "Records the member is behind the primary (-1: not known here)."),
    "sync": ("sharedmem_group_member_in_sync_set",
             "1 if the member is in the sync set (a commit waits for its ack)."),
}


def group_families(stats: StatsReply) -> Iterator[Any]:
    """A broker group's per-member gauges (nothing for a single broker)."""
    if not stats.group:
        return
    from prometheus_client.core import GaugeMetricFamily

    for field, (metric, help_text) in GROUP_GAUGES.items():
        g = GaugeMetricFamily(metric, help_text, labels=["member", "role"])
        for name, m in sorted(stats.group.items()):
            value = m.get(field, -1)
            g.add_metric([name, str(m.get("role", "unknown"))],
                         float(value) if isinstance(value, int) else -1.0)
        yield g


def render(stats: StatsReply) -> str:
    """The exposition text of one stats snapshot (what ``/metrics`` serves)."""
    return _generate(_registry(lambda: stats)).decode()


def _registry(latest: Callable[[], StatsReply | None]) -> Any:
    from prometheus_client import CollectorRegistry

    class Collector:
        def collect(self) -> Iterator[Any]:
            stats = latest()
            if stats is not None:
                yield from metric_families(stats)

        def describe(self) -> list[Any]:
            return []  # unchecked collector: names vary with the stats present

    # A registry of our own: several brokers in one process (tests) never collide, and the
    # scrape shows the broker's numbers only.
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector())
    return registry


def _generate(registry: Any) -> bytes:
    from prometheus_client import generate_latest

    return bytes(generate_latest(registry))


def require_prometheus_client() -> None:
    """Raise RuntimeError with the install hint when prometheus_client is missing."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise RuntimeError("--metrics-port needs prometheus_client: pip install "
                           "'sharedmem[metrics]' (or prometheus_client)") from None


class MetricsServer:
    """Serves ``GET /metrics`` (the latest stats) and ``GET /healthz`` on ``host:port``."""

    def __init__(self, host: str, port: int, *, stale_after: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        require_prometheus_client()
        from prometheus_client.exposition import CONTENT_TYPE_LATEST

        self.stale_after = stale_after
        self._clock = clock
        self._stats: StatsReply | None = None
        self._updated = float("-inf")
        self._closing = False
        registry = _registry(lambda: self._stats)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                path = self.path.split("?")[0]
                if path == "/metrics":
                    self._send(200, _generate(registry), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    ok, why = server.health()
                    self._send(200 if ok else 503, (why + "\n").encode(),
                               "text/plain; charset=utf-8")
                else:
                    self.send_error(404, "only /metrics and /healthz are served")

            def _send(self, code: int, body: bytes, content_type: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                logger.debug(format, *args)

        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        name="sharedmem-metrics", daemon=True)
        self._thread.start()

    def update(self, stats: StatsReply) -> None:
        """The loop's latest stats (a frozen value; called once per heartbeat interval)."""
        self._stats = stats
        self._updated = self._clock()

    def health(self) -> tuple[bool, str]:
        """(serving, reason): what ``/healthz`` answers."""
        if self._closing:
            return False, "stopping"
        if self._stats is None:
            return False, "starting: no stats from the broker loop yet"
        age = self._clock() - self._updated
        if age > self.stale_after:
            return False, f"stuck: the broker loop has not reported for {age:.1f}s"
        return True, "ok"

    def close(self) -> None:
        self._closing = True
        self._httpd.shutdown()
        self._httpd.server_close()
