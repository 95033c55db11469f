"""Application hooks, the public module: ``from quiesce.hooks import held``.

Hook quiescers run programs around the freeze window: pre-freeze and post-thaw commands
(:class:`PreFreezeCommands`, :class:`PostThawCommands`), a hook directory
(:class:`HookDirectory`) and session hooks that hold a lock across it
(:class:`SessionHook`), sharing one :class:`HookContext` (failure policy, time budget).
:func:`held` quiesces any quiescers around your own snapshot step. The implementation
lives in :mod:`quiesce.apps.hooks`; names are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from quiesce.errors import HookFailed, RunTimeout
from quiesce.util.lazy import lazy_exports

if TYPE_CHECKING:
    from quiesce.apps.hooks.commands import (
        HookDirectory,
        HookSpec,
        PostThawCommands,
        PreFreezeCommands,
    )
    from quiesce.apps.hooks.context import HookContext
    from quiesce.apps.hooks.results import HookResult
    from quiesce.apps.hooks.session import SessionHook, SessionSpec
    from quiesce.snapshot.quiescers import Quiescer, held

__getattr__ = lazy_exports(
    __name__,
    {
        "HookContext": "quiesce.apps.hooks.context:HookContext",
        "HookDirectory": "quiesce.apps.hooks.commands:HookDirectory",
        "HookResult": "quiesce.apps.hooks.results:HookResult",
        "HookSpec": "quiesce.apps.hooks.commands:HookSpec",
        "PostThawCommands": "quiesce.apps.hooks.commands:PostThawCommands",
        "PreFreezeCommands": "quiesce.apps.hooks.commands:PreFreezeCommands",
        "Quiescer": "quiesce.snapshot.quiescers:Quiescer",
        "SessionHook": "quiesce.apps.hooks.session:SessionHook",
        "SessionSpec": "quiesce.apps.hooks.session:SessionSpec",
        "held": "quiesce.snapshot.quiescers:held",
    },
)

__all__ = [
    "HookContext",
    "HookDirectory",
    "HookFailed",
    "HookResult",
    "HookSpec",
    "PostThawCommands",
    "PreFreezeCommands",
    "Quiescer",
    "RunTimeout",
    "SessionHook",
    "SessionSpec",
    "held",
]


def __dir__() -> list[str]:
    return sorted(set(__all__) | set(globals()))
