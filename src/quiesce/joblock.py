"""One run of a job at a time.

Two runs of one job (a timer and a hand-started run) would run each other's hooks and
writer locks and fight over the volumes, the stable mount paths and the repository. An
``flock`` in the state directory (never on a group volume) says "running"; the kernel
drops it when the process dies, so a crashed run leaves no stale lock behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from .errors import ExitCode, QuiesceError


class JobBusy(QuiesceError):
    exit_code = ExitCode.BUSY
    default_hint = "wait for it to finish (`quiesce status` shows what it holds frozen)"


@contextlib.contextmanager
def job_lock(state: Path, job: str, what: str = "run") -> Iterator[None]:
    """Hold ``<state>/locks/<what>-<job>.lock``; JobBusy names the holder's pid."""
    d = state / "locks"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(d / f"{what}-{job}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
            by = f" (pid {pid})" if pid.isdigit() else ""
            raise JobBusy(f"another {what} of job {job} is running{by}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


__all__ = ["JobBusy", "job_lock"]
