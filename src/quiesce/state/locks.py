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
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from quiesce.errors import JobBusy
from quiesce.state.statedir import checked_subdir, open_state_file


@contextlib.contextmanager
def job_lock(state: Path, job: str, what: str = "run") -> Iterator[None]:
    """Hold ``<state>/locks/<what>-<job>.lock``; JobBusy names the holder's pid.

    The state directory is checked first, and the lock file is opened with O_NOFOLLOW
    and checked through its fd (UntrustedState, exit 2): a link planted there would
    make root truncate the file it points to."""
    d = checked_subdir(state, "locks", create=True)
    fd = open_state_file(d / f"{what}-{job}.lock", os.O_RDWR | os.O_CREAT, 0o600)
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


@dataclass(frozen=True)
class Running:
    what: str  # "run" or "backup"
    job: str
    pid: int
    since: float  # unix time the lock was taken


def running(state: Path | None) -> list[Running]:
    """The locks held in ``<state>/locks`` now: what (run, backup), job, pid, since when.
    Read from /proc/locks, so looking never takes a lock a starting run would miss.
    The state directory is checked first (UntrustedState, exit 2), like ``cleanup`` does:
    a lock that another user could have made there says nothing about quiesce."""
    locks = checked_subdir(state, "locks")
    held: dict[int, list[tuple[int, int, int]]] = {}  # inode -> (major, minor, pid)
    try:
        with open("/proc/locks") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and parts[1] == "FLOCK" and parts[4].isdigit():
                    major, minor, inode = parts[5].split(":")
                    held.setdefault(int(inode), []).append(
                        (int(major, 16), int(minor, 16), int(parts[4]))
                    )
    except (OSError, ValueError):
        return []
    out: list[Running] = []
    for lock in sorted(locks.glob("*-*.lock")) if locks.is_dir() else []:
        try:
            st = lock.lstat()
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
            continue  # not a lock quiesce made
        holders = held.get(st.st_ino, [])
        # /proc/locks names the superblock's device; btrfs's stat() a subvolume's: then
        # the inode alone decides, if only one lock has it
        same = [
            p for ma, mi, p in holders if (ma, mi) == (os.major(st.st_dev), os.minor(st.st_dev))
        ]
        pid = same[0] if same else holders[0][2] if len(holders) == 1 else None
        if pid is not None:
            what, _, job = lock.stem.partition("-")
            out.append(Running(what, job, pid, st.st_mtime))
    return out


__all__ = ["JobBusy", "Running", "job_lock", "running"]
