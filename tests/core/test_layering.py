"""The layering, enforced: the pure kernel imports no socket shell, ``broker`` never imports
``node``, and no module reads another module's underscore names.

docs/architecture.md section 1: package ``__init__`` files import nothing heavy, so importing a
pure module never loads zmq; the node may import the broker's kernel, the broker never imports
the node.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# The modules with no sockets, no shell threads and no HTTP server (docs/architecture.md §1).
KERNEL = [
    "broker",
    "node",
    "broker.errors",
    "broker.protocol",
    "broker.validation",
    "broker.pattern",
    "broker.state",
    "broker.records",
    "broker.log",
    "broker.core",
    "broker.turn",
    "broker.ttl",
    "broker.freeze",
    "broker.lazy",
    "broker.group",
    "broker.replication",
    "node.config",
    "node.replica",
    "node.routing",
    "node.replies",
    "node.watch",
]

# Made unimportable while a kernel module is imported: the socket library, the HTTP server,
# and every shell module of ours (they run threads, sockets or files).
FORBIDDEN = [
    "zmq",
    "http.server",
    "socketserver",
    "broker.server",
    "broker.lifecycle",
    "broker.subscriptions",
    "broker.access",
    "broker.frames",
    "broker.zmtp",
    "broker.config",
    "broker.durable",
    "broker.recovery",
    "broker.metrics",
    "broker.security",
    "broker.__main__",
    "broker.group_shell",
    "broker.install",
    "node.node",
    "node.probe",
    "node.requests",
    "node.api",
    "node.embedded",
    "node.cli",
]

_PROBE = """
import importlib, importlib.abc, sys

FORBIDDEN = {forbidden!r}

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == f or name.startswith(f + ".") for f in FORBIDDEN):
            raise ImportError(f"layering: {{name}} may not be imported by the kernel")
        return None

sys.meta_path.insert(0, Refuse())
importlib.import_module({module!r})
loaded = sorted(m for m in sys.modules
                if any(m == f or m.startswith(f + ".") for f in FORBIDDEN))
assert not loaded, f"loaded anyway: {{loaded}}"
"""


@pytest.mark.parametrize("module", KERNEL)
def test_kernel_module_imports_without_sockets_or_shells(module: str) -> None:
    probe = _PROBE.format(forbidden=FORBIDDEN, module=module)
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0, f"{module} pulls in a shell module:\n{proc.stderr}"


def _imports(path: Path) -> list[str]:
    """Every module an ``import`` statement of ``path`` names (at any depth)."""
    out: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
    return out


def test_broker_never_imports_node() -> None:
    offenders = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in sorted((ROOT / "broker").rglob("*.py"))
        for name in _imports(path)
        if name == "node" or name.startswith("node.")
    ]
    assert offenders == []


def test_the_probe_catches_a_forbidden_import(tmp_path: Path) -> None:
    """The check above can fail: a kernel-like module that imports zmq is refused."""
    (tmp_path / "kernel_with_zmq.py").write_text("import zmq\n")
    probe = f"import sys; sys.path.insert(0, {str(tmp_path)!r})\n" + _PROBE.format(
        forbidden=FORBIDDEN, module="kernel_with_zmq")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode != 0
    assert "layering: zmq may not be imported by the kernel" in proc.stderr


# ---------------------------------------------------------------- no reads of others' underscores

SCANNED = ["broker", "node", "scripts"]

# Reads of another module's underscore names that remain, each with its reason. An entry is
# (file, name); the test fails if an entry is no longer needed, so the list only shrinks.
# Empty since issue 13: the admin calls (node/admin.py, SharedMemory.node, Node.pool) and
# node.config.to_seconds retired the last ones. Add an entry only with its reason.
ALLOWED: set[tuple[str, str]] = set()


def _defined_names(tree: ast.AST) -> set[str]:
    """Underscore names a module defines itself: functions, classes, module and class
    variables, attributes assigned on ``self``/``cls``, and imported aliases."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            out.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            out.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store | ast.Del):
            out.add(node.attr)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out.add(node.target.id)
        elif isinstance(node, ast.arg):
            out.add(node.arg)
    return out


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def reach_ins(path: Path) -> list[tuple[str, int]]:
    """``(name, line)`` of every underscore name ``path`` reads from another module: imported
    (``from m import _x``), or read as an attribute (``obj._x``) that the module itself never
    defines -- a module may read its own classes' private attributes, nothing else's."""
    tree = ast.parse(path.read_text(), str(path))
    own = _defined_names(tree)
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found += [(a.name, node.lineno) for a in node.names if _private(a.name)]
        elif isinstance(node, ast.Attribute) and _private(node.attr) and node.attr not in own:
            found.append((node.attr, node.lineno))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "hasattr", "setattr", "delattr")
              and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
              and isinstance(node.args[1].value, str) and _private(node.args[1].value)
              and node.args[1].value not in own):
            found.append((node.args[1].value, node.lineno))  # getattr(obj, "_x")
    return found


def test_no_module_reads_another_modules_underscore_names() -> None:
    hits = {
        (str(path.relative_to(ROOT)), name): line
        for package in SCANNED
        for path in sorted((ROOT / package).rglob("*.py"))
        for name, line in reach_ins(path)
    }
    unexpected = sorted(f"{f}:{line}: {name}" for (f, name), line in hits.items()
                        if (f, name) not in ALLOWED)
    assert unexpected == [], "reads of another module's underscore names:\n" + "\n".join(
        unexpected)
    stale = sorted(f"{f}: {name}" for f, name in ALLOWED if (f, name) not in hits)
    assert stale == [], "allow-list entries no longer needed (remove them): " + ", ".join(stale)


def test_the_reach_in_scan_can_fail(tmp_path: Path) -> None:
    (tmp_path / "m.py").write_text(
        "from broker.durable import _SEG_RE\n"
        "class A:\n    def __init__(self):\n        self._mine = 1\n"
        "def f(core, a: A):\n    return core.dedup._last, a._mine, core.__class__\n"
        "g = getattr(object(), '_pool', None)\n")
    assert sorted(reach_ins(tmp_path / "m.py")) == [("_SEG_RE", 1), ("_last", 6), ("_pool", 7)]


# ---------------------------------------------------------------- the loop file stays small

LOOP_FILE = ROOT / "broker" / "server.py"
LOOP_MAX_LINES = 300  # issue 13 item 5: config, access, subscriptions and lifecycle live apart


def test_the_broker_loop_file_is_under_300_lines() -> None:
    lines = len(LOOP_FILE.read_text().splitlines())
    assert lines < LOOP_MAX_LINES, (
        f"{LOOP_FILE.relative_to(ROOT)} has {lines} lines: move a job out of the loop "
        "(broker/config.py, access.py, subscriptions.py, lifecycle.py, frames.py)")


def test_the_old_import_path_of_the_broker_still_works() -> None:
    from broker.server import Broker, BrokerConfig, default_pub_endpoint

    assert Broker.__module__ == "broker.server"
    assert BrokerConfig.__module__ == "broker.config"
    assert default_pub_endpoint("tcp://127.0.0.1:7400") == "tcp://127.0.0.1:7401"


def test_a_protocol_error_is_not_a_storage_error() -> None:
    """Issue 13 item 7: ``except StorageError`` (a refusal) must not swallow garbled bytes."""
    from broker.errors import ProtocolError, SharedMemoryError, StorageError, error_from_kind

    assert not issubclass(ProtocolError, StorageError)
    assert issubclass(ProtocolError, SharedMemoryError)
    assert type(error_from_kind("ProtocolError", "garbled")) is ProtocolError
