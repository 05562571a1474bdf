"""Watchers: a stream of the changes a node's replica applies, filtered by a key pattern.

Owns: the per-watcher queue and its delivery order. The node's I/O thread pushes every change
the replica applies (live events, repaired ranges, and -- after a resync from a snapshot -- the
diff between the old view and the new state), in log order, exactly once. A watcher never sees
a duplicate and never a silent hole: the replica never skips a seq, and a resync that cannot
replay the log delivers the diff, marked ``resync=True``.

Must never: block the I/O thread (queues are unbounded; a consumer that stops reading costs
memory, not progress) or run user callbacks on the I/O thread.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal

import msgspec

from broker.pattern import Pattern
from broker.protocol import Event, KeyDeleted, KeyExpired, KeySet, KeyTouched

INITIAL_DONE: Final = "initial_done"
ChangeOp = Literal["set", "delete", "expire", "touch", "initial_done"]
_CLOSED = object()


@dataclass(frozen=True, slots=True)
class ChangeEvent:
    """One change of one key. ``op``: ``set``, ``delete``, ``expire``, ``touch``, or
    ``initial_done`` (the marker between the initial values and live changes).

    ``value`` is a fresh copy (``set`` only); ``version`` is the namespace seq of the change;
    ``modified_at`` is the broker's UTC time of the write (``set`` only); ``initial`` marks the
    current values sent when the watch began; ``resync`` marks a change derived from a
    snapshot diff rather than read from the log.
    """

    key: str
    op: ChangeOp
    version: int
    value: Any = None
    modified_at: datetime | None = None
    initial: bool = False
    resync: bool = False


def change_from_event(event: Event, *, initial: bool = False,
                      resync: bool = False) -> ChangeEvent:
    if type(event) is KeySet:
        return ChangeEvent(event.key, "set", event.seq, msgspec.json.decode(event.value),
                           datetime.fromtimestamp(event.modified_at, UTC), initial, resync)
    if type(event) is KeyDeleted:
        return ChangeEvent(event.key, "delete", event.seq, resync=resync)
    if type(event) is KeyExpired:
        return ChangeEvent(event.key, "expire", event.seq, resync=resync)
    if type(event) is KeyTouched:
        return ChangeEvent(event.key, "touch", event.seq, resync=resync)
    raise TypeError(f"not an event: {event!r}")  # pragma: no cover


class Watcher:
    """A pattern and a queue; iterate it (blocking) or call ``get(timeout)``.

    Changes pushed before ``release()`` are held back, so a backlog (initial values, or the
    log from ``from_version``) is delivered first, then whatever happened meanwhile.
    """

    def __init__(self, pattern: Pattern, on_close: Callable[[Watcher], None],
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.pattern = pattern
        self._on_close = on_close
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._loop = loop
        self._aqueue: asyncio.Queue[Any] | None = asyncio.Queue() if loop is not None else None
        self._held: list[Any] | None = []
        self._floor = 0  # changes at or below this version were delivered in the backlog
        self._epoch: str | None = None  # the history the floor belongs to
        self._lock = threading.Lock()
        self.last_version = 0
        self.closed = False

    # -- producer side (I/O thread, or the registering thread for the backlog)

    def _deliver(self, item: Any) -> None:
        if self._aqueue is not None:
            assert self._loop is not None
            try:
                self._loop.call_soon_threadsafe(self._aqueue.put_nowait, item)
            except RuntimeError:  # loop closed: nobody is listening any more
                self.closed = True
        else:
            self._queue.put(item)

    def note_epoch(self, epoch: str | None) -> None:
        """Called before each dispatch: a new history (epoch) starts its versions afresh, so
        the floor of the old one no longer applies."""
        with self._lock:
            if self._epoch is None:
                self._epoch = epoch
            elif epoch != self._epoch:
                self._epoch = epoch
                self._floor = 0

    def push(self, change: ChangeEvent) -> None:
        with self._lock:
            if self.closed:
                return
            if self._held is not None:
                self._held.append(change)
                return
            if change.version <= self._floor and not change.resync:
                return  # the caller already has it (from_version ahead of this replica)
            self._deliver(change)

    def release(self, backlog: list[ChangeEvent], *, through_version: int) -> None:
        """Deliver ``backlog`` then the held changes newer than ``through_version``."""
        with self._lock:
            for change in backlog:
                self._deliver(change)
            for change in self._held or []:
                if change.op == INITIAL_DONE or change.version > through_version:
                    self._deliver(change)
            self._held = None
            self._floor = through_version

    # -- consumer side

    def get(self, timeout: float | None = None) -> ChangeEvent | None:
        """The next change, or None after ``timeout`` seconds (or once closed)."""
        if self._aqueue is not None:
            raise TypeError("this watcher came from AsyncSharedMemory.watch: use 'async for' "
                            "or 'await watcher.aget()'")
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
        if item is _CLOSED:
            self._queue.put(_CLOSED)  # keep later get() calls returning promptly
            return None
        return item

    def __iter__(self) -> Iterator[ChangeEvent]:
        while True:
            item = self.get()
            if item is None:
                return
            yield item

    async def aget(self, timeout: float | None = None) -> ChangeEvent | None:
        """The next change, or None after ``timeout`` seconds (or once closed); the async
        twin of ``get``. Only for a watcher from ``AsyncSharedMemory.watch``."""
        if self._aqueue is None:
            raise TypeError("this watcher came from SharedMemory.watch: use get() or iterate it")
        try:
            item = await asyncio.wait_for(self._aqueue.get(), timeout)
        except TimeoutError:
            return None
        if item is _CLOSED:
            self._aqueue.put_nowait(_CLOSED)
            return None
        return item

    def __aiter__(self) -> Watcher:
        return self

    async def __anext__(self) -> ChangeEvent:
        item = await self.aget()
        if item is None:
            raise StopAsyncIteration
        return item

    def close(self) -> None:
        """Stop the watch; iteration ends after the changes already queued."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self._held = None
            self._deliver(_CLOSED)
        self._on_close(self)

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Watcher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class CallbackHandle:
    """Runs ``callback(change)`` for each change on a thread of its own; ``cancel()`` stops it."""

    def __init__(self, watcher: Watcher, callback: Callable[[ChangeEvent], object]) -> None:
        self._watcher = watcher
        self._callback = callback
        self._cancelled = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sharedmem-on-change",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import logging

        for change in self._watcher:
            if self._cancelled.is_set():
                return  # changes queued before cancel() are not delivered after it
            try:
                self._callback(change)
            except Exception:  # noqa: BLE001 - a failing callback must not end the watch
                logging.getLogger("sharedmem.node").exception("on_change callback failed")

    def cancel(self, timeout: float = 5.0) -> None:
        """Stop: no callback starts after this returns (one already running may finish)."""
        self._cancelled.set()
        self._watcher.close()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
