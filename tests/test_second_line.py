"""The second line (freezing/guardian/second.py): a guardian killed with SIGKILL still
has its freeze thawed by the deadline, and only if it is still its freeze.

The guardian is a stand-in (tests/helpers/fake_guardian.py) that starts a SecondLine
exactly as the guardian does, freezes on command, notes each state, and is SIGKILLed by
the test. "Frozen" is the kernel's word: a FIFREEZE probe answering EBUSY. Every test
has its own run directory (QUIESCE_RUN_DIR), so records of other runs are never seen.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import FIFREEZE, FITHAW, HELPERS, LoopFS, thaw_quietly

from quiesce.freezing import guardian
from quiesce.freezing.guardian import records
from quiesce.freezing.guardian.second import record_name

FAKE = HELPERS / "fake_guardian.py"
WAIT_S = 30.0
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def probe(path: str) -> int:
    """The kernel's word: EBUSY if frozen. 0 means it was not: thawed back at once."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.ioctl(fd, FIFREEZE, 0)
        except OSError as e:
            return e.errno or errno.EIO
        fcntl.ioctl(fd, FITHAW, 0)
        return 0
    finally:
        os.close(fd)


def proc_state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def gone(pid: int) -> bool:
    return proc_state(pid) in (None, "Z", "X")


def wait_for(cond: Any, what: str, timeout: float = WAIT_S) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.005)
    pytest.fail(f"timed out waiting for {what}")


def in_fifreeze(pid: int) -> bool:
    """The process's thread is inside the FIFREEZE ioctl (x86_64: ioctl is syscall 16)."""
    try:
        with open(f"/proc/{pid}/syscall") as f:
            fields = f.read().split()
    except OSError:
        return False
    return len(fields) > 2 and fields[0] == "16" and int(fields[2], 16) == FIFREEZE


def kmsg_lines(wpid: int) -> list[str]:
    log = subprocess.run(["dmesg"], capture_output=True, text=True, check=True).stdout
    tag = f"quiesce-2nd[{wpid}]: "
    return [line.split(tag, 1)[1] for line in log.splitlines() if tag in line]


class Fake:
    """One stand-in guardian and its watchdog; killed by pid in teardown."""

    def __init__(self, timeout: float, paths: list[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(FAKE), str(timeout), *paths],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        hello = self.read()
        assert hello.get("ready"), hello
        self.pid: int = hello["pid"]
        self.watchdog: int = hello["watchdog"]
        assert self.watchdog > 0

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        return json.loads(line) if line else {}

    def send(self, cmd: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()

    def ask(self, cmd: str) -> dict[str, Any]:
        self.send(cmd)
        return self.read()

    def kill(self) -> float:
        t = time.monotonic()
        self.proc.kill()
        return t

    def cleanup(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired, ValueError):
            self.proc.communicate(timeout=30)
        if not gone(self.watchdog):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.watchdog, signal.SIGKILL)


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    monkeypatch.setenv(guardian.RUN_DIR_ENV, str(run))
    return run


@pytest.fixture
def fakes(loopfs: Any, run_dir: Path) -> Iterator[list[Fake]]:
    made: list[Fake] = []
    try:
        yield made
    finally:
        for f in made:
            f.cleanup()
        for fs in loopfs.made:
            thaw_quietly(fs.path)


def start(fakes: list[Fake], timeout: float, *vols: LoopFS) -> Fake:
    f = Fake(timeout, [v.path for v in vols])
    fakes.append(f)
    return f


def read_record(run_dir: Path, gpid: int) -> dict[str, Any]:
    return json.loads((run_dir / record_name(gpid)).read_text())


# -- 1. killed in the window: thawed by the deadline -----------------------------------------


@pytest.mark.timeout(90)
def test_a_guardian_killed_in_the_window_is_thawed_by_its_deadline(
    loopfs: Any, fakes: list[Fake], run_dir: Path, tmp_path: Path
) -> None:
    a, b = loopfs("ext4"), loopfs("ext4")
    log_path = tmp_path / "log.sock"
    log = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    log.bind(str(log_path))
    log.settimeout(30)
    os.environ["QUIESCE_TEST_SYSLOG"] = str(log_path)
    try:
        g = start(fakes, 4.0, a, b)
    finally:
        del os.environ["QUIESCE_TEST_SYSLOG"]
    rec = read_record(run_dir, g.pid)  # written before anything is frozen
    assert rec["watchdog_pid"] == g.watchdog and [v["state"] for v in rec["volumes"]] == [
        "idle",
        "idle",
    ]
    assert os.stat(run_dir / record_name(g.pid)).st_mode & 0o777 == 0o600
    first = g.ask("freeze 0")
    assert first["errno"] == 0 and g.ask("freeze 1")["errno"] == 0
    assert probe(a.path) == errno.EBUSY and probe(b.path) == errno.EBUSY
    killed = g.kill()
    g.proc.wait(timeout=10)
    # Its deadline is the first FIFREEZE call plus 4 s: nothing thaws before it.
    assert probe(a.path) == errno.EBUSY and probe(b.path) == errno.EBUSY
    assert not gone(g.watchdog)
    wait_for(lambda: gone(g.watchdog), "the watchdog to thaw and leave")
    done = time.monotonic()
    assert probe(a.path) == 0 and probe(b.path) == 0, "still frozen after the watchdog left"
    deadline_s = 4.0 - (killed - first["call_ns"] / 1e9)
    assert done - killed >= deadline_s - 0.05, "thawed before the deadline"
    lines = kmsg_lines(g.watchdog)
    for p in (a.path, b.path):
        want = f"thawed {p} (guardian {g.pid} is gone: deadline) after "
        assert any(ln.startswith(want) for ln in lines), lines
    data = log.recv(4096).decode()
    log.close()
    assert data.startswith(f"<28>quiesce-2nd[{g.watchdog}]: thawed "), data
    assert not (run_dir / record_name(g.pid)).exists(), "the record outlived the watchdog"
