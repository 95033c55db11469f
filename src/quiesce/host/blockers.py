"""Who keeps a freeze from completing: the processes that hold writes in flight (or
open for writing) on one filesystem, read from /proc.

FIFREEZE waits, uninterruptibly, until every write already inside the filesystem has
returned (``sb_wait_write``: ``percpu_down_write`` on the superblock's write level). The
kernel does not say who it waits for, so this looks from the other side: every fd of
every process (``/proc/PID/fd`` + ``fdinfo``: ``flags`` opened for writing, ``mnt_id``
mapped through *that process's* mountinfo to the superblock's ``major:minor``), every
shared writable mapping of the filesystem (``/proc/PID/maps``), and, per thread, the
system call it is in (``/proc/PID/task/TID/syscall``: a ``write``/``splice``/... whose
target fd is on the filesystem is a write *in flight*), its state (R, S, D) and what it
waits in (``wchan``, ``stack`` where readable). A thread in D in ``percpu_rwsem_wait``
is a writer *waiting for* the freeze, not one holding it.

:func:`end_blockers` is the opt-in policy (``[freeze] end_blockers_after``): end the
unprivileged processes whose write keeps a FIFREEZE waiting. SIGKILL ends a write that
sleeps interruptibly or killably (a ``splice`` from an empty pipe, a writer throttled in
``balance_dirty_pages``); one in uninterruptible sleep dies when its syscall returns.
Root's processes are never touched.
"""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

_PROC = Path("/proc")
# x86_64 system calls that hold the superblock's write level while they run, and which
# of their arguments is the fd written to. Elsewhere: fds and states only.
_WRITE_SYSCALLS_X86_64: dict[int, tuple[str, int]] = {
    1: ("write", 0),
    18: ("pwrite64", 0),
    20: ("writev", 0),
    40: ("sendfile", 0),
    76: ("truncate", -1),
    77: ("ftruncate", 0),
    275: ("splice", 2),
    278: ("vmsplice", -1),
    285: ("fallocate", 0),
    296: ("pwritev", 0),
    326: ("copy_file_range", 2),
    328: ("pwritev2", 0),
}
WRITE_SYSCALLS = _WRITE_SYSCALLS_X86_64 if platform.machine() == "x86_64" else {}
FREEZE_WAIT = "percpu_rwsem_wait"  # where a writer sleeps while the filesystem freezes


@dataclass(frozen=True)
class ThreadState:
    tid: int
    state: str  # R, S, D, ...
    wchan: str
    syscall: str | None  # "splice", "write", "#0" (another), None (running or unreadable)
    writes_fd: int | None  # the fd its write-class syscall writes to


@dataclass(frozen=True)
class Blocker:
    """One process with writes on the filesystem: what an admin needs to act."""

    pid: int
    uid: int  # the real uid; ``uids`` has real, effective, saved, fs
    uids: tuple[int, ...]
    comm: str
    cmdline: str
    state: str  # the process's (main thread's) state
    wchan: str
    files: tuple[str, ...]  # paths open for writing (or mapped shared-writable) on it
    in_flight: tuple[str, ...]  # "splice by tid 123 on /srv/x", ...
    d_threads: tuple[int, ...]  # threads in uninterruptible sleep
    waits_for_freeze: bool  # every D thread sleeps in percpu_rwsem_wait: a victim, not a cause
    stack: tuple[str, ...] = ()  # the main thread's kernel stack, when readable
    start_time: int = 0  # clock ticks after boot (a recycled pid is not this process)
    threads: tuple[ThreadState, ...] = field(default=(), repr=False)

    @property
    def holds_write(self) -> bool:
        """It is inside a write on the filesystem (or may be: no syscall information)."""
        return bool(self.in_flight) or (not WRITE_SYSCALLS and not self.waits_for_freeze)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("threads")
        d["holds_write"] = self.holds_write
        return d

    def describe(self) -> str:
        """One line: ``pid 123 (uid 65534) splice_holder [S pipe_wait]: splice on /x``."""
        what = "; ".join(self.in_flight) or ", ".join(self.files) or "-"
        ds = f", D threads {','.join(map(str, self.d_threads))}" if self.d_threads else ""
        return (
            f"pid {self.pid} (uid {self.uid}) {self.comm} [{self.state} {self.wchan or '-'}"
            f"{ds}]: {what}"
        )


def _read(path: Path) -> str | None:
    try:
        return path.read_bytes().decode(errors="replace")
    except OSError:
        return None


def _pids() -> Iterator[int]:
    for entry in os.scandir(_PROC):
        if entry.name.isdigit():
            yield int(entry.name)


class _Namespaces:
    """mnt_id -> major:minor, per mount namespace (read once per namespace)."""

    def __init__(self) -> None:
        self.by_ns: dict[str, dict[int, str]] = {}

    def dev_of(self, pid: int, mnt_id: int) -> str | None:
        try:
            ns = os.readlink(f"/proc/{pid}/ns/mnt")
        except OSError:
            return None
        table = self.by_ns.get(ns)
        if table is None:
            table = {}
            for line in (_read(_PROC / str(pid) / "mountinfo") or "").splitlines():
                parts = line.split()
                if len(parts) > 3:
                    with contextlib.suppress(ValueError):
                        table[int(parts[0])] = parts[2]
            self.by_ns[ns] = table
        return table.get(mnt_id)


def _fdinfo(pid: int, fd: str) -> tuple[int, int] | None:
    """(flags, mnt_id) of one fd."""
    text = _read(_PROC / str(pid) / "fdinfo" / fd)
    if text is None:
        return None
    flags = mnt = None
    for line in text.splitlines():
        if line.startswith("flags:"):
            flags = int(line.split()[1], 8)
        elif line.startswith("mnt_id:"):
            mnt = int(line.split()[1])
    return (flags, mnt) if flags is not None and mnt is not None else None


def _thread(pid: int, tid: int) -> ThreadState | None:
    base = _PROC / str(pid) / "task" / str(tid)
    stat = _read(base / "stat")
    if stat is None or ")" not in stat:
        return None
    state = stat[stat.rindex(")") + 2 :].split()[0]
    wchan = (_read(base / "wchan") or "").strip()
    if wchan == "0":
        wchan = ""
    syscall = writes = None
    raw = (_read(base / "syscall") or "").split()
    if raw and raw[0].lstrip("-").isdigit() and int(raw[0]) >= 0:
        nr = int(raw[0])
        name, arg = WRITE_SYSCALLS.get(nr, (f"#{nr}", -1))
        syscall = name
        if arg >= 0 and len(raw) > arg + 1:
            with contextlib.suppress(ValueError):
                writes = int(raw[arg + 1], 16)
    return ThreadState(tid, state, wchan, syscall, writes)


def _uids(pid: int) -> tuple[int, ...]:
    for line in (_read(_PROC / str(pid) / "status") or "").splitlines():
        if line.startswith("Uid:"):
            return tuple(int(x) for x in line.split()[1:])
    return ()


def _start_time(pid: int) -> int:
    stat = _read(_PROC / str(pid) / "stat") or ""
    try:
        return int(stat[stat.rindex(")") + 2 :].split()[19])
    except (ValueError, IndexError):
        return 0


def _shared_writable_maps(pid: int, dev: str) -> list[str]:
    """Files of ``dev`` mapped MAP_SHARED and writable (a store dirties them at any time)."""
    major, minor = (int(x) for x in dev.split(":"))
    want = f"{major:02x}:{minor:02x}"
    out = []
    for line in (_read(_PROC / str(pid) / "maps") or "").splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and "w" in parts[1] and "s" in parts[1] and parts[3] == want:
            out.append(parts[5])
    return out


def _blocker(pid: int, dev: str, spaces: _Namespaces) -> Blocker | None:
    fd_dir = _PROC / str(pid) / "fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return None
    ours: dict[int, str] = {}
    for fd in fds:
        info = _fdinfo(pid, fd)
        if info is None or info[0] & os.O_ACCMODE not in (os.O_WRONLY, os.O_RDWR):
            continue
        if spaces.dev_of(pid, info[1]) != dev:
            continue
        try:
            ours[int(fd)] = os.readlink(fd_dir / fd)
        except OSError:
            ours[int(fd)] = f"fd {fd}"
    maps = _shared_writable_maps(pid, dev)
    if not ours and not maps:
        return None
    threads = []
    with contextlib.suppress(OSError):
        for tid in sorted(int(t) for t in os.listdir(_PROC / str(pid) / "task")):
            t = _thread(pid, tid)
            if t is not None:
                threads.append(t)
    # a write that sleeps in percpu_rwsem_wait has not got in: it waits for the freeze
    in_flight = tuple(
        f"{t.syscall} by tid {t.tid} on {ours[t.writes_fd]}"
        for t in threads
        if t.writes_fd in ours and not (t.state == "D" and t.wchan == FREEZE_WAIT)
    )
    d_threads = tuple(t.tid for t in threads if t.state == "D")
    main = next((t for t in threads if t.tid == pid), None)
    uids = _uids(pid)
    cmdline = (_read(_PROC / str(pid) / "cmdline") or "").replace("\0", " ").strip()
    stack = tuple(
        line.split("] ", 1)[-1] for line in (_read(_PROC / str(pid) / "stack") or "").splitlines()
    )
    return Blocker(
        pid=pid,
        uid=uids[0] if uids else -1,
        uids=uids,
        comm=(_read(_PROC / str(pid) / "comm") or "?").strip(),
        cmdline=cmdline,
        state=main.state if main else "?",
        wchan=main.wchan if main else "",
        files=tuple(dict.fromkeys([*ours.values(), *maps])),
        in_flight=in_flight,
        d_threads=d_threads,
        waits_for_freeze=bool(d_threads)
        and all(t.wchan == FREEZE_WAIT for t in threads if t.state == "D")
        and not in_flight,
        stack=stack,
        start_time=_start_time(pid),
        threads=tuple(threads),
    )


def find_blockers(dev: str, *, exclude: set[int] | None = None) -> list[Blocker]:
    """Every process with writes open (or in flight) on the filesystem ``dev``
    (``major:minor`` of its superblock, as mountinfo shows it), in-flight writers first.
    ``exclude``: pids to leave out (quiesce's own)."""
    skip = {os.getpid(), *(exclude or set())}
    spaces = _Namespaces()
    found = []
    for pid in _pids():
        if pid in skip:
            continue
        b = _blocker(pid, dev, spaces)
        if b is not None:
            found.append(b)
    return sorted(found, key=lambda b: (not b.in_flight, b.waits_for_freeze, b.pid))


def _age_s(b: Blocker) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    try:
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError):
        return 0.0
    return uptime - b.start_time / ticks


def end_blockers(
    dev: str,
    *,
    older_than: float,
    log: Callable[[str], None],
    exclude: set[int] | None = None,
) -> list[Blocker]:
    """SIGKILL the unprivileged processes (no uid 0 among real, effective, saved, fs)
    whose write on ``dev`` keeps a FIFREEZE waiting, logging each with pid, uid and
    command; returns them. ``older_than``: how long the FIFREEZE has waited (seconds): a
    process younger than that cannot hold it (a write that starts once the freeze began
    waits for it instead) and is spared. Writers that only wait for the freeze, and every
    process of root's, are left alone. The signal goes through a pidfd opened after the
    process's start time was checked, so a recycled pid is never hit."""
    ended = []
    for b in find_blockers(dev, exclude=exclude):
        if not b.holds_write or not b.uids or 0 in b.uids:
            continue
        if _age_s(b) < older_than:
            continue
        try:
            pidfd = os.pidfd_open(b.pid)
        except OSError:
            continue  # gone
        try:
            if _start_time(b.pid) != b.start_time:
                continue  # the pid was recycled
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except OSError:
            continue
        finally:
            os.close(pidfd)
        log(
            f"ended pid {b.pid} (uid {b.uid}, {b.comm}): its write kept the freeze of {dev} "
            f"waiting for over {older_than:.1f} s ({'; '.join(b.in_flight) or 'writing'})"
        )
        ended.append(b)
    return ended


def wait_gone(pids: list[int], timeout: float) -> bool:
    """Whether every pid has exited (or is a zombie) within ``timeout``."""
    end = time.monotonic() + timeout
    while True:
        alive = []
        for pid in pids:
            stat = _read(_PROC / str(pid) / "stat")
            if stat is not None and stat[stat.rindex(")") + 2 :].split()[0] not in ("Z", "X"):
                alive.append(pid)
        if not alive:
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(0.01)


__all__ = [
    "FREEZE_WAIT",
    "WRITE_SYSCALLS",
    "Blocker",
    "ThreadState",
    "end_blockers",
    "find_blockers",
    "wait_gone",
]
