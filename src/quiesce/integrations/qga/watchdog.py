"""The guest's watchdog for a freeze that qemu-guest-agent is about to make.

qemu-ga runs its fsfreeze hook with ``freeze`` *before* its own FIFREEZE loop and waits for
the hook to exit; it runs the hook with ``thaw`` *after* its FITHAW loop. It never thaws
by itself. So the hook's ``freeze`` forks this watchdog, which outlives the hook:

1. it runs the guest's quiescers (hooks, the stock hook directory, writers; each with
   its own deadline) and keeps them held (a database session stays open);
2. it opens every filesystem the agent may freeze (the agent's own rule: block-backed
   mounts) and, with ``probe``, finds those already frozen: FIFREEZE answering EBUSY
   means someone froze it before the hook ran, and it is never thawed by us; FIFREEZE
   answering 0 was our own freeze (also a flush), thawed at once;
3. it answers the hook ("ready", or the failure: the hook exits non-zero and the agent
   does not freeze), and waits on a root-only socket for the hook's ``thaw``.

**Ownership handoff.** Between the hook's ``freeze`` and its ``thaw`` the filesystems are
frozen by the agent, not by quiesce; the agent hands quiesce the duty to end that freeze
if it cannot: past the deadline, when the agent process dies (its pidfd), or when it has
been stopped longer than the lease, the watchdog FITHAWs (once each, never "until it
fails") the candidates that were not frozen before the hook ran, releases the
applications, and says so in the kernel log (and so the journal) and in its record. A
freeze that another holder takes between the probe and the agent's FIFREEZE, or between
the agent's FITHAW and the thaw hook, cannot be told apart from the agent's (the kernel
records no owner; see docs/vm.md).

Inside the window nothing here writes to a disk: the socket, the pid file and the record
live in ``/run`` (tmpfs), the log goes to /dev/kmsg, and every module is imported before
the watchdog answers "ready".
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import socket
import struct
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from quiesce.apps.hooks.context import HookContext
from quiesce.errors import ExitCode, QuiesceError
from quiesce.host import kernel
from quiesce.host.files import write_atomic
from quiesce.host.mounts import read_mountinfo
from quiesce.host.trust import make_private_dirs
from quiesce.integrations.qga.config import GuestJob
from quiesce.integrations.qga.paths import PIDFILE, RECORD, SOCKET
from quiesce.job.build import build_quiescers, build_writers

TICK = 0.1  # how often the lease (agent stopped?) is looked at
HOOK_EXIT_WAIT = 300.0  # the hook exits right after "ready"; then the agent freezes


def boottime() -> float:
    """CLOCK_BOOTTIME: the clock of /proc/<pid>/stat start times (the thaw hook's)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


@dataclass
class Candidate:
    """One filesystem the agent may freeze, opened before it does."""

    mount_point: str
    dev: str
    fstype: str
    fd: int
    before: str = "unknown"  # unfrozen | frozen-before | unsupported | unknown
    after: str = ""  # what the watchdog's thaw found: thawed | not-frozen | error


def kmsg(text: str) -> None:
    """One line in the kernel log (and so the journal): never a file on a frozen disk."""
    try:
        fd = os.open("/dev/kmsg", os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.write(fd, f"<5>quiesce-qga: {text}\n".encode())
    except OSError:
        pass
    finally:
        os.close(fd)


def candidates(only: list[str] | None = None) -> list[Candidate]:
    """Block-backed filesystems, one per superblock, in mountinfo order (outer first: the
    order the agent thaws in; an inner fs thawed under a frozen outer one can hang)."""
    out: list[Candidate] = []
    seen: set[str] = set()
    for m in read_mountinfo():
        major = int(m.dev.split(":")[0])
        if m.dev in seen or m.fstype == "rootfs" or (major == 0 and m.fstype != "btrfs"):
            continue
        if only and m.mount_point not in only:
            continue
        try:
            fd = kernel.open_dir(m.mount_point)
        except OSError:
            continue
        seen.add(m.dev)
        out.append(Candidate(m.mount_point, m.dev, m.fstype, fd))
    return out


def probe(cands: list[Candidate]) -> None:
    """Flush each candidate and find those frozen before the hook ran (EBUSY)."""
    for c in cands:
        with contextlib.suppress(OSError):
            kernel.syncfs(c.fd)
        code = kernel.freeze_errno(c.fd)
        if code == 0:
            kernel.thaw_errno(c.fd)  # our own freeze of a moment ago
            c.before = "unfrozen"
        elif code == errno.EBUSY:
            c.before = "frozen-before"
        else:
            c.before = "unsupported"


def _agent_stopped(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] in (b"T", b"t")


@dataclass
class Record:
    """What the watchdog did for one freeze: the thaw hook prints it, the host reads it."""

    event: str  # thaw | watchdog | failed
    thawed_by: str = ""  # agent | guest-watchdog
    reason: str = ""
    job: str = ""
    guest_window_s: float | None = None
    frozen_at: float | None = None  # unix time the hook answered "ready"
    thawed_at: float | None = None
    deadline_s: float = 0.0
    lease_s: float = 0.0
    volumes: list[dict[str, str]] = field(default_factory=list)
    quiescers: list[dict[str, Any]] = field(default_factory=list)
    not_ok: list[str] = field(default_factory=list)  # hooks failed, timed out or skipped
    error: str = ""


class Watchdog:
    """The forked process: quiesce, answer, then wait for thaw or expiry."""

    def __init__(self, gj: GuestJob, agent_pid: int, answer_fd: int) -> None:
        self.gj, self.agent_pid, self.answer_fd = gj, agent_pid, answer_fd
        self.run_dir = Path(gj.guest.run_dir)
        cfg = gj.job.config
        self.ctx = HookContext(
            job=gj.job.name, on_hook_failure=cfg.on_hook_failure,
            default_timeout=cfg.timeouts.hook,
        )  # fmt: skip
        self.quiescers: list[Any] = []
        self.held: list[Any] = []
        self.cands: list[Candidate] = []
        self.listener: socket.socket | None = None
        try:  # our parent is the hook: the agent freezes once it has exited
            self.hook_pidfd = os.pidfd_open(os.getppid())
        except OSError:
            self.hook_pidfd = -1

    # -- before the agent's freeze ---------------------------------------------------------

    def _answer(self, obj: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):
            os.write(self.answer_fd, json.dumps(obj).encode() + b"\n")
            os.close(self.answer_fd)

    def _record(self, rec: Record) -> None:
        rec.job = self.gj.job.name
        rec.deadline_s, rec.lease_s = self.gj.guest.deadline, self.gj.guest.lease
        rec.volumes = [
            {"mount_point": c.mount_point, "dev": c.dev, "before": c.before, "after": c.after}
            for c in self.cands
        ]
        rec.quiescers = [r.to_dict() for r in self.ctx.results]
        rec.not_ok = [r.describe() for r in self.ctx.results if r.status != "ok"]
        with contextlib.suppress(OSError):
            write_atomic(self.run_dir / RECORD, json.dumps(asdict(rec), indent=1).encode())

    def _release(self, ok: bool) -> None:
        while self.held:
            q = self.held.pop()
            try:
                q.after_thaw(ok)
            except Exception as e:
                kmsg(f"releasing {type(q).__name__} failed: {e}")

    def prepare(self) -> int:
        """Quiesce and arm; returns the hook's exit code (0: let the agent freeze)."""
        make_private_dirs(self.run_dir)
        for name in (SOCKET, PIDFILE, RECORD):
            with contextlib.suppress(FileNotFoundError):
                (self.run_dir / name).unlink()
        try:
            writers = build_writers(self.gj.job.config)
            self.quiescers = build_quiescers(self.gj.job, self.ctx, writers=writers)
            for q in self.quiescers:
                self.held.append(q)
                q.before_freeze()
        except QuiesceError as e:
            self._release(False)
            msg = f"a guest quiescer failed, the agent will not freeze: {e.message}"
            rec = Record(event="failed", error=msg)
            self._record(rec)
            kmsg(msg + (f" ({'; '.join(rec.not_ok)})" if rec.not_ok else ""))
            self._answer({"ok": False, "message": msg, "not_ok": rec.not_ok})
            return e.exit_code or ExitCode.HOOK
        self.cands = candidates(self.gj.guest.mounts)
        if self.gj.guest.probe:
            probe(self.cands)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            self.listener.bind(str(self.run_dir / SOCKET))
        finally:
            os.umask(old)
        self.listener.listen(4)
        write_atomic(self.run_dir / PIDFILE, f"{os.getpid()}\n".encode())
        foreign = [c.mount_point for c in self.cands if c.before == "frozen-before"]
        if foreign:
            kmsg(f"frozen before the hook ran, never thawed by quiesce: {', '.join(foreign)}")
        return 0

    # -- the window ------------------------------------------------------------------------

    def serve(self) -> int:
        """Answer "ready" and wait for the thaw hook, the deadline, or a lapsed lease."""
        assert self.listener is not None
        try:
            pidfd = os.pidfd_open(self.agent_pid)
        except OSError:
            pidfd = -1
        self._answer({"ok": True, "pid": os.getpid(), "deadline_s": self.gj.guest.deadline})
        # The window (and the deadline) starts when the hook has exited: the agent runs
        # its FIFREEZE loop right after (on a slow guest the hook's exit alone can take
        # seconds, and a deadline counted from "ready" could pass before the freeze).
        if self.hook_pidfd >= 0:
            select.select([self.hook_pidfd], [], [], HOOK_EXIT_WAIT)
            os.close(self.hook_pidfd)
        frozen_at, t0 = time.time(), boottime()
        deadline = t0 + self.gj.guest.deadline
        lease = self.gj.guest.lease
        stopped_since: float | None = None
        reason = ""
        while True:
            now = boottime()
            if now >= deadline:
                reason = f"deadline of {self.gj.guest.deadline:g}s passed without a thaw"
                break
            fds = [self.listener] + ([pidfd] if pidfd >= 0 else [])
            ready, _, _ = select.select(fds, [], [], min(TICK, deadline - now))
            if pidfd >= 0 and pidfd in ready:
                reason = f"the guest agent (pid {self.agent_pid}) died inside the window"
                break
            if self.listener in ready:
                conn, _ = self.listener.accept()
                if self._thaw_request(conn, frozen_at, t0):
                    return 0
            if lease > 0 and _agent_stopped(self.agent_pid):
                stopped_since = stopped_since or boottime()
                if boottime() - stopped_since >= lease:
                    reason = f"the guest agent (pid {self.agent_pid}) was stopped for {lease:g}s"
                    break
            else:
                stopped_since = None
        return self._expire(reason, frozen_at, t0)

    def _thaw_request(self, conn: socket.socket, frozen_at: float, t0: float) -> bool:
        with conn:
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            _, uid, _ = struct.unpack("3i", creds)
            conn.settimeout(5)
            try:
                word = conn.recv(64).strip()
            except OSError:
                return False
            if uid != 0 or not word.startswith(b"thaw"):
                return False
            # The thaw hook's start (its /proc start time, sent with the request) is the
            # agent's FITHAW's end, to the clock tick: its interpreter's start-up is not
            # part of the window.
            window = boottime() - t0
            with contextlib.suppress(ValueError, IndexError):
                started = float(word.split()[1])
                if t0 < started < t0 + window:
                    window = started - t0
            self._release(True)
            rec = Record(
                event="thaw", thawed_by="agent", guest_window_s=round(window, 6),
                frozen_at=frozen_at, thawed_at=time.time(),
            )  # fmt: skip
            self._record(rec)
            with contextlib.suppress(OSError):
                conn.sendall(json.dumps(asdict(rec)).encode() + b"\n")
        self._cleanup()
        return True

    def _expire(self, reason: str, frozen_at: float, t0: float) -> int:
        """Thaw what the agent froze (never what was frozen before the hook), release."""
        thawed = []
        for c in self.cands:
            if c.before not in ("unfrozen", "unknown"):
                continue
            code = kernel.thaw_errno(c.fd)
            c.after = "thawed" if code == 0 else ("not-frozen" if code == errno.EINVAL else "error")
            if code == 0:
                thawed.append(c.mount_point)
        window = boottime() - t0
        if not thawed:
            return self._late(reason, frozen_at, t0)
        kmsg(
            f"{reason}: quiesce thawed {', '.join(thawed)} after {window:.1f}s; "
            "the host's snapshot of this freeze is not consistent"
        )
        self._release(False)
        self._record(
            Record(
                event="watchdog", thawed_by="guest-watchdog", reason=reason,
                guest_window_s=round(window, 6), frozen_at=frozen_at, thawed_at=time.time(),
            )
        )  # fmt: skip
        self._cleanup()
        return ExitCode.EXPIRED

    def _late(self, reason: str, frozen_at: float, t0: float) -> int:
        """Nothing was frozen at the deadline: the agent already thawed and its thaw hook
        is late (a slow interpreter start), or it never froze. Release the applications
        now (the promise), then wait one more deadline for the thaw hook to record the
        window; without it, the record says nobody needed to thaw."""
        assert self.listener is not None
        kmsg(f"{reason}, but nothing was frozen any more: applications released")
        self._release(False)
        self._record(
            Record(event="watchdog", thawed_by="", reason=reason + "; nothing was frozen",
                   frozen_at=frozen_at, thawed_at=time.time())
        )  # fmt: skip
        end = boottime() + self.gj.guest.deadline
        while (left := end - boottime()) > 0:
            ready, _, _ = select.select([self.listener], [], [], left)
            if ready:
                conn, _ = self.listener.accept()
                if self._thaw_request(conn, frozen_at, t0):
                    return 0
        self._cleanup()
        return ExitCode.EXPIRED

    def _cleanup(self) -> None:
        if self.listener is not None:
            self.listener.close()
        for name in (SOCKET, PIDFILE):
            with contextlib.suppress(FileNotFoundError):
                (self.run_dir / name).unlink()
        for c in self.cands:
            with contextlib.suppress(OSError):
                os.close(c.fd)


__all__ = ["PIDFILE", "RECORD", "SOCKET", "Candidate", "Record", "Watchdog", "kmsg"]
