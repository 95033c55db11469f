"""The library API on real loop filesystems: group order, unwinding, self-freeze refusal."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import HELPERS, LoopFS, Writer, is_writable

import quiesce
import quiesce.freezing.guardian
from quiesce.errors import UnsafePlan
from quiesce.freezing.freezer import FAULT_ENV

DIRTY_MB = 48


def dirty(path: str, mb: int) -> None:
    """Leave ``mb`` MiB of buffered, unsynced data in the page cache of ``path``'s fs."""
    chunk = os.urandom(1 << 20)
    with open(os.path.join(path, "dirty.bin"), "wb") as f:
        for _ in range(mb):
            f.write(chunk)


@pytest.mark.timeout(60)
def test_nested_loop_group_given_in_the_wrong_order(loopfs, writer_factory) -> None:
    """Outer named first on purpose: freezing it first would hang the inner's freeze in
    the kernel (docs/kernel.md §5). No syncfs, so the inner's FIFREEZE itself must
    flush its dirty data through the loop device into the outer."""
    outer: LoopFS = loopfs("xfs")
    inner: LoopFS = loopfs("ext4", size_mb=128, image_dir=outer.mountpoint)
    w: Writer = writer_factory(inner.path)
    dirty(inner.path, DIRTY_MB)

    with quiesce.freeze([outer.path, inner.path], timeout=30, syncfs=False) as window:
        assert [v.mount_point for v in window.volumes] == [inner.path, outer.path]
        assert [v.state for v in window.volumes] == ["frozen", "frozen"]
        assert not is_writable(inner.path, timeout=0.3)
        assert not is_writable(outer.path, timeout=0.3)

    assert window.thawed_by == "controller", window.expired_reason
    inner_r, outer_r = window.volumes
    assert (inner_r.state, outer_r.state) == ("thawed", "thawed")
    assert inner_r.syncfs_s is None and outer_r.syncfs_s is None
    assert inner_r.freeze_s is not None and outer_r.freeze_s is not None
    # Frozen first and thawed last, the inner was frozen strictly longer than the outer.
    assert inner_r.frozen_for_s is not None and outer_r.frozen_for_s is not None
    assert inner_r.frozen_for_s > outer_r.frozen_for_s > 0
    assert window.duration is not None and window.duration >= inner_r.frozen_for_s

    assert is_writable(inner.path) and is_writable(outer.path)
    summary = w.stop()
    assert summary["errors"] == 0
    w.verify(int(summary["acked"]))
    assert os.path.getsize(os.path.join(inner.path, "dirty.bin")) == DIRTY_MB << 20


def test_a_nested_pair_and_an_independent_volume_freeze_in_two_waves(loopfs) -> None:
    """The inner (loop image on the outer) and an independent volume freeze together,
    then the outer; thaw in reverse waves. Nothing is lost, everything thaws."""
    outer: LoopFS = loopfs("xfs")
    inner: LoopFS = loopfs("ext4", size_mb=128, image_dir=outer.mountpoint)
    other: LoopFS = loopfs("ext4")
    dirty(inner.path, DIRTY_MB)
    paths = [outer.path, other.path, inner.path]
    with quiesce.freeze(paths, timeout=30, syncfs=False) as window:
        assert sorted(map(sorted, window.waves)) == sorted(
            [sorted([inner.path, other.path]), [outer.path]]
        )
        assert window.waves[-1] == [outer.path]
        assert all(not is_writable(p, timeout=0.2) for p in paths)
    assert window.thawed_by == "controller"
    by = {v.mount_point: v for v in window.volumes}
    assert all(v.state == "thawed" for v in by.values())
    # the outer froze after, and thawed before, the inner
    assert by[inner.path].frozen_for_s > by[outer.path].frozen_for_s > 0
    assert all(is_writable(p) for p in paths)


def test_exception_in_the_body_thaws(loopfs) -> None:
    fs: LoopFS = loopfs("ext4")
    with pytest.raises(RuntimeError, match="snapshot failed"):  # noqa: SIM117
        with quiesce.freeze(fs.path, timeout=30) as window:
            assert not is_writable(fs.path, timeout=0.3)
            raise RuntimeError("snapshot failed")
    assert is_writable(fs.path)
    assert [(v.state, v.thawed_by) for v in window.volumes] == [("thawed", "controller")]


def test_keyboard_interrupt_in_the_body_thaws_and_propagates(loopfs) -> None:
    fs: LoopFS = loopfs("ext4")
    with pytest.raises(KeyboardInterrupt):  # noqa: SIM117
        with quiesce.freeze(fs.path, timeout=30) as window:
            assert not is_writable(fs.path, timeout=0.3)
            raise KeyboardInterrupt
    assert is_writable(fs.path)
    assert [v.state for v in window.volumes] == ["thawed"]


SELF_FREEZE = textwrap.dedent(
    """
    import json, sys
    import quiesce
    path, out = sys.argv[1], {}
    try:
        with quiesce.freeze(path, timeout=20):
            out["frozen"] = True
    except quiesce.UnsafePlan as e:
        out["refused"] = e.message
    with quiesce.freeze(path, timeout=20, allow_self=True) as w:
        out["allowed"] = [v.state for v in w.volumes]
    out["after"] = [v.state for v in w.volumes]
    print(json.dumps(out))
    """
)


def test_plan_holding_the_working_directory_is_refused(loopfs) -> None:
    fs: LoopFS = loopfs("ext4")
    proc = subprocess.run(
        [sys.executable, "-c", SELF_FREEZE, fs.path],
        cwd=fs.path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert "frozen" not in out
    assert "working directory" in out["refused"] and fs.path in out["refused"]
    assert out["allowed"] == ["frozen"]
    assert out["after"] == ["thawed"]
    assert is_writable(fs.path)


def test_make_plan_reports_the_self_hazard(loopfs) -> None:
    """The same refusal without a subprocess: the hazard names the working directory."""
    fs: LoopFS = loopfs("ext4")
    here = os.getcwd()
    os.chdir(fs.path)
    try:
        with quiesce.make_plan([fs.path]) as plan:
            assert [h.kind for h in plan.hazards] == ["self"]
            with pytest.raises(UnsafePlan, match="working directory"):
                plan.check()
        with quiesce.make_plan([fs.path], allow_self=True) as plan:
            plan.check()
    finally:
        os.chdir(here)


# -- the controller thaws by itself when the guardian is lost -----------------------------------


def _gone(pid: int, timeout: float = 5.0) -> bool:
    """Exited or a zombie (a dead guardian stays our unreaped child until close())."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.01)
    return False


def test_a_killed_guardian_does_not_leave_the_group_frozen(loopfs) -> None:
    """SIGKILL (no emergency thaw possible) while the body runs: leaving the block thaws
    with the controller's own FITHAW on the fds it holds, in reverse order, and says so."""
    a: LoopFS = loopfs("ext4")
    b: LoopFS = loopfs("ext4")
    with quiesce.freeze([a.path, b.path], timeout=30, lease=30) as window:
        assert window.guardian_pid is not None
        os.kill(window.guardian_pid, signal.SIGKILL)
        assert _gone(window.guardian_pid)
        assert not is_writable(a.path, timeout=0.3), "the guardian's death thawed it?"
    assert is_writable(a.path) and is_writable(b.path)
    assert [(v.state, v.thawed_by) for v in window.volumes] == [("thawed", "controller")] * 2
    assert window.thawed_by == "controller"
    lost = [w for w in window.warnings if w.startswith("the guardian was lost")]
    assert len(lost) == 2 and all("thawed with quiesce's own FITHAW" in w for w in lost), lost


@pytest.mark.timeout(60)
def test_a_stopped_guardian_costs_a_bounded_wait_then_the_controller_thaws(loopfs) -> None:
    fs: LoopFS = loopfs("ext4")
    with quiesce.freeze(fs.path, timeout=30, lease=30) as window:
        gpid = window.guardian_pid
        assert gpid is not None
        os.kill(gpid, signal.SIGSTOP)
        t0 = time.monotonic()
    took = time.monotonic() - t0
    try:
        assert is_writable(fs.path)
        assert [(v.state, v.thawed_by) for v in window.volumes] == [("thawed", "controller")]
        assert 4.0 < took < 10.0, took  # THAW_REPLY_S, then our own FITHAW
        # It must not wake up later and "thaw" what someone else froze since: killed.
        assert _gone(gpid), "the stopped guardian was left behind"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(gpid, signal.SIGKILL)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("mode", ["concurrent", "serial"])
def test_rollback_without_a_guardian_never_thaws_the_foreign_volume(loopfs, mode: str) -> None:
    """The last volume is a stranger's freeze (EBUSY). The controller stops after that
    failure (fault point 'fail'), its guardian is SIGKILLed, then it resumes: it rolls
    back the two volumes it froze with its own FITHAW and leaves the stranger's alone.
    Concurrent: the three independent volumes freeze in one wave."""
    vols = [loopfs("ext4") for _ in range(3)]
    with quiesce.make_plan([v.path for v in vols]) as plan:
        order = [m.name for m in plan.members]
    foreign = next(v for v in vols if v.path == order[-1])
    foreign.freeze_externally()
    serial = ["--serial"] if mode == "serial" else []
    proc = subprocess.Popen(
        [sys.executable, str(HELPERS / "controller.py"), "--lease", "60", *serial, *order],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, FAULT_ENV: "fail"},
    )
    gpid = None
    try:
        end = time.monotonic() + 30
        while time.monotonic() < end:
            fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            if fields[0] in ("T", "t"):
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.01)
        gpid = next(
            p for p in quiesce.freezing.guardian.list_guardians()
            if Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1] == str(proc.pid)
        )  # fmt: skip
        assert not is_writable(order[0], timeout=0.3)
        os.kill(gpid, signal.SIGKILL)
        os.kill(proc.pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 5, err  # AlreadyFrozen
        data = json.loads(out)
        outcome = [(v["state"], v["thawed_by"]) for v in data["window"]["volumes"]]
        assert outcome == [("rolled-back", "controller")] * 2 + [("foreign", None)], outcome
        assert any(w.startswith("the guardian was lost") for w in data["window"]["warnings"])
        assert is_writable(order[0]) and is_writable(order[1])
        assert not is_writable(foreign.path, timeout=0.5), "a stranger's freeze was thawed"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
        if gpid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(gpid, signal.SIGKILL)
        foreign.thaw_externally()
    assert is_writable(foreign.path)


def test_an_armed_freezer_freezes_at_once_and_an_unused_arm_leaves_nothing(loopfs) -> None:
    """arm() starts the guardian and pre-flushes ahead of time; freeze() is then only the
    ioctls. Armed and never frozen, thaw() ends the guardian and nothing stays frozen."""
    fs: LoopFS = loopfs("ext4")
    with quiesce.make_plan([fs.path]) as plan:
        f = quiesce.Freezer(plan, timeout=30)
        f.arm()
        pid = f.window.guardian_pid
        assert pid is not None and is_writable(fs.path), "arming froze something"
        f.arm()  # idempotent: the same guardian
        assert f.window.guardian_pid == pid
        window = f.freeze()
        assert not is_writable(fs.path, timeout=0.3)
        window = f.thaw()
    assert is_writable(fs.path)
    assert [(v.state, v.thawed_by) for v in window.volumes] == [("thawed", "controller")]
    assert _gone(pid)
    with quiesce.make_plan([fs.path]) as plan:
        f = quiesce.Freezer(plan, timeout=30)
        f.arm()
        pid = f.window.guardian_pid
        f.thaw()  # nothing was frozen: the guardian is ended all the same
    assert _gone(pid) and is_writable(fs.path)


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.timeout(90)
def test_the_in_process_ioctl_threads_end_with_the_freeze_on_every_path(loopfs) -> None:
    """Without a guardian the controller's own process runs one parked ioctl thread per
    volume (started before the window, woken together): success, a rollback (a stranger
    froze one volume: EBUSY) and an exception in the body all end them, and leave no fd
    open that was not open before."""
    import threading

    vols = [loopfs("ext4") for _ in range(3)]
    paths = [v.path for v in vols]
    before_threads, before_fds = threading.active_count(), _fds()

    with quiesce.freeze(paths, timeout=30, guardian=False) as window:
        assert threading.active_count() == before_threads + 3, "not one thread per volume"
        assert all(not is_writable(p, timeout=0.2) for p in paths)
    assert [v.state for v in window.volumes] == ["thawed"] * 3

    vols[1].freeze_externally()
    try:
        with pytest.raises(quiesce.QuiesceError), quiesce.freeze(paths, guardian=False):
            pytest.fail("the group froze around a stranger's freeze")
        assert not is_writable(vols[1].path, timeout=0.3), "the stranger's freeze was thawed"
    finally:
        vols[1].thaw_externally()

    with pytest.raises(KeyError), quiesce.freeze(paths, timeout=30, guardian=False):
        raise KeyError("the body failed")

    assert all(is_writable(p) for p in paths)
    end = time.monotonic() + 5
    while threading.active_count() > before_threads and time.monotonic() < end:
        time.sleep(0.01)
    assert threading.active_count() == before_threads, threading.enumerate()
    assert _fds() == before_fds
