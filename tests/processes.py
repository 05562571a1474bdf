"""Child processes on loopback, for the tests and for ``scripts/bench``: free ports, the child
environment, a ``python -m broker`` process, stopping a child by PID, waiting on a condition.

One copy serves both: tests/conftest.py re-exports these names for the tests, and
scripts/benchkit imports them as ``tests.processes`` (scripts/bench.py puts the repo root on
``sys.path``; pytest runs from the root, so ``tests.*`` imports already work there). Rules: only
the standard library (no pytest, so the benchmark can import it), only processes we started,
stopped by PID, and only 127.0.0.1.
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def wait_until(condition: Callable[[], object], timeout: float = 10.0,
               interval: float = 0.01, message: str = "condition") -> object:
    """Poll ``condition`` until truthy and return its value; raise AssertionError after
    ``timeout`` seconds (a test fails with it; the benchmark reports it)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)  # poll


# Ports for the tests' listeners come from below the kernel's ephemeral range (32768-60999 by
# default), so that no outgoing connection's source port takes one between our check and the
# broker's bind, and each pytest-xdist worker has a slice of its own, so that two workers never
# pick the same "free" port at the same moment (the race that asking the kernel for port 0
# leaves open). Within a process the ports are handed out walking forward from a random start,
# so a port just released (a stopped broker's) is not handed out again soon.
_PORT_LOW, _PORT_HIGH = 20000, 32000
_port_cursor: int | None = None


def _worker_slice() -> tuple[int, int]:
    """This process's ``[low, high)`` of ports: the xdist worker's share, or all of them."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    index = int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else 0
    width = (_PORT_HIGH - _PORT_LOW) // max(count, 1)
    low = _PORT_LOW + (index % max(count, 1)) * width
    return low, low + width


def port_free(port: int) -> bool:
    """Whether 127.0.0.1:``port`` can be bound right now."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_run(n: int) -> int:
    """A port P on 127.0.0.1 such that P .. P+n-1 are all free right now, from this worker's
    slice (a broker binds P and P+1; a group member three ports)."""
    global _port_cursor
    low, high = _worker_slice()
    if _port_cursor is None or not low <= _port_cursor < high:
        _port_cursor = low + int.from_bytes(os.urandom(2), "big") % (high - low)
    for _ in range(high - low):
        port = _port_cursor
        _port_cursor = port + n if port + n < high - n else low
        if port + n <= high and all(port_free(port + i) for i in range(n)):
            return port
    raise RuntimeError(f"no {n} consecutive free ports in {low}..{high}")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    return free_port_run(1)


def free_port_pair() -> int:
    """A port P on 127.0.0.1 such that P and P+1 are both free right now (a broker binds its
    request port P and its event port P+1)."""
    return free_port_run(2)


def child_env() -> dict[str, str]:
    """This environment with the repo first on PYTHONPATH and SHAREDMEM_BROKER=embedded: a
    child must use the broker it is told about, never one from the caller's shell, and a handle
    with nothing configured must not depend on whether a broker listens on the default
    tcp://127.0.0.1:7400 of this machine."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["SHAREDMEM_BROKER"] = "embedded"
    return env


def terminate(proc: subprocess.Popen, timeout: float = 10.0) -> int:
    """SIGTERM our own child by PID, SIGKILL after ``timeout`` s; returns its exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


@dataclass
class BrokerProcess:
    """A ``python -m broker`` child process on a loopback port (and the next one for events)."""

    port: int
    extra_args: tuple[str, ...] = ()
    proc: subprocess.Popen[str] | None = None
    ready_line: str = ""

    @property
    def address(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    @property
    def epoch(self) -> str:
        return self.ready_line.split("epoch=")[1].split()[0]

    def start(self, timeout: float = 20.0) -> BrokerProcess:
        """Start it and wait (at most ``timeout`` s) for its ``ready`` line; raise
        RuntimeError with its stderr if it exits or stays silent."""
        # stderr goes to a file: an undrained pipe would block the broker once it fills up
        self.stderr_file = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "broker", "--bind", self.address, "--log-level", "WARNING",
             *self.extra_args],
            cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=self.stderr_file, text=True,
        )
        assert self.proc.stdout is not None
        # the broker prints its ready line in one write, so readline() returns once it is there
        readable = select.select([self.proc.stdout], [], [], timeout)[0]
        line = self.proc.stdout.readline() if readable else ""
        if "ready" not in line:
            self.proc.kill()
            self.proc.wait(10)
            self.stderr_file.seek(0)
            raise RuntimeError(f"broker did not start in {timeout}s: {line!r} "
                               f"{self.stderr_file.read()}")
        self.ready_line = line.strip()
        return self

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> int | None:
        """SIGTERM and wait; returns the exit code."""
        if self.proc is None:
            return None
        terminate(self.proc)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.stderr_file.close()
        return self.proc.returncode

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> BrokerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
