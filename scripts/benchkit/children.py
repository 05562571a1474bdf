"""The processes a run starts (servers, workers), stopped by PID when done or at exit, and a
line reader with a timeout over their stdout (a hung child fails the run instead of hanging
it). Starting the broker, free ports, the child environment and terminate() come from
tests/processes.py, shared with the tests."""

from __future__ import annotations

import atexit
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.processes import ROOT, BrokerProcess, child_env, free_port_pair, terminate

BENCH = Path(__file__).resolve().parent.parent / "bench.py"  # workers are `bench.py --worker`

_children: list[subprocess.Popen] = []


def spawn(argv: list[str], *, stdin: Any = subprocess.DEVNULL, stdout: Any = subprocess.DEVNULL
          ) -> subprocess.Popen:
    """Start a process of ours; ``stop`` (or exit) ends it by PID."""
    p = subprocess.Popen(argv, cwd=ROOT, env=child_env(), stdin=stdin, stdout=stdout,
                         stderr=subprocess.DEVNULL)
    _children.append(p)
    return p


def stop(p: subprocess.Popen, timeout: float = 30.0) -> None:
    terminate(p, timeout)
    for f in (p.stdin, p.stdout):
        if f is not None:
            try:
                f.close()
            except OSError:
                pass
    if p in _children:
        _children.remove(p)


def stop_all() -> None:
    for p in list(_children):
        stop(p, 5.0)


atexit.register(stop_all)


@contextmanager
def broker(*args: str) -> Iterator[BrokerProcess]:
    """``python -m broker`` on a free loopback port pair, stopped at exit too."""
    b = BrokerProcess(free_port_pair(), args).start(120)
    assert b.proc is not None
    _children.append(b.proc)
    try:
        yield b
    finally:
        b.stop()
        if b.proc in _children:
            _children.remove(b.proc)


class Lines:
    """Line reader over a child's stdout pipe, with a timeout."""

    def __init__(self, p: subprocess.Popen) -> None:
        assert p.stdout is not None
        self.p = p
        self.fd = p.stdout.fileno()
        self.buf = b""

    def readline(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"process {self.p.pid} ({self.p.args[-3:]}) said nothing "
                                   f"in {timeout:.0f}s")
            if select.select([self.fd], [], [], remaining)[0]:
                chunk = os.read(self.fd, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"process {self.p.pid} ({self.p.args[-3:]}) exited "
                                       f"with {self.p.wait()}")
                self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode()

    def expect(self, word: str, timeout: float) -> None:
        line = self.readline(timeout)
        if line.strip() != word:
            raise RuntimeError(f"process {self.p.pid}: expected {word!r}, got {line!r}")


def worker(mode: str, *args: object) -> tuple[subprocess.Popen, Lines]:
    """A ``bench.py --worker MODE ...`` child (see benchkit/worker.py) and its stdout."""
    p = spawn([sys.executable, str(BENCH), "--worker", mode, *map(str, args)],
              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    return p, Lines(p)


def go(p: subprocess.Popen) -> None:
    assert p.stdin is not None
    p.stdin.write(b"go\n")
    p.stdin.flush()
