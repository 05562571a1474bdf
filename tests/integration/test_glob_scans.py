"""Glob scans on a real SharedMemory (embedded broker): issue 14 item 6.

The reproductions of the issue must complete through the public API, and matching must run
outside the replica lock: a get() on another thread returns while a list_keys is matching.
"""

from __future__ import annotations

import sys
import threading
import uuid
from collections.abc import Iterator
from types import FrameType
from typing import Any

import pytest

from broker.pattern import Pattern
from node import SharedMemory, SharedMemoryConfig

PATHOLOGICAL = "*a" * 12 + "b"


@pytest.fixture
def shm() -> Iterator[SharedMemory]:
    with SharedMemory(SharedMemoryConfig(namespace=f"glob-{uuid.uuid4().hex[:8]}")) as s:
        yield s


@pytest.mark.timeout(30)
def test_the_issue_reproductions_complete(shm: SharedMemory) -> None:
    """Both took from 11 s to forever with the backtracking regex (under the replica lock)."""
    shm.set("a" * 40, 1)
    assert shm.list_keys(PATHOLOGICAL) == []
    shm.set_many({f"{i:04d}" + "a" * 50: i for i in range(200)})
    assert shm.list_keys("*a" * 8 + "*b") == []
    shm.set("0007" + "a" * 50 + "b", "hit")
    assert shm.list_keys("*a" * 8 + "*b") == ["0007" + "a" * 50 + "b"]
    assert shm.list_keys("0007" + "*a" * 8 + "*b") == ["0007" + "a" * 50 + "b"]


@pytest.mark.timeout(30)
def test_a_watch_with_a_pathological_pattern_filters_on_the_io_thread(shm: SharedMemory) -> None:
    shm.set("a" * 40, 0)
    with shm.watch(PATHOLOGICAL) as w:
        first = w.get(timeout=10)
        assert first.op == "initial_done"  # no initial match: only the marker
        shm.set("a" * 41, 1)  # not a match: it ends with 'a'
        shm.set("a" * 39 + "b", 2)
        change = w.get(timeout=10)
        assert (change.key, change.value) == ("a" * 39 + "b", 2)


@pytest.mark.timeout(60)
def test_get_returns_while_list_keys_is_matching_on_another_thread(shm: SharedMemory) -> None:
    """The list_keys thread is held inside the matcher (``Pattern.select``) by a trace hook
    until a get() on a third thread has returned; with matching under the replica lock the
    get() could not return, and this test would time out."""
    shm.set_many({f"k{i:03d}" + "a" * 40: i for i in range(100)})
    shm.set("probe", "value")
    in_matcher = threading.Event()
    release = threading.Event()
    result: dict[str, Any] = {}

    def hold_in_select(frame: FrameType, event: str, arg: object) -> None:
        if event == "call" and frame.f_code is Pattern.select.__code__:
            in_matcher.set()
            release.wait(30)
        return None

    def scan() -> None:
        sys.settrace(hold_in_select)  # this thread only
        try:
            result["keys"] = shm.list_keys("k*" + PATHOLOGICAL)
        finally:
            sys.settrace(None)

    def read() -> None:
        result["got"] = shm.get("probe")

    scanner = threading.Thread(target=scan, daemon=True)
    scanner.start()
    try:
        assert in_matcher.wait(20), "list_keys never reached the matcher"
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(20)
        assert not reader.is_alive(), "get() waited for the list_keys on another thread"
        assert result["got"] == "value"
        assert scanner.is_alive() and "keys" not in result  # still inside list_keys
    finally:
        release.set()
        scanner.join(20)
    assert result["keys"] == []
    assert shm.list_keys("k00*") == [f"k00{i}" + "a" * 40 for i in range(10)]
