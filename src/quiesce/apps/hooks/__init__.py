"""Application hooks around the freeze window: commands, a hook directory, session hooks.

- :mod:`.results`: what a step did (one report row each) and the errors of a failed one;
- :mod:`.trust`: whether root may run a hook's program (owned and writable only by root);
- :mod:`.context`: the policy shared by a run's hooks and writers (failures, time budget);
- :mod:`.commands`: pre-freeze and post-thaw commands, the hook directory;
- :mod:`.session`: session hooks that hold a lock across the window.

They are quiescers (:class:`~quiesce.snapshot.quiescers.Quiescer`): ``quiesce.snapshot.create``
drives them around its window, :func:`held` around yours.
"""

from quiesce.apps.hooks.commands import (
    KILL_GRACE,
    HookDirectory,
    HookSpec,
    PostThawCommands,
    PreFreezeCommands,
    hook_dir_scripts,
    run_command,
)
from quiesce.apps.hooks.context import HookContext
from quiesce.apps.hooks.results import HookResult, StepTimer
from quiesce.apps.hooks.session import SessionHook, SessionSpec
from quiesce.apps.hooks.trust import (
    INTERPRETERS,
    executable_problem,
    permission_problem,
    resolve_executable,
)
from quiesce.errors import HookFailed, RunTimeout
from quiesce.snapshot.quiescers import Quiescer, held

__all__ = [
    "INTERPRETERS",
    "KILL_GRACE",
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
    "StepTimer",
    "executable_problem",
    "held",
    "hook_dir_scripts",
    "permission_problem",
    "resolve_executable",
    "run_command",
]
