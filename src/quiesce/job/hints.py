"""Hints in the job file's syntax: inside a job, the command line's flags mean nothing.

Providers, the freezer and the guardian give hints for the command line (``--option
dest=DIR``, ``raise --timeout``); a job run and ``quiesce check`` show them in the
job's own terms (``dest = "DIR"``, ``timeouts.freeze``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

Rewrite = tuple[re.Pattern[str], str | Callable[[re.Match[str]], str]]

# In order: the specific spellings before the general ones.
_REWRITES: list[Rewrite] = [
    (re.compile(r"--allow-self \(allow_self=True\)"), "allow_self = true"),
    (re.compile(r"--allow-self\b"), "allow_self = true"),
    (re.compile(r"--option KEY=VALUE"), "the [provider] table's keys"),
    (  # --option dest=DIR -> dest = "DIR" (in [provider])
        re.compile(r"--option (\w+)=('[^']*'|[^\s),;]+)"),
        lambda m: f"{m[1]} = {json.dumps(m[2].strip(chr(39)))}",
    ),
    (re.compile(r"--option (\w+)\b"), lambda m: f"provider.{m[1]}"),
    (re.compile(r"--timeout\b"), "timeouts.freeze"),
    (re.compile(r"--lease\b"), "timeouts.lease"),
]


def job_hint(hint: str) -> str:
    """``hint`` in the job's syntax: ``--option dest=DIR`` -> ``dest = "DIR"``,
    ``--option timeout`` -> ``provider.timeout``, ``--timeout`` -> ``timeouts.freeze``."""
    for pattern, replacement in _REWRITES:
        hint = pattern.sub(replacement, hint)
    return hint


# the commands that read a state directory (they take --job JOB.toml for its state_dir)
_STATE_COMMANDS = re.compile(
    r"`quiesce (status|cleanup|snapshot (?:list|mount|umount|delete))((?:(?!--job)[^`])*)`"
)


def with_job(text: str, job_file: str | None) -> str:
    """``text`` with ``--job JOB.toml`` added to each command that reads the state
    directory (`quiesce status`, `cleanup`, `snapshot list/mount/umount/delete`): for a job
    with its own ``state_dir``, the default directory is the wrong one."""
    if not job_file:
        return text
    return _STATE_COMMANDS.sub(lambda m: f"`quiesce {m[1]}{m[2]} --job {job_file}`", text)


__all__ = ["job_hint", "with_job"]
