"""Helpers for the scenario scripts that run *inside* the VM guest (never on the host).

Everything here works on guest-only objects: loop devices backed by files in the guest's
in-memory /tmp, and the VGs, pools and mounts made on them. The VM is thrown away at the
end, but each scenario still cleans up so that a failure message is about the test.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f}s] {msg}", flush=True)


def result(key: str, value: object) -> None:
    """A measurement the host-side test reads back (``RESULT key=value``)."""
    print(f"RESULT {key}={value}", flush=True)


def expect(cond: object, what: str) -> None:
    if not cond:
        raise AssertionError(what)
    log(f"ok: {what}")


def sh(*cmd: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(
        cmd, text=True, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    if check and p.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} -> {p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}"
        )
    return p


def loop_image(name: str, size_mb: int) -> str:
    """A sparse file in the guest's /tmp (memory) attached to a loop device."""
    if not os.path.exists("/dev/loop-control"):
        sh("modprobe", "loop")  # a module in Debian's kernels
    img = Path("/tmp") / f"{name}.img"
    with open(img, "wb") as f:
        f.truncate(size_mb << 20)
    return sh("losetup", "-f", "--show", str(img)).stdout.strip()


def mkfs_mount(dev: str, fstype: str, mnt: str) -> str:
    mkfs = {"ext4": ["mkfs.ext4", "-q", "-F"], "xfs": ["mkfs.xfs", "-q", "-f"]}[fstype]
    sh(*mkfs, dev)
    os.makedirs(mnt, exist_ok=True)
    sh("mount", dev, mnt)
    return mnt


def records(path: str | Path) -> list[int]:
    """The sequence numbers in a records file (complete lines only)."""
    text = Path(path).read_text()
    return [int(x) for x in text.split("\n")[:-1] if x]


def check_records(seqs: list[int], acked: int, where: str) -> None:
    """Records 1..len are all there, in order, and every acknowledged one survived."""
    expect(seqs == list(range(1, len(seqs) + 1)), f"{where}: records in order, none torn")
    expect(len(seqs) >= acked, f"{where}: all {acked} records acked before it are there")


class PairWriter(threading.Thread):
    """Appends record n to each file in turn, each write fsync'd before the next.

    So at any instant file[0] has n or n+1 records when file[1] has n: two snapshots taken
    at one instant show counts that differ by at most one, in that direction.
    ``acked`` is the last n that is durable in every file.
    """

    def __init__(self, files: Sequence[str | Path], interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.files = [Path(f) for f in files]
        self.interval = interval
        self.acked = 0
        self.errors: list[str] = []
        self._halt = threading.Event()
        self.fds = [os.open(f, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) for f in files]

    def run(self) -> None:
        n = 0
        while not self._halt.is_set():
            n += 1
            try:
                for fd in self.fds:
                    os.write(fd, f"{n}\n".encode())
                    os.fsync(fd)
            except OSError as e:
                self.errors.append(str(e))
                return
            self.acked = n
            time.sleep(self.interval)

    def stop(self) -> int:
        self._halt.set()
        self.join(timeout=60)
        for fd in self.fds:
            os.close(fd)
        return self.acked


def writable(path: str, timeout: float = 30) -> bool:
    """Can a child process write and sync a file there (not frozen, not suspended)?"""
    try:
        p = subprocess.run(
            ["sh", "-c", f"echo probe > {path}/.probe && sync -f {path}/.probe"],
            timeout=timeout,
            capture_output=True,
        )
    except subprocess.TimeoutExpired:
        return False
    return p.returncode == 0


def modprobe(*mods: str) -> None:
    for m in mods:
        sh("modprobe", m)


def lv_names(vg: str) -> set[str]:
    out = sh("lvs", "--noheadings", "-a", "-o", "lv_name", vg).stdout
    return {line.strip() for line in out.splitlines() if line.strip()}


def run_main(body: Callable[[], None]) -> None:
    """Run a scenario: exit 0 and print SCENARIO OK, or print the failure and exit 1."""
    uptime = Path("/proc/uptime").read_text().split()[0]
    log(f"kernel {os.uname().release}, python {sys.version.split()[0]}, guest uptime {uptime}s")
    result("guest_uptime_at_start_s", uptime)
    try:
        body()
    except BaseException:
        traceback.print_exc(file=sys.stdout)
        print("SCENARIO FAILED", flush=True)
        sys.stdout.flush()
        os._exit(1)
    print(f"SCENARIO OK in {time.monotonic() - T0:.1f}s", flush=True)
    sys.stdout.flush()
    os._exit(0)
