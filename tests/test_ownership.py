"""Ownership from the kernel, not from belief: quiesce never thaws a freeze that is not
its own, nor one of its own that someone else thawed (and maybe froze again).

The third party is `fsfreeze` (util-linux) or a plain FIFREEZE/FITHAW from the test.
"Frozen" is asserted with a FIFREEZE probe (EBUSY), never with a write that times out.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import pytest
from conftest import LoopFS, is_frozen, thaw_quietly

import quiesce
from quiesce.errors import ExitCode, FreezeBroken
from quiesce.freezing import guardian

FIFREEZE = 0xC0045877
FITHAW = 0xC0045878
WAIT_S = 30.0


def cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "quiesce", *args], capture_output=True, text=True, timeout=timeout
    )


def volume_state(gpid: int, path: str) -> str | None:
    """What guardian ``gpid`` says of ``path`` (None: it is gone)."""
    try:
        st = guardian.ask(gpid, {"op": "status"}, timeout=5.0)
    except quiesce.GuardianError:
        return None
    return next(v["state"] for v in st["volumes"] if v["mount_point"] == path)


def wait_for(cond: Any, what: str) -> None:
    end = time.monotonic() + WAIT_S
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.01)
    pytest.fail(f"timed out waiting for {what}")


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def test_an_old_guardian_never_thaws_a_newer_freeze(loopfs: Any) -> None:
    """Issue case 1: `freeze --timeout 3 M; fsfreeze -u M; freeze --timeout 60 M`. The
    first guardian sees its freeze thawed (probe), calls it lost, and leaves without a
    FITHAW; the second freeze is the only one status shows, and thaw goes to its holder."""
    m: LoopFS = loopfs("ext4")
    try:
        r1 = cli("freeze", "--json", "--timeout", "3", m.path)
        assert r1.returncode == 0, r1.stderr
        g1 = json.loads(r1.stdout)["guardian_pid"]
        assert is_frozen(m.path)
        m.thaw_externally()
        wait_for(lambda: volume_state(g1, m.path) in ("lost", None), "guardian 1 to see it")
        r2 = cli("freeze", "--json", "--timeout", "60", m.path)
        assert r2.returncode == 0, r2.stderr
        g2 = json.loads(r2.stdout)["guardian_pid"]
        wait_for(lambda: gone(g1), "guardian 1 to leave: nothing of its own is frozen")
        assert is_frozen(m.path), "the old guardian thawed the newer freeze"
        st = json.loads(cli("status", "--json").stdout)
        holders = [
            g["pid"]
            for g in st.get("guardians", [])
            if any(v["mount_point"] == m.path and v["state"] == "frozen" for v in g["volumes"])
        ]
        assert holders == [g2], st
        r3 = cli("thaw", "--json", m.path)
        assert r3.returncode == 0, r3.stderr
        assert json.loads(r3.stdout)["results"][0]["thawed_by"] == f"guardian {g2}"
        assert not is_frozen(m.path)
    finally:
        thaw_quietly(m.path)


def test_exec_fails_when_someone_else_thaws_and_refreezes_inside_the_window(
    loopfs: Any,
) -> None:
    """An outside thaw and refreeze inside `quiesce exec`: exit 13, the volume and the
    moment named on stderr (not only in --json), and the third party's freeze left alone."""
    m: LoopFS = loopfs("ext4")
    third_party = (
        "import fcntl, os, sys, time, json, subprocess\n"
        f"fd = os.open({m.path!r}, os.O_RDONLY)\n"
        f"fcntl.ioctl(fd, {FITHAW})\n"  # someone else's thaw of quiesce's freeze
        "end = time.monotonic() + 20\n"
        "while time.monotonic() < end:\n"
        "    st = json.loads(subprocess.run([sys.executable, '-m', 'quiesce', 'status',\n"
        "        '--json'], capture_output=True, text=True).stdout)\n"
        "    states = [v['state'] for g in st.get('guardians', []) for v in g['volumes']]\n"
        "    if 'lost' in states: break\n"
        "fcntl.ioctl(fd, " + str(FIFREEZE) + ")\n"  # and someone else's new freeze
    )
    try:
        r = cli("exec", "--timeout", "60", m.path, "--", sys.executable, "-c", third_party)
        assert r.returncode == ExitCode.BROKEN, (r.returncode, r.stdout, r.stderr)
        assert m.path in r.stderr and "thawed by someone else" in r.stderr, r.stderr
        assert is_frozen(m.path), "quiesce thawed the third party's freeze"
    finally:
        thaw_quietly(m.path)
    assert not is_frozen(m.path)


@pytest.mark.parametrize(
    ("use_guardian", "trace"),
    [(True, True), (True, False), (False, False)],
    ids=["guardian+trace", "guardian-probes-only", "in-process"],
)
def test_the_library_raises_freeze_broken(loopfs: Any, use_guardian: bool, trace: bool) -> None:
    """`with freeze(...)`: an outside thaw in the body is FreezeBroken on the way out, and
    the filesystem is left as the third party left it (not frozen)."""
    m: LoopFS = loopfs("xfs")
    try:
        with (
            pytest.raises(FreezeBroken) as info,
            quiesce.freeze([m.path], timeout=30, guardian=use_guardian, trace=trace) as window,
        ):
            m.thaw_externally()
            if use_guardian:
                g = window.guardian_pid
                assert g is not None
                wait_for(lambda: volume_state(g, m.path) == "lost", "the probe to see it")
        assert info.value.exit_code == ExitCode.BROKEN
        assert m.path in info.value.message
        assert [v.thawed_by for v in window.volumes] == ["someone-else"]
        assert not is_frozen(m.path)
    finally:
        thaw_quietly(m.path)


def test_a_foreign_freeze_is_never_thawed_at_the_deadline(loopfs: Any) -> None:
    """EBUSY on FIFREEZE: someone else's freeze; quiesce reports it and never thaws it."""
    m: LoopFS = loopfs("btrfs")
    try:
        m.freeze_externally()
        r = cli("exec", "--timeout", "1", m.path, "--", "true")
        assert r.returncode == ExitCode.BUSY, r.stderr
        assert is_frozen(m.path)
    finally:
        thaw_quietly(m.path)


# -- a FIFREEZE stuck in the kernel ------------------------------------------------------------

SPLICE_HOLDER = (
    "import os, sys\n"
    "r, w = os.pipe()\n"  # the write end stays open: splice waits for data for ever
    "os.splice(r, int(sys.argv[1]), 65536)\n"
)


def wchan(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/wchan") as f:
            return f.read()
    except OSError:
        return ""


@pytest.fixture
def splice_holder(loopfs: Any) -> Any:
    """An unprivileged process (uid 65534) in splice() from an empty pipe into a file on a
    fresh filesystem: it holds a write in flight, so a FIFREEZE waits in the kernel, for
    as long as the holder likes. Ended (by pid) in teardown; the freeze then completes."""
    m: LoopFS = loopfs("ext4")
    # A file it may write (handed over as an fd: pytest's tmp dir is root's, 0700).
    fd = os.open(os.path.join(m.path, "held"), os.O_WRONLY | os.O_CREAT, 0o666)
    cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    try:
        holder = subprocess.Popen(
            [*cmd, "/usr/bin/python3", "-c", SPLICE_HOLDER, str(fd)], pass_fds=[fd]
        )
    finally:
        os.close(fd)
    try:
        wait_for(lambda: wchan(holder.pid) == "pipe_wait_readable", "the splice to start")
        yield m, holder
    finally:
        holder.kill()
        holder.wait(timeout=10)
        end = time.monotonic() + WAIT_S
        while time.monotonic() < end and not guardian_done_with(m.path):
            time.sleep(0.01)
        thaw_quietly(m.path)


def guardian_done_with(path: str) -> bool:
    for g in guardian.survey().active:
        if any(
            v["mount_point"] == path and v["state"] in ("freezing", "frozen") for v in g["volumes"]
        ):
            return False
    return True


def test_a_stuck_freeze_fails_at_the_deadline_and_is_thawed_when_the_kernel_finishes(
    splice_holder: Any,
) -> None:
    """Issue case 2: the deadline runs from the FIFREEZE *call*: `exec --timeout 2` fails
    with exit 9 soon after 2 s (not when the holder lets go); status says "freezing";
    `thaw` says the kernel is still setting the freeze up (exit 5); once the holder ends,
    the guardian thaws at once."""
    m, holder = splice_holder
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "quiesce", "exec", "--timeout", "2", m.path, "--", "true"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = proc.communicate(timeout=60)
    took = time.monotonic() - t0
    assert proc.returncode == ExitCode.EXPIRED, (out, err)
    assert took < 20, f"the run waited for the kernel ({took:.1f} s), not for its deadline"
    assert holder.poll() is None, "the holder is still there: the FIFREEZE still waits"
    frozen_by = [
        g for g in guardian.survey().active
        if any(v["mount_point"] == m.path and v["state"] == "freezing" for v in g["volumes"])
    ]  # fmt: skip
    assert len(frozen_by) == 1, guardian.survey()
    r = cli("thaw", m.path)
    assert r.returncode == ExitCode.BUSY, (r.stdout, r.stderr)
    assert "still being set up by the kernel" in r.stderr, r.stderr
    holder.kill()
    holder.wait(timeout=10)
    gpid = frozen_by[0]["pid"]
    wait_for(lambda: gone(gpid), "the guardian to thaw the late freeze and leave")
    assert not is_frozen(m.path), "the late FIFREEZE was left frozen"


# -- the second line: SIGKILL of the guardian itself -------------------------------------------


def record_gone(gpid: int) -> bool:
    """The watchdog removes its guardian's record once what it guarded is settled."""
    from quiesce.freezing.guardian.protocol import run_dir_path
    from quiesce.freezing.guardian.second import record_name

    return not os.path.exists(os.path.join(run_dir_path(), record_name(gpid)))


def test_a_sigkilled_guardian_is_thawed_by_its_second_line_at_the_deadline(loopfs: Any) -> None:
    """Issue case 3: `kill -9` of a guardian holding a freeze. status says so (and how to
    thaw); the watchdog thaws it by the deadline, not before."""
    m: LoopFS = loopfs("ext4")
    try:
        t0 = time.monotonic()
        r = cli("freeze", "--json", "--timeout", "3", m.path)
        assert r.returncode == 0, r.stderr
        gpid = json.loads(r.stdout)["guardian_pid"]
        os.kill(gpid, 9)
        wait_for(lambda: gone(gpid), "the guardian to die")
        st = cli("status")
        assert f"guardian {gpid} is gone" in st.stdout, st.stdout
        assert is_frozen(m.path), "thawed before the deadline"
        wait_for(lambda: record_gone(gpid), "the second line to thaw and leave")
        assert time.monotonic() - t0 >= 3.0 - 0.5
        assert not is_frozen(m.path), "left frozen after the guardian's death"
    finally:
        thaw_quietly(m.path)


def test_a_guardian_killed_inside_its_fifreeze_is_thawed_when_the_kernel_finishes(
    splice_holder: Any,
) -> None:
    """Issue case 4: the guardian is SIGKILLed while its FIFREEZE waits behind writes in
    flight; the kernel completes that freeze later, and the second line thaws it."""
    m, holder = splice_holder
    proc = subprocess.Popen(
        [sys.executable, "-m", "quiesce", "freeze", "--timeout", "2", m.path],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def freezing() -> list[int]:
            return [
                g["pid"] for g in guardian.survey().active
                if any(v["state"] == "freezing" for v in g["volumes"])
                and any(v["mount_point"] == m.path for v in g["volumes"])
            ]  # fmt: skip

        wait_for(lambda: bool(freezing()), "the guardian's FIFREEZE to wait in the kernel")
        gpid = freezing()[0]
        os.kill(gpid, 9)  # it dies once the ioctl returns: the kernel finishes it first
        holder.kill()
        holder.wait(timeout=10)
        wait_for(lambda: gone(gpid), "the guardian to die")
        wait_for(lambda: record_gone(gpid), "the second line to thaw the late freeze")
        assert not is_frozen(m.path), "the late FIFREEZE of a killed guardian stayed frozen"
    finally:
        proc.kill()
        proc.wait(timeout=10)
