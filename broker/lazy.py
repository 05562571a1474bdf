"""The lazy ``__getattr__`` of the ``broker`` and ``node`` packages: a public name whose module
is heavy (zmq, threads, http.server) is imported on its first use, so importing a package --
and through it a pure module -- loads nothing heavy (tests/core/test_layering.py). Pure.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_getattr(namespace: dict[str, Any], package: str,
                 table: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that imports ``table[name]`` on first use of ``name``, stores
    the value in the package's ``namespace`` (later uses are plain lookups) and returns it."""

    def __getattr__(name: str) -> Any:
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    return __getattr__
