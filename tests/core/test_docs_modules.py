"""docs/architecture.md section 1 names every module (issue 13 item 6): each ``.py`` file of
``broker/`` and ``node/`` has a row in the "Pure core" or the "Shell" table, in one of them
only, and every module of the pure table is one that tests/core/test_layering.py imports with
the shells made unimportable, so the table cannot claim a module is pure when it is not."""

from __future__ import annotations

import re
from pathlib import Path

from tests.core.test_layering import KERNEL

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "architecture.md"
PACKAGES = ("broker", "node")
PURE = "### Pure core (no sockets, no threads; time is passed in as `now`)"
SHELL = "### Shell (ZeroMQ, files, threads)"


def table_modules(markdown: str, heading: str) -> set[str]:
    """The module paths named in the first cell of the table under ``heading``."""
    lines = markdown.splitlines()
    start = lines.index(heading)
    out: set[str] = set()
    in_table = False
    for line in lines[start + 1:]:
        if line.startswith("#"):
            break
        if line.startswith("|"):
            in_table = True
            first = line.split("|")[1]
            out |= set(re.findall(r"`((?:broker|node)/[\w/]+\.py)`", first))
        elif in_table:
            break  # the table ended
    return out


def module_name(path: str) -> str:
    name = path.removesuffix(".py").replace("/", ".")
    return name.removesuffix(".__init__")


def sections() -> tuple[set[str], set[str]]:
    text = DOC.read_text()
    return table_modules(text, PURE), table_modules(text, SHELL)


def test_every_module_has_one_row_in_the_module_tables() -> None:
    pure, shell = sections()
    on_disk = {str(p.relative_to(ROOT)) for pkg in PACKAGES for p in (ROOT / pkg).glob("*.py")}
    assert sorted(on_disk - pure - shell) == [], "modules missing from docs/architecture.md §1"
    assert sorted((pure | shell) - on_disk) == [], "rows for modules that do not exist"
    assert sorted(pure & shell) == [], "modules listed as both pure and shell"


def test_the_pure_table_lists_only_modules_the_layering_test_probes() -> None:
    pure, _ = sections()
    assert sorted(module_name(p) for p in pure if module_name(p) not in KERNEL) == []


def test_the_parser_sees_a_missing_row() -> None:
    """The check can fail: a table without a row misses that module."""
    text = DOC.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| `broker/ttl.py` |"))
    pure = table_modules(text.replace(row + "\n", ""), PURE)
    assert "broker/ttl.py" not in pure and "broker/state.py" in pure
