"""Every FIFREEZE and FITHAW on the machine, as the kernel sees them: who, on what, when.

The kernel records no owner for a freeze, but it can tell us about every freeze and thaw
*call*: the ``syscalls:sys_enter_ioctl`` tracepoint, filtered in the kernel to the two
commands, in a tracefs instance of quiesce's own (docs/kernel.md §11).
Each event carries the caller's thread id, the fd and a CLOCK_MONOTONIC timestamp
(``trace_clock = mono``, comparable with ``time.monotonic_ns()``). Which filesystem the
fd is on is read from ``/proc/TID/fdinfo/FD`` (``mnt_id``) and that task's mountinfo
while it lives; a caller that is gone already (``fsfreeze -u`` lives about a
millisecond) is *unattributed*, and the guardian then assumes the worst.

Kernels without tracefs or syscall tracepoints: :func:`open_trace` returns None and the
guardian relies on its probes alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import re
from dataclasses import dataclass

FIFREEZE = 0xC0045877
FITHAW = 0xC0045878
TRACEFS = "/sys/kernel/tracing"
_EVENT = "events/syscalls/sys_enter_ioctl"
_EXIT = "events/syscalls/sys_exit_ioctl"  # only EBUSY answers: a FIFREEZE that froze nothing
_EXIT_LINE = re.compile(
    r"-(?P<tid>\d+)\s+(?:\(\s*[-\d]+\)\s+)?\[\d+\]\s+\S+\s+(?P<ts>\d+\.\d+):\s+"
    r"sys_ioctl -> (?:0x)?(?P<ret>[0-9a-f]+)"
)
_LINE = re.compile(
    r"-(?P<tid>\d+)\s+(?:\(\s*[-\d]+\)\s+)?\[\d+\]\s+\S+\s+(?P<ts>\d+\.\d+):\s+"
    r"sys_ioctl\(fd: (?:0x)?(?P<fd>[0-9a-f]+), cmd: (?:0x)?(?P<cmd>[0-9a-f]+)"
)
MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8


@dataclass(frozen=True)
class FreezeCall:
    """One FIFREEZE or FITHAW call by someone other than the caller of :meth:`read`."""

    op: str  # "freeze" | "thaw" | "ebusy" (an ioctl of that thread answered EBUSY)
    tid: int
    ts_ns: int  # CLOCK_MONOTONIC of the call's entry
    dev: str | None  # major:minor of the filesystem, or None (the caller is gone)
    comm: str


def _ns(stamp: str) -> int:
    whole, frac = stamp.split(".")
    return int(whole) * 1_000_000_000 + int(frac.ljust(9, "0")[:9])


def _dev_of(tid: int, fd: int) -> str | None:
    """The superblock (major:minor) of ``fd`` in task ``tid``, while it lives."""
    try:
        with open(f"/proc/{tid}/fdinfo/{fd}") as f:
            m = re.search(r"^mnt_id:\s*(\d+)", f.read(), re.M)
        if m is None:
            return None
        with open(f"/proc/{tid}/mountinfo") as f:
            for line in f:
                parts = line.split(" ", 3)
                if parts[0] == m.group(1):
                    return parts[2]
    except OSError:
        return None
    return None


def _comm(tid: int) -> str:
    try:
        with open(f"/proc/{tid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


class FreezeTrace:
    """A tracefs instance that keeps only FIFREEZE/FITHAW calls. ``fileno()`` polls."""

    def __init__(self, root: str, name: str, own_tids: set[int]) -> None:
        self.inst = os.path.join(root, "instances", name)
        self.own = own_tids
        os.mkdir(self.inst)
        try:
            self._write("trace_clock", "mono")
            self._write("buffer_size_kb", "64")
            # Our own threads' calls are dropped in the kernel too (read() drops them
            # anyway): each would wake the reader inside our own window, and its parsing
            # would hold the interpreter while our next ioctl returns.
            mine = "".join(f" && common_pid != {t}" for t in sorted(own_tids) if t > 0)
            calls = f"cmd == {FIFREEZE:#x} || cmd == {FITHAW:#x}"
            try:
                self._write(f"{_EVENT}/filter", f"({calls}){mine}")
                self._write(f"{_EXIT}/filter", f"ret == -16{mine}")
            except OSError:  # a kernel that filters on no common field: read() drops them
                self._write(f"{_EVENT}/filter", calls)
                self._write(f"{_EXIT}/filter", "ret == -16")
            self._write(f"{_EVENT}/enable", "1")
            self._write(f"{_EXIT}/enable", "1")
            self.fd = os.open(os.path.join(self.inst, "trace_pipe"), os.O_RDONLY | os.O_NONBLOCK)
        except BaseException:
            self._remove()
            raise
        self._partial = b""

    def _write(self, rel: str, text: str) -> None:
        with open(os.path.join(self.inst, rel), "w") as f:
            f.write(text)

    def fileno(self) -> int:
        return self.fd

    def read(self) -> list[FreezeCall]:
        """Every call since the last read (never blocks), attributed where possible."""
        data = self._partial
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            data += chunk
        lines = data.split(b"\n")
        self._partial = lines.pop()
        out = []
        for raw in lines:
            text = raw.decode(errors="replace")
            m = _LINE.search(text)
            if m is None:
                e = _EXIT_LINE.search(text)
                if e is not None and int(e["tid"]) not in self.own:
                    out.append(FreezeCall("ebusy", int(e["tid"]), _ns(e["ts"]), None, ""))
                continue
            tid = int(m["tid"])
            if tid in self.own:
                continue
            cmd = int(m["cmd"], 16)
            op = "freeze" if cmd == FIFREEZE else "thaw" if cmd == FITHAW else ""
            if not op:
                continue
            ts = _ns(m["ts"])
            out.append(FreezeCall(op, tid, ts, _dev_of(tid, int(m["fd"], 16)), _comm(tid)))
        return out

    def _remove(self) -> None:
        for ev in (_EVENT, _EXIT):
            with contextlib.suppress(OSError):
                self._write(f"{ev}/enable", "0")
        with contextlib.suppress(OSError):
            os.rmdir(self.inst)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)
        self._remove()


def open_trace(name: str, own_tids: set[int]) -> FreezeTrace | None:
    """The trace, or None where the kernel offers none (no tracefs, no syscall events,
    no permission). ``own_tids`` (a live set: add threads later) are not reported.
    tracefs is mounted at its usual place if it is not there yet (as systemd does)."""
    if not os.path.isdir(os.path.join(TRACEFS, "instances")):
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
        if libc.mount(b"tracefs", TRACEFS.encode(), b"tracefs", flags, None) != 0:
            return None
    if not os.path.isdir(os.path.join(TRACEFS, _EVENT)):
        return None
    try:
        return FreezeTrace(TRACEFS, name, own_tids)
    except OSError:
        return None


def sweep_stale(alive: set[int]) -> None:
    """Remove instances of quiesce guardians that died without removing theirs (SIGKILL):
    ``quiesce-own-PID`` whose PID is not alive."""
    base = os.path.join(TRACEFS, "instances")
    if not os.path.isdir(base):
        return
    for name in os.listdir(base):
        m = re.fullmatch(r"quiesce-own-(\d+)", name)
        if m is None or int(m[1]) in alive or os.path.exists(f"/proc/{m[1]}"):
            continue
        inst = os.path.join(base, name)
        for ev in (_EVENT, _EXIT):
            with contextlib.suppress(OSError), open(os.path.join(inst, ev, "enable"), "w") as f:
                f.write("0")
        with contextlib.suppress(OSError):
            os.rmdir(inst)
