"""Lazy package exports (PEP 562): a package names its public API without importing it.

``import quiesce.backup.config`` must not import the whole backup phase, and the CLI
starts faster when a command imports only what it runs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: ``exports`` maps a public name to
    ``"module:attribute"``, or to ``"module"`` for a submodule (relative names start
    with '.'); the module is imported on the name's first use."""

    def __getattr__(name: str) -> Any:
        target = exports.get(name)
        if target is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module_name, _, attribute = target.partition(":")
        module = importlib.import_module(module_name, package)
        return getattr(module, attribute) if attribute else module

    return __getattr__


__all__ = ["lazy_exports"]
