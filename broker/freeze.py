"""A frozen view of one namespace at one seq, copied a chunk at a time between loop turns.

Why: a snapshot (a node's join, or a compaction) must reflect exactly the state at one seq,
but copying a million entries at once holds the broker's loop for 30-100 ms. A ``Freeze``
copies ``n`` entries per call instead, and keeps the view exact with copy-on-write: while it
is open, the first change of a key it has not copied yet records that key's entry as it was
at the freeze (or "absent") in ``shadow``; the copy takes the shadowed entry where there is
one, else the live one.

Rules:
- every call happens on the thread that changes the state (the broker's loop), between
  changes; nothing here is thread-safe, and no other thread reads the live state;
- "copied" means "key <= cursor" in the key index's order: the copy walks the sorted index
  from the cursor, so a key is copied exactly once, however the index changes meanwhile;
- a key changed after the freeze is shadowed only while it is not yet copied (key > cursor);
  once copied, later changes do not concern the view;
- a key that existed at the freeze and was deleted before the walk reached it is not in the
  index any more: its shadowed entry is handed out after the walk ends (``leftover``).
Entries are immutable ``bytes`` (broker/state.py), so handing out the live object is a copy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from broker.state import NamespaceState

_MISSING: object = object()


class Freeze:
    """The state of ``state`` at ``seq``, handed out by ``take`` in chunks of keys.

    Opening registers it with the state (``state.freezes``), which calls ``note`` before
    every change; the freeze unregisters itself once the walk has passed the last key."""

    __slots__ = ("state", "name", "seq", "max_keys", "cursor", "shadow", "walked",
                 "_leftover")

    def __init__(self, state: NamespaceState) -> None:
        self.state = state
        self.name = state.name
        self.seq = state.seq
        self.max_keys = state.max_keys
        self.cursor: str | None = None  # last key copied; None: none yet
        self.shadow: dict[str, bytes | None] = {}  # key -> its entry at the freeze (None: absent)
        self.walked = False  # the walk passed the last key: nothing more to shadow
        self._leftover: list[tuple[str, bytes]] = []
        if len(state.entries):
            state.freezes.append(self)
        else:
            self.walked = True

    def note(self, key: str) -> None:
        """``key`` is about to change: remember its entry at the freeze if not copied yet."""
        cursor = self.cursor
        if (cursor is None or key > cursor) and key not in self.shadow:
            self.shadow[key] = self.state.entries.get(key)

    @property
    def done(self) -> bool:
        """Everything was handed out."""
        return self.walked and not self._leftover

    def take(self, n: int) -> tuple[list[str], list[bytes]]:
        """Up to ``n`` more (keys, entries) of the view (fewer only at its end). Costs O(n
        plus the keys added since the freeze that the walk passes over)."""
        keys: list[str] = []
        values: list[bytes] = []
        if not self.walked:
            state = self.state
            index = state.index
            entries = state.entries
            shadow = self.shadow
            cursor = self.cursor
            # Walk until n are handed out: keys added after the freeze are walked, not taken.
            while len(keys) < n:
                want = n - len(keys)
                at = 0 if cursor is None else index.bisect_right(cursor)
                walk: list[str] = index[at:at + want]
                if not walk:
                    break
                cursor = walk[-1]
                if not shadow:  # nothing changed yet among these: the live entries are it
                    keys += walk
                    values += map(entries.__getitem__, walk)
                    continue
                pop = shadow.pop
                for key in walk:
                    old = pop(key, _MISSING)
                    if old is _MISSING:
                        keys.append(key)
                        values.append(entries[key])
                    elif old is not None:
                        keys.append(key)
                        values.append(old)  # type: ignore[arg-type]
                if len(walk) < want:
                    break
            self.cursor = cursor
            if cursor is None or index.bisect_right(cursor) >= len(index):
                self._finish_walk()
            n -= len(keys)
        if self._leftover and n > 0:
            part, self._leftover = self._leftover[:n], self._leftover[n:]
            keys.extend(k for k, _ in part)
            values.extend(e for _, e in part)
        return keys, values

    def take_all(self) -> tuple[list[str], list[bytes]]:
        """The rest of the view at once (shutdown, tests)."""
        keys: list[str] = []
        values: list[bytes] = []
        while not self.done:
            k, v = self.take(1 << 20)
            keys += k
            values += v
        return keys, values

    def close(self) -> None:
        """Stop shadowing (an abandoned view); ``take`` must not be called afterwards."""
        self._finish_walk()
        self._leftover = []

    def _finish_walk(self) -> None:
        if self.walked:
            return
        self.walked = True
        try:
            self.state.freezes.remove(self)
        except ValueError:
            pass
        # Shadowed keys the walk never met: they existed at the freeze, and were deleted
        # (and not re-added) before the walk got there.
        self._leftover = [(k, e) for k, e in self.shadow.items() if e is not None]
        self.shadow = {}


class FrozenStates:
    """Frozen views of several namespaces taken at one moment (a compaction's snapshot),
    copied by ``step`` on the loop and read, once complete, by another thread (``wait``).

    The only hand-over between the threads is ``ready``: the loop sets it after the last
    copy, and the reader touches ``copies`` only after it is set."""

    def __init__(self, states: list[NamespaceState]) -> None:
        import threading  # the one cross-thread hand-over; this module is otherwise pure

        self.freezes = [Freeze(s) for s in states]
        # name, max_keys, seq, keys, entries: the view, complete once ``ready`` is set
        self.copies: list[tuple[str, int, int, list[str], list[bytes]]] = [
            (f.name, f.max_keys, f.seq, [], []) for f in self.freezes
        ]
        self._next = 0
        self.ready = threading.Event()
        self._check_done()

    def step(self, n: int) -> bool:
        """Copy up to ``n`` more entries; True while some are left."""
        while n > 0 and self._next < len(self.freezes):
            freeze = self.freezes[self._next]
            keys, values = freeze.take(n)
            _, _, _, ks, vs = self.copies[self._next]
            ks += keys
            vs += values
            n -= max(1, len(keys))
            if freeze.done:
                self._next += 1
        return not self._check_done()

    def finish(self) -> None:
        """Copy the rest at once (the loop is stopping and will not step any more)."""
        while self.step(1 << 20):
            pass

    def wait(self, timeout: float | None = None) -> bool:
        """On the reader's thread: block until the copy is complete (True), or ``timeout``."""
        return self.ready.wait(timeout)

    def _check_done(self) -> bool:
        if self._next >= len(self.freezes):
            self.ready.set()
            return True
        return False
