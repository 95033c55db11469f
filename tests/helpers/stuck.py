"""A freeze stuck in FIFREEZE, made for real: a splice holder (uid 65534 by default)
keeps a write in flight on a test filesystem, and a FIFREEZE from a separate process
waits for it in the kernel. The test itself never blocks: it watches /proc."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

from conftest import is_frozen as probe_frozen  # noqa: F401  (re-exported: the one probe)

HELPERS = Path(__file__).parent
FIFREEZE, FITHAW = 0xC0045877, 0xC0045878
IOCTL, SPLICE = 16, 275  # x86_64 system call numbers, as /proc/PID/syscall shows them


def nobody(uid: int = 65534) -> list[str]:
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]


def syscall_of(pid: int) -> int | None:
    try:
        first = Path(f"/proc/{pid}/syscall").read_text().split()[0]
    except (OSError, IndexError):
        return None
    return int(first) if first.lstrip("-").isdigit() else None


def state_of(pid: int) -> str | None:
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return data[data.rindex(")") + 2 :].split()[0]


def wait_for(cond, timeout: float = 30.0, what: str = "condition") -> None:
    """Poll ``cond`` (a /proc observation: no event exists for it) until true."""
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


class SpliceHolder:
    """A process (as ``uid``) splicing from an empty pipe into ``path``."""

    def __init__(self, path: str | Path, uid: int = 65534) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            argv = [sys.executable, str(HELPERS / "splice_holder.py"), str(fd)]
            self.proc = subprocess.Popen(
                [*nobody(uid), *argv] if uid != 0 else argv,
                pass_fds=[fd], stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
        finally:
            os.close(fd)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("ready"), line
        self.pid = self.proc.pid
        wait_for(lambda: syscall_of(self.pid) == SPLICE, what="the holder to enter splice")

    def end(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait(timeout=30)


class PendingFreeze:
    """FIFREEZE of ``mountpoint`` from a separate process (tests/helpers/freeze_probe.py)."""

    def __init__(self, mountpoint: str | Path, *, wait_blocked: bool = True) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HELPERS / "freeze_probe.py"), str(mountpoint)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().startswith("start")
        self.pid = self.proc.pid
        if wait_blocked:
            wait_for(
                lambda: syscall_of(self.pid) == IOCTL and state_of(self.pid) == "D",
                what="FIFREEZE to wait in the kernel",
            )

    def pending(self) -> bool:
        return self.proc.poll() is None

    def result(self, timeout: float = 30.0) -> tuple[int, float]:
        """(errno, seconds) of the FIFREEZE once it returned."""
        assert self.proc.stdout is not None
        self.proc.wait(timeout=timeout)
        _, err, took = self.proc.stdout.readline().split()
        return int(err), float(took)
