"""Real-kernel fixtures: loop-image filesystems made in temporary directories.

Every fixture thaws (only what the test froze), unmounts and detaches in teardown, even
when the test fails. Nothing here ever touches a filesystem the test did not create.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

FIFREEZE = 0xC0045877
FITHAW = 0xC0045878
MIN_SIZE = {"xfs": 320, "btrfs": 128, "ext4": 64, "ext2": 64}
MKFS = {
    "ext4": ["mkfs.ext4", "-q", "-F"],
    "ext2": ["mkfs.ext2", "-q", "-F"],
    "xfs": ["mkfs.xfs", "-q", "-f", "-m", "reflink=1"],
    "btrfs": ["mkfs.btrfs", "-q", "-f"],
}
HELPERS = Path(__file__).parent / "helpers"


def run(*cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, text=True, capture_output=True, timeout=timeout)


def losetup(image: Path) -> str:
    """Attach ``image``; retried because parallel tests can race for the same free loop."""
    for attempt in range(20):
        p = run("losetup", "-f", "--show", "--direct-io=on", str(image), check=False)
        if p.returncode == 0:
            return p.stdout.strip()
        time.sleep(0.05 * (attempt + 1))
    raise RuntimeError(f"losetup failed: {p.stderr}")


def wait_detached(device: str, timeout: float = 5.0) -> None:
    """`losetup -d` of a device still open (a mount copy in another mount namespace that a
    just-killed process held) only sets autoclear: the detach follows shortly after."""
    backing = Path("/sys/block") / Path(device).name / "loop" / "backing_file"
    end = time.monotonic() + timeout
    while backing.exists() and time.monotonic() < end:
        time.sleep(0.02)


def thaw_quietly(path: str) -> None:
    """Teardown only: thaw a filesystem this test created (EINVAL = it was not frozen)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.ioctl(fd, FITHAW, 0)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
        finally:
            os.close(fd)


PROBE_START_S = 120.0  # a Python start-up on a loaded machine: bounded, never the verdict


def is_frozen(path: str | Path) -> bool:
    """The kernel's word: FIFREEZE answers EBUSY while frozen; a probe that froze the
    filesystem instead thaws it at once (it was not frozen). Only where no FIFREEZE can
    wait (no writer holding one in the kernel)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.ioctl(fd, FIFREEZE, 0)
        except OSError as e:
            if e.errno == errno.EBUSY:
                return True
            raise
        fcntl.ioctl(fd, FITHAW, 0)
        return False
    finally:
        os.close(fd)


def is_writable(path: str | Path, timeout: float = 30.0) -> bool:
    """True if a file can be created and fsync'd under ``path`` within ``timeout`` s of the
    probe being ready to write.

    Runs in a child process: a write to a frozen filesystem blocks in D state and cannot
    be interrupted, so the test must not do it itself. The child says "ready" first: its
    start-up (seconds on a busy machine) is not counted, so a short ``timeout`` says
    "frozen" only when the write itself did not complete, and the generous default only
    costs time when the answer is False (pass a short one where False is expected).
    """
    code = (
        "import os,sys; p=os.path.join(sys.argv[1], '.probe-%d' % os.getpid()); "
        "print('ready', flush=True); "
        "fd=os.open(p, os.O_CREAT|os.O_WRONLY); os.write(fd,b'x'); os.fsync(fd); "
        "os.close(fd); os.unlink(p)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", code, str(path)], stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    ready = select.select([proc.stdout], [], [], PROBE_START_S)[0]
    if not ready or proc.stdout.readline() != b"ready\n":
        proc.kill()
        raise AssertionError(f"the write probe did not start in {PROBE_START_S:g}s")
    proc.stdout.close()
    try:
        return proc.wait(timeout=timeout) == 0
    except subprocess.TimeoutExpired:
        # Leave it: it finishes by itself once the filesystem thaws.
        return False


@dataclass
class LoopFS:
    """A filesystem on a loop device backed by an image file in a temp dir."""

    fstype: str
    image: Path
    device: str
    mountpoint: Path

    @property
    def path(self) -> str:
        return str(self.mountpoint)

    def freeze_externally(self) -> None:
        """Freeze it the way a third party (fsfreeze) would."""
        run("fsfreeze", "-f", self.path)

    def thaw_externally(self) -> None:
        run("fsfreeze", "-u", self.path)


class LoopFactory:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.made: list[LoopFS] = []
        self.extra_mounts: list[Path] = []
        self.n = 0

    def __call__(
        self,
        fstype: str = "ext4",
        size_mb: int | None = None,
        *,
        image_dir: Path | None = None,
        mount_opts: str | None = None,
    ) -> LoopFS:
        self.n += 1
        size = max(size_mb or 0, MIN_SIZE.get(fstype, 64))
        image = (image_dir or self.base) / f"fs{self.n}-{fstype}.img"
        with open(image, "wb") as f:
            f.truncate(size * 1024 * 1024)
        run(*MKFS[fstype], str(image))
        device = losetup(image)
        mnt = self.base / f"mnt{self.n}-{fstype}"
        mnt.mkdir()
        fs = LoopFS(fstype, image, device, mnt)
        try:
            opts = ["-o", mount_opts] if mount_opts else []
            run("mount", *opts, device, str(mnt))
        except BaseException:
            run("losetup", "-d", device, check=False)
            raise
        self.made.append(fs)
        return fs

    def bind(self, source: Path, name: str = "bind") -> Path:
        """A bind mount of ``source`` (same superblock, another path)."""
        self.n += 1
        target = self.base / f"{name}{self.n}"
        target.mkdir()
        run("mount", "--bind", str(source), str(target))
        self.extra_mounts.append(target)
        return target

    def tmpfs(self) -> Path:
        self.n += 1
        target = self.base / f"tmpfs{self.n}"
        target.mkdir()
        run("mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(target))
        self.extra_mounts.append(target)
        return target

    def cleanup(self) -> None:
        for target in reversed(self.extra_mounts):
            thaw_quietly(str(target))
            run("umount", "-l", str(target), check=False)
        # Inner (loop-backed on another test fs) first: they were made later.
        for fs in reversed(self.made):
            thaw_quietly(fs.path)
        for fs in reversed(self.made):
            for _ in range(50):
                if run("umount", fs.path, check=False).returncode == 0:
                    break
                time.sleep(0.1)
            else:
                run("umount", "-l", fs.path, check=False)
            run("losetup", "-d", fs.device, check=False)
        for fs in self.made:
            wait_detached(fs.device)


@pytest.fixture
def loopfs(tmp_path: Path) -> Iterator[Callable[..., LoopFS]]:
    """Factory: ``loopfs("xfs")`` makes and mounts a fresh filesystem; all torn down after."""
    factory = LoopFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.cleanup()


@pytest.fixture
def loop_factory(loopfs: LoopFactory) -> LoopFactory:
    return loopfs


class Writer:
    """A subprocess appending sequence-numbered, fsync'd records (tests/helpers/writer.py).

    It reports each acknowledged record on stdout (a pipe, never a file), so the test
    knows exactly what was committed before, during and after a freeze.
    """

    def __init__(self, directory: str | Path, name: str = "records.log", interval: float = 0.002):
        self.file = Path(directory) / name
        self.proc = subprocess.Popen(
            [sys.executable, str(HELPERS / "writer.py"), str(self.file), str(interval)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("ready"), line
        self.acks: list[tuple[float, int]] = []  # (monotonic time seen, seq)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("ack "):
                self.acks.append((time.monotonic(), int(line.split()[1])))
            else:
                self.lines.append(line)

    def acked_before(self, t: float) -> int:
        """The highest sequence number acknowledged before monotonic time ``t``."""
        return max((seq for when, seq in self.acks if when < t), default=0)

    def stop(self) -> dict[str, float | int]:
        """Stop it and return its summary: records acked, errors, longest stall (s)."""
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self._reader.join(timeout=10)
        last = [ln for ln in self.lines if ln.startswith("summary ")]
        err = self.proc.stderr.read() if self.proc.stderr else ""
        assert last, f"writer died: rc={self.proc.returncode} {err}"
        _, acked, errors, max_stall = last[-1].split()
        return {"acked": int(acked), "errors": int(errors), "max_stall": float(max_stall)}

    def verify(self, acked: int) -> None:
        """Every acknowledged record is on disk, in order, none lost or duplicated."""
        lines = self.file.read_text().splitlines()
        seqs = [int(x) for x in lines]
        assert seqs[:acked] == list(range(1, acked + 1)), "records lost or out of order"


@pytest.fixture
def writer_factory() -> Iterator[Callable[..., Writer]]:
    made: list[Writer] = []

    def make(directory: str | Path, **kw: object) -> Writer:
        w = Writer(directory, **kw)  # type: ignore[arg-type]
        made.append(w)
        return w

    try:
        yield make
    finally:
        for w in made:
            if w.proc.poll() is None:
                w.proc.kill()
                with contextlib.suppress(Exception):
                    w.proc.wait(timeout=30)


def pytest_collection_finish(session: pytest.Session) -> None:
    """The VM tier's kernels boot in the background as soon as the session knows it will
    run them (tests/vm/test_vm_tier.py), beside the rest of the suite. (Here, not in a
    tests/vm/conftest.py: a second module named conftest shadows this one for the tests'
    own `from conftest import ...`: load run 3.)"""
    if session.config.option.collectonly:
        return
    tier = sys.modules.get("test_vm_tier")  # imported by its collection (tests/vm)
    if tier is not None and any(item.path.name == "test_vm_tier.py" for item in session.items):
        tier.start_in_background()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """End the VM tier's runs still going; fail loudly if the suite left a loop device or
    mount of its own behind."""
    vmrun = sys.modules.get("vmrun")
    if vmrun is not None:
        vmrun.background.shutdown()
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is None:
        return
    base = str(factory.getbasetemp())
    leftovers = [
        line for line in run("losetup", "-a", check=False).stdout.splitlines()
        if base in line
    ]  # fmt: skip
    if leftovers:
        print("\nLEAK: loop devices left behind:\n" + "\n".join(leftovers), file=sys.stderr)
        session.exitstatus = 1


RCU_EXPEDITED = Path("/sys/kernel/rcu_expedited")
RCU_LEAKS: list[str] = []


@pytest.fixture
def rcu_knob(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A stand-in /sys/kernel (rcu_expedited=0, rcu_normal=0) with a holders record of the
    test's own: QUIESCE_RUN_DIR names a private run directory (guardian sockets and the
    stand-in's record). Another quiesce run on this machine, or an admin who set the real
    knob, changes nothing the test sees, and the test changes nothing of theirs (the
    stand-in's record in the shared /run/quiesce mixed concurrent test runs' holders)."""
    from quiesce.freezing.guardian import expedite

    d = tmp_path / "sys-kernel"
    d.mkdir()
    (d / "rcu_expedited").write_text("0\n")
    (d / "rcu_normal").write_text("0\n")
    run_dir = tmp_path / "run-rcu"
    run_dir.mkdir(mode=0o700)
    monkeypatch.setenv(expedite.TEST_DIR_ENV, str(d))
    monkeypatch.setenv("QUIESCE_RUN_DIR", str(run_dir))
    yield d / "rcu_expedited"


def real_rcu_leaked(samples: int = 5, every: float = 0.1) -> bool:
    """The real knob is 1 and quiesce's machine-wide record names nobody, in every one of
    ``samples`` looks ``every`` s apart. One look can fall between another run's setting
    and its record's removal; a knob left changed without a record stays so."""
    for i in range(samples):
        if i:
            time.sleep(every)
        if _rcu_record() is not None or RCU_EXPEDITED.read_text().strip() != "1":
            return False
    return True


def _rcu_record() -> dict[str, Any] | None:
    from quiesce.freezing.guardian import expedite

    try:
        rec = json.loads((Path(expedite.RUN_DIR) / expedite.HOLDERS_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return rec if isinstance(rec, dict) else {}


@pytest.fixture(autouse=True)
def _rcu_expedited_as_found(request: pytest.FixtureRequest) -> Iterator[None]:
    """Machine-wide state: a test that set /sys/kernel/rcu_expedited and left it set with
    no live holder in quiesce's record is reported at the end of the session, and the
    value is restored (through the record, as `quiesce cleanup` does, if one is left).

    Only a 0 -> 1 change is the test's to undo: a 1 found at the start may be another
    run's (or an admin's), and a 0 at the end means its holder restored it. Writing back
    the 1 a test found, after that other run had restored 0, left the knob at 1 with no
    record at all."""
    try:
        before = RCU_EXPEDITED.read_text().strip()
    except OSError:
        yield
        return
    yield
    if before != "0":
        return
    deadline = time.monotonic() + 3  # guardians restore it asynchronously
    while time.monotonic() < deadline:
        if RCU_EXPEDITED.read_text().strip() == "0" or _rcu_held_by_a_live_run():
            return
        time.sleep(0.05)
    RCU_LEAKS.append(request.node.nodeid)
    from quiesce.freezing.guardian import expedite

    with contextlib.suppress(Exception):
        if os.environ.get(expedite.TEST_DIR_ENV) is None and expedite.restore_stale():
            return
    if _rcu_record() is None:
        with contextlib.suppress(OSError):
            RCU_EXPEDITED.write_text("0")


def _rcu_held_by_a_live_run() -> bool:
    """Another quiesce run on this machine (not this test's) holds the knob right now:
    its record says so; leave it to that run."""
    from quiesce.host import pids

    rec = _rcu_record() or {}
    try:
        return any(pids.start_time(h["pid"]) == h["start"] for h in rec["holders"])
    except (KeyError, TypeError):
        return False


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if RCU_LEAKS:
        terminalreporter.write_line(
            "rcu_expedited was at 1 with no live holder recorded (restored to 0) after: "
            + ", ".join(RCU_LEAKS)
        )
