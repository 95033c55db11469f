"""Whether quiesce, running as root, may run a hook: like sudo and cron, the code it runs
must be root's and writable by nobody else, and so must every directory above it (else
its owner could swap the file after the check). The check is :mod:`quiesce.host.trust`'s,
made through the opened file and each parent's fd."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from quiesce.host.trust import trust_problem

INTERPRETERS = frozenset({"sh", "bash", "dash", "python3", "python", "perl", "ruby", "env"})


def resolve_executable(argv0: str) -> Path | None:
    """The file that ``argv0`` names (PATH lookup for bare names), or None."""
    if "/" in argv0:
        p = Path(argv0)
        return p if p.exists() else None
    found = shutil.which(argv0)
    return Path(found) if found else None


def permission_problem(path: Path) -> str | None:
    """Why quiesce (running as root) must not trust ``path``, or None if it may.

    Like sudo and cron: the file (or directory) and every directory above it must be
    owned by root and writable by nobody else (a root-owned sticky parent such as /tmp
    passes), otherwise another user runs code as root at the next run.
    """
    return trust_problem(path, follow=True)


def executable_problem(argv: Sequence[str]) -> str | None:
    """Why ``argv`` cannot be run safely: missing, not executable, or unsafe permissions."""
    if not argv or not argv[0]:
        return "the command is empty"
    exe = resolve_executable(argv[0])
    if exe is None:
        where = "" if "/" in argv[0] else " on PATH"
        return f"{argv[0]} does not exist{where}"
    if not exe.is_file():
        return f"{exe} is not a regular file"
    if not os.access(exe, os.X_OK):
        return f"{exe} is not executable"
    problem = permission_problem(exe)
    if problem:
        return problem
    # ["/bin/sh", "/etc/quiesce/pre.sh"]: the script is the code that runs as root.
    interpreter = (
        exe.name.rstrip("0123456789.") in INTERPRETERS or Path(argv[0]).name in INTERPRETERS
    )
    if interpreter and len(argv) > 1 and argv[1].startswith("/"):
        script = Path(argv[1])
        if script.is_file():
            return permission_problem(script)
    return None


__all__ = ["INTERPRETERS", "executable_problem", "permission_problem", "resolve_executable"]
