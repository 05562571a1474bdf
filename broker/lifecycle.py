"""A broker's life around its loop: building the core and its log, the start-up order, the
sockets with their options and binds, the thread's start/stop handshake, and the shut-down.

Why a module of its own: none of it runs per message, and keeping it out of the loop
(broker/server.py, ``Broker``, which subclasses ``BrokerLifecycle``) leaves that file to the
hot path: receive, turn, send.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Self

import zmq

from broker.access import Access
from broker.config import BrokerConfig
from broker.core import BrokerCore
from broker.durable import DurableLog
from broker.log import Log, MemoryLog
from broker.metrics import MetricsServer
from broker.protocol import Reply
from broker.recovery import RecoveryReport
from broker.subscriptions import Subscriptions
from broker.zmtp import set_heartbeats

if TYPE_CHECKING:
    from broker.group_shell import GroupShell

logger = logging.getLogger("sharedmem.broker")


class BrokerLifecycle:
    """Everything of a ``Broker`` but the loop itself (``_loop`` and ``_send_reply``)."""

    router: zmq.Socket  # requests; the three sockets exist once _open_sockets ran
    xpub: zmq.Socket  # events and subscriptions
    ctl: zmq.Socket  # stop()

    def __init__(self, config: BrokerConfig | None = None, *, context: zmq.Context | None = None,
                 core: BrokerCore | None = None) -> None:
        self.config = cfg = config or BrokerConfig()
        if core is None:
            event_log: Log = (
                DurableLog(cfg.data_dir, fsync=cfg.fsync, retention=cfg.log_retention,
                           compact_bytes=cfg.compact_bytes)
                if cfg.data_dir else MemoryLog(cfg.log_retention)
            )
            core = BrokerCore(max_value_bytes=cfg.max_value_bytes, log=event_log)
        self.core = core
        self.recovery: RecoveryReport | None = None
        self.loop_failed = False  # the loop ended by an error, not by stop()
        # A secure broker gets a context of its own: ZAP's handler is per context.
        self._own_ctx = context is None and cfg.security is not None
        self._ctx = context or (zmq.Context() if self._own_ctx else zmq.Context.instance())
        self.access = Access(cfg.security)
        self.subscriptions = Subscriptions(core, self.access, self._send_reply)
        self._ctl_endpoint = f"inproc://sharedmem-broker-ctl-{id(self)}-{os.getpid()}"
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stopped = threading.Event()
        self._startup_error: BaseException | None = None
        self.endpoints: list[str] = []
        self.pub_endpoints: list[str] = []
        self.metrics: MetricsServer | None = None
        self.started_at = time.monotonic()
        # Broker groups (broker/group_shell.py): set before start() for --group; None: single.
        self.group: GroupShell | None = None

    @property
    def epoch(self) -> str:
        return self.core.epoch

    @property
    def subscribers(self) -> dict[str, int]:
        return self.subscriptions.subscribers

    @property
    def stopped(self) -> bool:
        """True once the loop has ended (after ``stop()``, a failed start, or a crash)."""
        return self._stopped.is_set()

    def _loop(self) -> None:
        raise NotImplementedError  # broker/server.py

    def _send_reply(self, envelope: list[bytes], reply: Reply, extra: bytes | None = None
                    ) -> None:
        raise NotImplementedError  # broker/server.py

    # ------------------------------------------------------------------ thread

    def start(self, timeout: float = 10.0) -> Self:
        """Run the loop on a daemon thread; returns once bound (raises the bind error)."""
        self._thread = threading.Thread(target=self.run, name="sharedmem-broker", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("broker did not start in time")
        if self._startup_error is not None:
            raise self._startup_error
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop and close its sockets; idempotent."""
        if self._ready.is_set() and not self._stopped.is_set() and self._startup_error is None:
            ctl = self._ctx.socket(zmq.PAIR)
            ctl.setsockopt(zmq.LINGER, 0)
            try:
                ctl.connect(self._ctl_endpoint)
                ctl.send(b"stop")
                self._stopped.wait(timeout)
            finally:
                ctl.close(linger=0)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        if self._own_ctx and self._stopped.is_set() and not self._ctx.closed:
            self._ctx.destroy(linger=0)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ sockets

    def _open_sockets(self) -> None:
        cfg = self.config
        self.access.start(self._ctx)  # the ZAP handler before any bind
        router = self.router = self._ctx.socket(zmq.ROUTER)
        xpub = self.xpub = self.subscriptions.xpub = self._ctx.socket(zmq.XPUB)
        self.ctl = self._ctx.socket(zmq.PAIR)
        for s in (router, xpub, self.ctl):
            s.setsockopt(zmq.LINGER, 0)
        for s in (router, xpub):
            s.setsockopt(zmq.MAXMSGSIZE, cfg.max_message_bytes)
            self.access.secure(s)
            set_heartbeats(s)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        router.setsockopt(zmq.RCVHWM, cfg.hwm)
        router.setsockopt(zmq.SNDHWM, cfg.hwm)
        xpub.setsockopt(zmq.XPUB_MANUAL, 1)
        xpub.setsockopt(zmq.SNDHWM, cfg.pub_hwm or cfg.hwm)
        self.ctl.bind(self._ctl_endpoint)
        if cfg.metrics_port is not None:
            self.metrics = MetricsServer(cfg.metrics_host, cfg.metrics_port,
                                         stale_after=max(5.0, 10 * cfg.heartbeat_interval))
        for ep in cfg.bind:
            router.bind(ep)
            self.endpoints.append(router.getsockopt_string(zmq.LAST_ENDPOINT))
        for ep in cfg.pub_endpoints():
            xpub.bind(ep)
            self.pub_endpoints.append(xpub.getsockopt_string(zmq.LAST_ENDPOINT))

    def _close_sockets(self) -> None:
        for name in ("router", "xpub", "ctl"):
            s = getattr(self, name, None)
            if s is not None:
                s.close(linger=0)
        self.access.stop()
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None

    # ------------------------------------------------------------------ start-up, shut-down

    def run(self) -> None:
        """The event loop; returns after ``stop()`` (or after the loop failed: logged, and the
        stopped event is set whatever else fails, so no caller waits on a dead loop).

        Start-up order: lock the data directory and read it (nothing written), bind, and only
        then write the directory's small files and open the segment -- a broker that cannot
        start (directory in use, port taken) changes nothing on disk."""
        event_log = self.core.log
        try:
            self.recovery = r = event_log.recover(self.core)
            self._open_sockets()
            event_log.open_for_writing()
            if self.group is not None:
                self.group.attach(self._ctx, self.ctl)
            if r is not None:
                logger.info("recovered epoch %s: snapshot %s, %d segments, %d records, %d torn "
                            "bytes dropped", r.epoch, r.snapshot, r.segments, r.records,
                            r.torn_bytes)
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self._startup_error = exc
            try:
                if self.group is not None:
                    self.group.close()
                self._close_sockets()
                event_log.close()
            except Exception:  # noqa: BLE001 - the start-up error is the one to report
                logger.exception("cleaning up after a failed start")
            finally:
                self._ready.set()
                self._stopped.set()
            return
        logger.info("broker epoch %s: requests on %s, events on %s", self.epoch,
                    ", ".join(self.endpoints), ", ".join(self.pub_endpoints))
        self._ready.set()
        failed = False
        try:
            self._loop()
        except BaseException:
            failed = True
            logger.exception("the broker loop failed; the broker stops")
        finally:
            self._shut_down(clean=not failed)

    def _shut_down(self, *, clean: bool) -> None:
        """Close sockets and log; the log marks its directory clean only if everything was
        flushed. Each step may fail (a vanished directory, a full disk); the stopped event is
        set regardless."""
        try:
            try:
                if self.group is not None:
                    self.group.close()
                self._close_sockets()
            except Exception:  # noqa: BLE001
                logger.exception("closing the sockets failed")
            self.core.finish_freezes()  # a compaction thread may be waiting for its view
            self.core.log.shut_down(clean=clean)
        finally:
            self._stopped.set()
            self.loop_failed = not clean
