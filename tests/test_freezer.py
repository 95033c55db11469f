"""The library API on real loop filesystems: group order, unwinding, self-freeze refusal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import LoopFS, Writer, is_writable

import quiesce
from quiesce.errors import UnsafePlan

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
    the kernel (kernel-freeze-facts §7.4). No syncfs, so the inner's FIFREEZE itself must
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
