"""Freezing real ext4, xfs and btrfs loop filesystems under a live, fsync'ing writer."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import LoopFS, Writer, is_writable, run, thaw_quietly

import quiesce

FSTYPES = ["ext4", "xfs", "btrfs"]


def lines_on_disk(path: Path) -> int:
    """Reading never blocks on a frozen filesystem; writing would."""
    return path.read_bytes().count(b"\n")


def wait_for_acks(w: Writer, above: int, timeout: float = 15.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if w.acks and w.acks[-1][1] > above:
            return True
        time.sleep(0.01)
    return False


@pytest.mark.parametrize("expedite", [True, False], ids=["expedited", "normal-rcu"])
@pytest.mark.parametrize("fstype", FSTYPES)
def test_writer_blocks_while_frozen_and_loses_nothing(
    loopfs, writer_factory, rcu_knob: Path, fstype: str, expedite: bool
) -> None:
    """The expedite knob is a stand-in of the test's own (conftest.rcu_knob): the real one
    may be held by another run, or set by an admin ("already-on"), on a shared machine."""
    fs: LoopFS = loopfs(fstype)
    w: Writer = writer_factory(fs.path)
    assert wait_for_acks(w, 5), "writer did not start"

    with quiesce.freeze(fs.path, timeout=30, expedite=expedite) as window:
        frozen_at = lines_on_disk(w.file)
        assert not is_writable(fs.path, timeout=0.5)
        time.sleep(0.3)
        assert lines_on_disk(w.file) == frozen_at, "a write got through the freeze"
    assert wait_for_acks(w, frozen_at), "writer did not resume after the thaw"
    summary = w.stop()
    assert summary["errors"] == 0
    assert summary["max_stall"] >= 0.5  # it sat in the kernel for the whole window
    assert summary["acked"] > frozen_at
    w.verify(int(summary["acked"]))
    assert is_writable(fs.path)

    assert window.thawed_by == "controller"
    assert window.duration is not None and window.duration >= 0.8
    (vol,) = window.volumes
    assert (vol.state, vol.thawed_by, vol.fstype) == ("thawed", "controller", fstype)
    assert vol.paths == [fs.path]
    assert window.expedite == ("on" if expedite else "off")
    if window.syncfs == "done":
        assert vol.syncfs_s is not None and vol.syncfs_s > 0  # measured, before the window
    else:  # little dirty: the expedited freeze flushes it faster than a syncfs would
        assert expedite and window.syncfs.startswith("skipped: ") and vol.syncfs_s is None
    if not expedite:
        assert window.syncfs == "done"
    for t in (vol.freeze_s, vol.thaw_s):  # measured, and inside the window
        assert t is not None and 0 < t < window.duration
    assert vol.freeze_s + vol.frozen_for_s <= window.duration + 1e-6
    assert vol.frozen_for_s is not None and 0.8 <= vol.frozen_for_s <= window.duration

    # Again without the pre-freeze syncfs, and without the guardian.
    with quiesce.freeze(fs.path, timeout=30, syncfs=False, guardian=False) as window:
        assert not is_writable(fs.path, timeout=0.3)
    (vol,) = window.volumes
    assert vol.syncfs_s is None
    assert vol.freeze_s is not None and vol.thaw_s is not None
    assert window.guardian_pid is None
    assert window.duration is not None and window.duration > 0
    assert is_writable(fs.path)


def test_btrfs_subvolume_and_top_level_are_one_volume(loopfs, tmp_path: Path) -> None:
    fs: LoopFS = loopfs("btrfs")
    run("btrfs", "subvolume", "create", str(fs.mountpoint / "sv1"))
    sub = tmp_path / "sv1-mount"
    sub.mkdir()
    run("mount", "-o", "subvol=sv1", fs.device, str(sub))
    try:
        with quiesce.make_plan([str(sub), fs.path]) as plan:
            (member,) = plan.members
            assert member.paths == [str(sub), fs.path]
            assert member.volume.mount_point == fs.path  # the mount of the fs root
            assert {m.root for m in member.volume.mounts} == {"/", "/sv1"}

        # Freezing through the subvolume freezes the whole filesystem.
        with quiesce.freeze(str(sub), timeout=30) as window:
            assert not is_writable(sub, timeout=0.3)
            assert not is_writable(fs.path, timeout=0.3)
        assert [v.state for v in window.volumes] == ["thawed"]
        assert is_writable(fs.path) and is_writable(sub)
    finally:
        thaw_quietly(str(sub))
        run("umount", str(sub), check=False)
