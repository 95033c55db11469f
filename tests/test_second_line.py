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
from hypothesis import given, settings
from hypothesis import strategies as st

from quiesce.freezing import guardian
from quiesce.freezing.guardian import records, second
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


def has_cap_sys_resource() -> bool:
    with open("/proc/self/status") as f:
        eff = next(line for line in f if line.startswith("CapEff:"))
    return bool(int(eff.split()[1], 16) >> 24 & 1)


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
        assert self.watchdog > 0 and hello["recorded"], hello

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


# -- 2. killed while its FIFREEZE waits in the kernel (case 4) -------------------------------

HOLDER = """
import os, sys
fd = int(sys.argv[1])
r, w = os.pipe()  # nothing is ever written: the splice waits, holding a write on the fs
os.splice(r, fd, 1 << 16)
"""


def splice_holder(fs: LoopFS) -> subprocess.Popen[bytes]:
    """uid 65534 splices from an empty pipe into a file on ``fs``: any FIFREEZE of ``fs``
    then waits in the kernel until the holder ends (the issue's case 2)."""
    fd = os.open(os.path.join(fs.path, "held"), os.O_WRONLY | os.O_CREAT, 0o666)
    try:
        holder = subprocess.Popen(
            [*NOBODY, "/usr/bin/python3", "-c", HOLDER, str(fd)], pass_fds=[fd]
        )
    finally:
        os.close(fd)

    def splicing() -> bool:
        try:
            with open(f"/proc/{holder.pid}/syscall") as f:
                return f.read().split()[0] == "275"  # x86_64 splice
        except (OSError, IndexError):
            return False

    wait_for(splicing, "the holder to wait inside splice()")
    return holder


def fifreeze_task(pid: int) -> int | None:
    """The thread of ``pid`` that is inside FIFREEZE, if any."""
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            if in_fifreeze(int(tid)):
                return int(tid)
    return None


@pytest.mark.timeout(120)
@pytest.mark.parametrize("where", ["freeze", "freeze-thread"])
def test_a_guardian_killed_inside_fifreeze_is_thawed_once_the_kernel_completes_it(
    loopfs: Any, fakes: list[Fake], run_dir: Path, where: str
) -> None:
    """The issue's case 4. ``freeze-thread``: the FIFREEZE runs on a thread of its own
    (as the guardian's crew does); SIGKILL ends the main thread at once, the process lives
    on (a zombie leader) until the ioctl returns."""
    vol = loopfs("ext4")
    holder = splice_holder(vol)
    try:
        g = start(fakes, 3.0, vol)
        g.send(f"{where} 0")
        wait_for(lambda: fifreeze_task(g.pid), "the guardian's FIFREEZE to wait in the kernel")
        tid = fifreeze_task(g.pid)
        assert tid is not None
        g.kill()
        if where == "freeze-thread":
            wait_for(lambda: proc_state(g.pid) == "Z", "the main thread to die")
        # SIGKILLed, but its FIFREEZE is uninterruptible: it cannot die before it returns.
        assert in_fifreeze(tid) and proc_state(g.pid) is not None
        wait_for(
            lambda: read_record(run_dir, g.pid)["volumes"][0]["state"] == "freezing",
            "the record to say freezing",
        )
        (seen,) = records.gone_guardians()
        assert seen["pid"] == g.pid and seen["dying"] and seen["watchdog_alive"]
        assert seen["volumes"][0]["state"] == "freezing"  # and no probe waited behind it
        st = cli("status")
        want = f"{vol.path}: freezing \u2014 guardian {g.pid} was killed inside FIFREEZE"
        assert want in st.stdout, st.stdout + st.stderr
        time.sleep(3.5)  # the deadline passes while the kernel still waits for the holder
        assert not gone(g.watchdog) and in_fifreeze(tid)
    finally:
        holder.kill()
        holder.wait(timeout=10)
    # The kernel completes the dead guardian's freeze; the watchdog thaws it at once.
    wait_for(lambda: not in_fifreeze(tid), "the FIFREEZE to return")
    wait_for(lambda: gone(g.watchdog), "the watchdog to thaw and leave")
    assert probe(vol.path) == 0, "the freeze completed after the guardian died leaked"
    lines = kmsg_lines(g.watchdog)
    assert any(ln.startswith(f"thawed {vol.path} (guardian {g.pid} is gone") for ln in lines)


# -- 3. a freeze that is no longer the guardian's is never thawed ----------------------------


@pytest.mark.timeout(90)
def test_a_lost_or_foreign_freeze_is_never_thawed(
    loopfs: Any, fakes: list[Fake], run_dir: Path
) -> None:
    """Volume 0: the guardian's freeze thawed and refrozen by a third party (fsfreeze -u,
    -f), which the guardian noted "lost". Volume 1: frozen by a third party first: the
    guardian's FIFREEZE got EBUSY ("foreign"). After the guardian's SIGKILL and past its
    deadline, both are still frozen: the watchdog left at once and touched neither."""
    lost, foreign = loopfs("ext4"), loopfs("ext4")
    foreign.freeze_externally()
    g = start(fakes, 1.0, lost, foreign)
    first = g.ask("freeze 0")
    assert first["errno"] == 0
    assert g.ask("freeze 1")["errno"] == errno.EBUSY
    lost.thaw_externally()
    lost.freeze_externally()
    g.ask("note 0 lost")
    g.kill()
    g.proc.wait(timeout=10)
    wait_for(lambda: gone(g.watchdog), "the watchdog to leave: nothing is its to thaw")
    end = first["call_ns"] / 1e9 + 1.0 + 0.5
    time.sleep(max(0.0, end - time.monotonic()))  # past the deadline
    assert probe(lost.path) == errno.EBUSY and probe(foreign.path) == errno.EBUSY
    assert kmsg_lines(g.watchdog) == []
    assert not (run_dir / record_name(g.pid)).exists()


@pytest.mark.timeout(90)
def test_an_unnoted_refreeze_is_thawed_the_residual_window(
    loopfs: Any, fakes: list[Fake], run_dir: Path
) -> None:
    """Negative control for the test above, and the probe's documented limit: a third
    party's thaw and refreeze that the guardian did not note before it died answers the
    probe with EBUSY, exactly like the guardian's own freeze: it is thawed."""
    vol = loopfs("ext4")
    g = start(fakes, 0.5, vol)
    assert g.ask("freeze 0")["errno"] == 0
    vol.thaw_externally()
    vol.freeze_externally()
    g.kill()
    wait_for(lambda: gone(g.watchdog), "the watchdog to thaw and leave")
    assert probe(vol.path) == 0


@pytest.mark.timeout(90)
def test_a_volume_thawed_by_someone_else_is_probed_and_left_thawed(
    loopfs: Any, fakes: list[Fake], run_dir: Path
) -> None:
    """The guardian's freeze was thawed by someone else (not noted): the probe froze it,
    and the watchdog undoes that at once and says so."""
    vol = loopfs("ext4")
    g = start(fakes, 0.5, vol)
    assert g.ask("freeze 0")["errno"] == 0
    vol.thaw_externally()
    g.kill()
    wait_for(lambda: gone(g.watchdog), "the watchdog to probe and leave")
    assert probe(vol.path) == 0
    want = f"{vol.path} was thawed by someone else before the deadline"
    assert any(ln.startswith(want) for ln in kmsg_lines(g.watchdog))


# -- 4. the watchdog itself is killed -------------------------------------------------------


@pytest.mark.timeout(90)
def test_killing_the_watchdog_breaks_nothing(loopfs: Any, fakes: list[Fake], run_dir: Path) -> None:
    vol = loopfs("ext4")
    g = start(fakes, 30.0, vol)
    with open(f"/proc/{g.watchdog}/comm") as f:
        assert f.read().strip() == "quiesce-2nd"
    if has_cap_sys_resource():  # needed to lower it (this VM's root lacks it)
        with open(f"/proc/{g.watchdog}/oom_score_adj") as f:
            assert f.read().strip() == "-1000"
    assert os.getsid(g.watchdog) == g.watchdog
    links = {
        os.readlink(f"/proc/{g.watchdog}/fd/{n}") for n in os.listdir(f"/proc/{g.watchdog}/fd")
    }
    for n in (0, 1):  # the guardian's stdin and stdout (the test's pipes) are not kept
        assert os.readlink(f"/proc/{g.pid}/fd/{n}") not in links, links
    assert os.readlink(f"/proc/{g.watchdog}/cwd") == "/"
    os.kill(g.watchdog, signal.SIGTERM)  # ignored
    os.kill(g.watchdog, signal.SIGINT)
    assert not gone(g.watchdog)
    assert g.ask("freeze 0")["errno"] == 0
    wait_for(lambda: read_record(run_dir, g.pid)["volumes"][0]["state"] == "frozen", "record")
    os.kill(g.watchdog, signal.SIGKILL)
    wait_for(lambda: gone(g.watchdog), "the watchdog to die")
    assert g.ask("note 0 frozen") == {"op": "note"}  # a note to nobody neither blocks nor raises
    assert g.ask("thaw 0")["errno"] == 0
    assert g.ask("stop") == {"op": "stop"}
    assert probe(vol.path) == 0
    g.proc.stdin.close()  # type: ignore[union-attr]
    g.proc.wait(timeout=10)
    # Its record stayed ("frozen": the watchdog died before the thaw was noted); the kernel
    # says otherwise, and cleanup removes it.
    assert read_record(run_dir, g.pid)["volumes"][0]["state"] == "frozen"
    (seen,) = records.gone_guardians()
    assert seen["volumes"][0]["state"] == "thawed" and not seen["watchdog_alive"]
    done, errors = records.clean_stale()
    assert errors == [] and done
    assert not (run_dir / record_name(g.pid)).exists()
    assert probe(vol.path) == 0


@pytest.mark.timeout(60)
def test_a_guardian_that_ends_normally_takes_its_watchdog_along(
    loopfs: Any, fakes: list[Fake], run_dir: Path
) -> None:
    vol = loopfs("ext4")
    g = start(fakes, 30.0, vol)
    assert g.ask("freeze 0")["errno"] == 0
    assert g.ask("thaw 0")["errno"] == 0
    wait_for(lambda: gone(g.watchdog), "the watchdog to leave: everything is settled")
    assert not (run_dir / record_name(g.pid)).exists()
    g2 = start(fakes, 30.0, vol)
    assert g2.ask("stop") == {"op": "stop"}
    wait_for(lambda: gone(g2.watchdog), "the watchdog to leave on stop()")
    assert not (run_dir / record_name(g2.pid)).exists()


# -- 5. status, thaw and cleanup after a SIGKILL -----------------------------------------------


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "quiesce", *args], capture_output=True, text=True, timeout=60
    )


@pytest.mark.timeout(120)
def test_status_shows_a_killed_guardians_freeze_and_thaw_ends_it(
    loopfs: Any, fakes: list[Fake], run_dir: Path
) -> None:
    vol = loopfs("ext4")
    g = start(fakes, 60.0, vol)
    assert g.ask("freeze 0")["errno"] == 0
    g.kill()
    g.proc.wait(timeout=10)
    st = cli("status")
    assert st.returncode == 0, st.stderr
    want = f"{vol.path}: frozen \u2014 guardian {g.pid} is gone (killed); thaw with: "
    want += f"quiesce thaw {vol.path}; "
    assert want in st.stdout, st.stdout
    assert f"its watchdog {g.watchdog} thaws it at " in st.stdout
    assert "nothing is frozen by quiesce" not in st.stdout
    js = json.loads(cli("status", "--json").stdout)
    (gone_one,) = js["gone"]
    assert gone_one["pid"] == g.pid and gone_one["volumes"][0]["state"] == "frozen"
    assert probe(vol.path) == errno.EBUSY  # status only looked
    th = cli("thaw", vol.path)
    assert th.returncode == 0, th.stderr
    assert f"guardian {g.pid} is gone (killed)" in th.stdout, th.stdout
    assert probe(vol.path) == 0
    # Told (a settled marker and SIGUSR1), the watchdog leaves long before the deadline and
    # will never probe the volume again, whoever freezes it next.
    wait_for(lambda: gone(g.watchdog), "the watchdog to leave after `quiesce thaw`", 10)
    assert not (run_dir / record_name(g.pid)).exists()
    assert kmsg_lines(g.watchdog) == []
    assert "nothing is frozen by quiesce" in cli("status").stdout


def plant(run_dir: Path, pid: int, dev: str, name: str, *, uid: int = 0, mode: int = 0o600) -> Path:
    """A record of a dead "guardian" ``pid`` that claims ``dev`` frozen."""
    rec = {
        "version": 1, "guardian_pid": pid, "guardian_start": 1, "watchdog_pid": pid,
        "watchdog_start": 1, "started": 0.0, "timeout_s": 1.0, "deadline_wall": 1.0,
        "expedite": None, "volumes": [{"dev": dev, "name": name, "state": "frozen",
                                       "call_wall": 0.0}],
    }  # fmt: skip
    path = run_dir / record_name(pid)
    path.write_text(json.dumps(rec))
    os.chown(path, uid, uid)
    os.chmod(path, mode)
    return path


@pytest.mark.timeout(60)
def test_records_that_root_did_not_write_are_refused(loopfs: Any, run_dir: Path) -> None:
    """A volume frozen by a third party, and records claiming it was a dead guardian's:
    owned by uid 65534, readable by others, or a symlink. None is believed: status does
    not show it, thaw says no guardian held it, cleanup leaves the freeze alone. The
    same record, root's and 0600, is believed (the control)."""
    vol = loopfs("ext4")
    dev = f"{os.major(os.stat(vol.device).st_rdev)}:{os.minor(os.stat(vol.device).st_rdev)}"
    vol.freeze_externally()
    dead = 4_000_000  # above pid_max: never alive
    plant(run_dir, dead, dev, vol.path, uid=65534)
    plant(run_dir, dead + 1, dev, vol.path, mode=0o644)
    target = plant(run_dir, dead + 2, dev, vol.path)
    target.rename(run_dir / "elsewhere.json")
    (run_dir / record_name(dead + 2)).symlink_to(run_dir / "elsewhere.json")
    gone_list, refused = records.survey_gone()
    assert gone_list == []
    assert refused == {
        record_name(dead): "it is owned by uid 65534, not root",
        record_name(dead + 1): "its mode is 0644, not 0600",
        record_name(dead + 2): "it is a symbolic link",
    }
    st = cli("status")
    assert "nothing is frozen by quiesce" in st.stdout, st.stdout
    assert (
        f"record {record_name(dead)} not believed: it is owned by uid 65534"
        in st.stderr + st.stdout
    )
    assert records.holder_gone(dev) is None
    done, errors = records.clean_stale()
    assert done == [] and errors == []
    assert probe(vol.path) == errno.EBUSY, "a planted record made quiesce thaw a foreign freeze"
    # The control: root's own record is believed, and cleanup thaws what it names.
    for p in run_dir.iterdir():
        p.unlink()
    plant(run_dir, dead, dev, vol.path)
    (seen,) = records.gone_guardians()
    assert seen["volumes"][0]["state"] == "frozen" and not seen["watchdog_alive"]
    done, errors = records.clean_stale()
    assert errors == [] and done[0]["target"] == f"{vol.path} (frozen)"
    assert probe(vol.path) == 0
    assert list(run_dir.iterdir()) == []


# -- the time from a SIGKILL past the deadline to a writable filesystem ----------------------


WRITE = """
import os, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY)  # made before the freeze: no create blocks here
print("go", flush=True)
os.write(fd, b"x"); os.fsync(fd)
print(time.monotonic(), flush=True)
"""


@pytest.mark.timeout(60)
def test_a_writer_resumes_promptly_after_a_sigkill_past_the_deadline(
    loopfs: Any, fakes: list[Fake], run_dir: Path
) -> None:
    """The deadline has passed when the guardian dies: its watchdog thaws at once. The
    time from the SIGKILL to a blocked writer's completed fsync is printed (a generous
    bound only: the machine is shared)."""
    vol = loopfs("ext4")
    open(os.path.join(vol.path, "w"), "wb").close()
    g = start(fakes, 0.2, vol)
    first = g.ask("freeze 0")
    assert first["errno"] == 0
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITE, os.path.join(vol.path, "w")],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert writer.stdout is not None and writer.stdout.readline().strip() == "go"
    time.sleep(max(0.0, first["call_ns"] / 1e9 + 0.3 - time.monotonic()))
    assert probe(vol.path) == errno.EBUSY  # the fake guardian does not thaw on its own
    killed = g.kill()
    resumed = float(writer.stdout.readline())
    writer.wait(timeout=10)
    took = resumed - killed
    print(f"SIGKILL past the deadline -> writer's fsync done: {took * 1000:.1f} ms")
    assert 0 < took < 5.0


@pytest.mark.timeout(90)
def test_cleanup_thaws_what_a_killed_guardian_and_watchdog_left(
    loopfs: Any, fakes: list[Fake], run_dir: Path, tmp_path: Path
) -> None:
    """Both the guardian and its watchdog SIGKILLed in the window: only the record is left.
    `quiesce status` shows the freeze (no watchdog to thaw it); `quiesce cleanup` thaws it
    and removes the record."""
    vol = loopfs("ext4")
    g = start(fakes, 60.0, vol)
    assert g.ask("freeze 0")["errno"] == 0
    wait_for(lambda: read_record(run_dir, g.pid)["volumes"][0]["state"] == "frozen", "record")
    os.kill(g.watchdog, signal.SIGKILL)
    g.kill()
    g.proc.wait(timeout=10)
    wait_for(lambda: gone(g.watchdog), "the watchdog to die")
    st = cli("status")
    assert f"{vol.path}: frozen \u2014 guardian {g.pid} is gone (killed)" in st.stdout, st.stdout
    assert "its watchdog" not in st.stdout
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    dry = cli("cleanup", "--state-dir", str(state), "--dry-run")
    assert dry.returncode == 0 and probe(vol.path) == errno.EBUSY, dry.stdout + dry.stderr
    half = run_dir / f".{record_name(g.pid)}.4000000.tmp"  # a writer killed mid-write
    half.write_text("{")
    done = cli("cleanup", "--state-dir", str(state))
    assert done.returncode == 0, done.stdout + done.stderr
    assert not half.exists()
    want = f"removed guardian-record: {vol.path} (frozen) (run dead quiesce guardian {g.pid})"
    assert want in done.stdout, done.stdout
    assert probe(vol.path) == 0
    assert not (run_dir / record_name(g.pid)).exists()
    assert "nothing to clean up" in cli("cleanup", "--state-dir", str(state)).stdout


# -- parsers: the notes the watchdog reads, the records status believes ------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=6)
    ),
    max_leaves=6,
)


@settings(max_examples=300, deadline=None)
@given(chunks=st.lists(st.binary(max_size=40), max_size=8))
def test_the_watchdog_reads_any_byte_stream_without_breaking(chunks: list[bytes]) -> None:
    """Whatever arrives, split anywhere: states stay valid, nothing raises."""
    spec = {"guardian_pid": 1, "guardian_start": None, "devs": ["7:1", "7:2"],
            "names": ["/a", "/b"], "timeout_s": 1.0}  # fmt: skip
    w = second._Watchdog(spec, [-1, -1], -1, -1, -1, -1)
    for c in chunks:
        w._apply(c)
    assert all(s in (*second.STATES, "idle") for s in w.state)
    assert len(w.buf) < second._MSG.size


@settings(max_examples=100, deadline=None)
@given(notes=st.lists(st.tuples(st.integers(0, 1), st.sampled_from(second.STATES)), max_size=12))
def test_the_watchdog_keeps_the_last_note_of_each_volume(notes: list[tuple[int, str]]) -> None:
    spec = {"guardian_pid": 1, "guardian_start": None, "devs": ["7:1", "7:2"],
            "names": ["/a", "/b"], "timeout_s": 1.0}  # fmt: skip
    w = second._Watchdog(spec, [-1, -1], -1, -1, -1, -1)
    data = b"".join(second._MSG.pack(i, second._CODE[s], second._NO_CALL) for i, s in notes)
    for k in range(0, len(data), 7):  # torn into pieces that cut messages
        w._apply(data[k : k + 7])
    want = ["idle", "idle"]
    for i, s in notes:
        want[i] = s
    assert w.state == want


@settings(max_examples=150, deadline=None)
@given(rec=json_values | st.fixed_dictionaries({"guardian_pid": st.just(42)}, optional={
    "watchdog_pid": json_values | st.integers(), "timeout_s": json_values,
    "guardian_start": json_values, "watchdog_start": json_values,
    "deadline_wall": json_values, "started": json_values,
    "volumes": st.lists(json_values | st.fixed_dictionaries({
        "dev": st.sampled_from(["7:1", "x", "7:"]), "name": json_values,
        "state": st.sampled_from(["frozen", "idle", "nope"]), "call_wall": json_values,
    }), max_size=3),
}))  # fmt: skip
def test_a_record_that_does_not_fit_is_refused_never_an_error(rec: Any) -> None:
    why = records._check(rec, 42)
    if why is None:  # believed: every field a reader uses has its type
        assert isinstance(rec["watchdog_pid"], int) and rec["watchdog_pid"] > 0
        assert rec["volumes"] and all(
            v["state"] in (*second.STATES, "idle") for v in rec["volumes"]
        )


@pytest.mark.timeout(120)
def test_a_stuck_fifreeze_of_a_killed_guardian_does_not_hold_back_the_others(
    loopfs: Any, fakes: list[Fake], run_dir: Path
) -> None:
    """Volume 0 frozen; volume 1's FIFREEZE waits in the kernel on a thread of its own
    (behind the splice holder) when the guardian is SIGKILLed. The guardian is not dead
    for the kernel (its pidfd waits for that thread), yet at the deadline volume 0 is
    thawed; volume 1 once the kernel completes its freeze."""
    a, b = loopfs("ext4"), loopfs("ext4")
    holder = splice_holder(b)
    try:
        g = start(fakes, 2.0, a, b)
        assert g.ask("freeze 0")["errno"] == 0
        g.send("freeze-thread 1")
        wait_for(lambda: fifreeze_task(g.pid), "volume 1's FIFREEZE to wait in the kernel")
        tid = fifreeze_task(g.pid)
        assert tid is not None
        g.kill()
        want = f"thawed {a.path} (guardian {g.pid} is gone: deadline)"
        wait_for(
            lambda: any(ln.startswith(want) for ln in kmsg_lines(g.watchdog)),
            "volume 0 to be thawed at the deadline",
        )
        assert in_fifreeze(tid), "the holder ended early: the test proves nothing"
        assert probe(a.path) == 0
        assert not gone(g.watchdog)
    finally:
        holder.kill()
        holder.wait(timeout=10)
    wait_for(lambda: gone(g.watchdog), "the watchdog to thaw volume 1 and leave")
    assert probe(b.path) == 0
    assert any(ln.startswith(f"thawed {b.path} (guardian") for ln in kmsg_lines(g.watchdog))


@pytest.mark.timeout(60)
def test_a_stopped_guardian_past_its_deadline_is_acted_for(
    loopfs: Any, fakes: list[Fake], run_dir: Path
) -> None:
    """SIGSTOP: the guardian lives but cannot act. Past its deadline (and a grace of
    STOPPED_GRACE_S), its watchdog thaws for it."""
    vol = loopfs("ext4")
    g = start(fakes, 0.5, vol)
    first = g.ask("freeze 0")
    assert first["errno"] == 0
    os.kill(g.pid, signal.SIGSTOP)
    try:
        assert probe(vol.path) == errno.EBUSY
        wait_for(lambda: gone(g.watchdog), "the watchdog to thaw and leave")
        grace = first["call_ns"] / 1e9 + 0.5 + second.STOPPED_GRACE_S
        assert time.monotonic() >= grace
        assert probe(vol.path) == 0
    finally:
        os.kill(g.pid, signal.SIGCONT)


@pytest.mark.timeout(90)
def test_a_killed_guardians_watchdog_never_thaws_a_later_runs_freeze(
    loopfs: Any, fakes: list[Fake], run_dir: Path
) -> None:
    """One holder per freeze (the issue's case 1, with a killed guardian): A froze and
    was SIGKILLed; someone thawed the volume; B froze it again (FIFREEZE returned 0: no
    freeze of A's was left). A's watchdog must not probe it at A's deadline (the probe
    would answer EBUSY for B's freeze and thaw it): B's watchdog marks A's claim settled.
    The negative control is test_an_unnoted_refreeze_is_thawed_the_residual_window."""
    vol = loopfs("ext4")
    a = start(fakes, 2.0, vol)
    first = a.ask("freeze 0")
    assert first["errno"] == 0
    wait_for(lambda: read_record(run_dir, a.pid)["volumes"][0]["state"] == "frozen", "record")
    a.kill()
    a.proc.wait(timeout=10)
    vol.thaw_externally()
    b = start(fakes, 60.0, vol)
    assert b.ask("freeze 0")["errno"] == 0
    wait_for(lambda: gone(a.watchdog), "A's watchdog to leave, told its claim is history")
    assert kmsg_lines(a.watchdog) == []
    assert probe(vol.path) == errno.EBUSY, "B's freeze was thawed by A's watchdog"
    assert not (run_dir / record_name(a.pid)).exists()
    assert b.ask("thaw 0")["errno"] == 0
    assert probe(vol.path) == 0
