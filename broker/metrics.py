"""Prometheus text exposition of the broker's stats on ``--metrics-port`` (loopback by default).

The broker's loop renders the text once per heartbeat interval; the HTTP thread only serves
the last rendering, so it never touches the loop's data structures.
"""

from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from broker.protocol import StatsReply

logger = logging.getLogger("sharedmem.broker.metrics")


def render(stats: StatsReply) -> str:
    lines = [f'sharedmem_broker_info{{epoch="{stats.epoch}"}} 1']
    for name, value in sorted(stats.counters.items()):
        metric = f"sharedmem_{name}"
        kind = "counter" if name in {"writes", "events", "duplicates", "refused", "snapshots",
                                     "fetches", "expired", "fsyncs", "fsync_us_total",
                                     "compactions"} else "gauge"
        lines.append(f"# TYPE {metric} {kind}")
        lines.append(f"{metric} {value}")
    for field in ("keys", "seq", "max_keys"):
        lines.append(f"# TYPE sharedmem_namespace_{field} gauge")
        for ns, values in sorted(stats.namespaces.items()):
            lines.append(f'sharedmem_namespace_{field}{{namespace="{ns}"}} {values[field]}')
    return "\n".join(lines) + "\n"


class MetricsServer:
    """Serves ``GET /metrics`` with the latest rendering."""

    def __init__(self, host: str, port: int) -> None:
        self.text = "# no stats yet\n"
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404)
                    return
                body = server.text.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
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

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
