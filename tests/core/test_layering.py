"""The layering, enforced: the pure kernel imports no socket shell, ``broker`` never imports
``node``, and no module reads another module's underscore names.

STYLE.md section 8: package ``__init__`` files import nothing heavy, so importing a pure module
never loads zmq; the node may import the broker's kernel, the broker never imports the node.
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
    "broker.errors",
    "broker.protocol",
    "broker.validation",
    "broker.pattern",
    "broker.state",
    "broker.records",
    "broker.log",
    "broker.core",
    "broker.turn",
    "node.replica",
    "node.watch",
]

# Made unimportable while a kernel module is imported: the socket library, the HTTP server,
# and every shell module of ours (they run threads, sockets or files).
FORBIDDEN = [
    "zmq",
    "http.server",
    "socketserver",
    "broker.server",
    "broker.durable",
    "broker.recovery",
    "broker.metrics",
    "broker.security",
    "broker.__main__",
    "node.node",
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
