"""reflink provider: FICLONE of a loop image's backing file inside the freeze window.

Real kernel, real filesystems: the inner filesystem's image lives on an outer XFS
(reflink=1) or btrfs loop filesystem, as the provider requires.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import is_writable
from helpers.snaptools import Recorder, image_on_reflink_host, sh

from quiesce import snapshot as snapshots
from quiesce.errors import AlreadyFrozen, UnsafePlan, UnsupportedFilesystem, UsageError
from quiesce.freezing.plan import make_plan
from quiesce.providers.base import volume_slug
from quiesce.providers.reflink import BASE_PREFIX, ReflinkProvider


@pytest.mark.parametrize("outer", ["xfs", "btrfs"])
def test_clone_of_ext4_image_mounts_and_deletes(loopfs, tmp_path, outer):
    pair = image_on_reflink_host(loopfs, "ext4", outer)
    (pair.inner.mountpoint / "marker").write_text("before\n")
    state = tmp_path / "state"
    man = snapshots.create([pair.inner.path], "reflink", job="nightly", state_dir=state)

    assert man.freeze_mode == "fifreeze" and man.consistency == "atomic"
    assert man.window is not None and man.window["thawed_by"] == "controller"
    [snap] = man.snapshots
    clone = Path(snap.location)
    assert clone.parent == pair.outer.mountpoint
    assert clone.name == f"{man.id}--{volume_slug(pair.inner.path)}.img"
    assert clone.stat().st_size == pair.inner.image.stat().st_size
    assert is_writable(pair.inner.path)
    (pair.inner.mountpoint / "marker").write_text("after\n")
    assert [m.id for m in snapshots.list_manifests(state)] == [man.id]

    where = tmp_path / "view"
    assert snapshots.mount(man.id, where, state) == [str(where)]
    try:
        assert (where / "marker").read_text() == "before\n"
        opts = sh("findmnt", "-no", "OPTIONS", str(where)).stdout
        assert {"ro", "nosuid", "nodev", "noexec"} <= set(opts.strip().split(","))
        with pytest.raises(UsageError, match="mounted at"):
            snapshots.delete(man.id, state)
    finally:
        assert snapshots.umount(str(where), state) == [str(where)]
    assert str(clone) not in sh("losetup", "-a").stdout
    snapshots.delete(man.id, state)
    assert not clone.exists()
    assert snapshots.list_manifests(state) == []


def test_image_on_ext4_is_refused_with_a_hint(loopfs, tmp_path):
    """The inner image sits in tmp_path on the host's ext4: FICLONE is EOPNOTSUPP."""
    fs = loopfs("ext4")
    with pytest.raises(UnsupportedFilesystem, match="cannot clone") as err:
        snapshots.create([fs.path], "reflink", state_dir=tmp_path / "state")
    assert "reflink=1" in err.value.hint
    assert sorted(p.name for p in tmp_path.glob("*.img")) == [fs.image.name]
    assert is_writable(fs.path)


def test_backing_filesystem_in_the_group_is_refused(loopfs, tmp_path):
    pair = image_on_reflink_host(loopfs)
    with pytest.raises(UnsafePlan, match="would block"):
        snapshots.create(
            [pair.inner.path, pair.outer.path], "reflink", state_dir=tmp_path / "state"
        )
    assert [p.name for p in pair.outer.mountpoint.iterdir()] == [pair.inner.image.name]


def test_dest_on_another_filesystem_is_refused(loopfs, tmp_path):
    pair = image_on_reflink_host(loopfs)
    with pytest.raises(UsageError, match="must stay on the filesystem"):
        snapshots.create(
            [pair.inner.path], "reflink", options={"dest": str(tmp_path)},
            state_dir=tmp_path / "state",
        )  # fmt: skip


def test_dest_option_places_the_clone(loopfs, tmp_path):
    pair = image_on_reflink_host(loopfs, outer="btrfs")
    dest = pair.outer.mountpoint / "clones"
    dest.mkdir()
    man = snapshots.create(
        [pair.inner.path], "reflink", options={"dest": str(dest)}, state_dir=tmp_path / "s"
    )
    assert Path(man.snapshots[0].location).parent == dest
    snapshots.delete(man.id, tmp_path / "s")
    # the base (the last snapshot's content, which seeds the next) stays
    assert [p.name.startswith(BASE_PREFIX) for p in dest.iterdir()] == [True]


def test_non_loop_volume_is_refused():
    with (
        make_plan(["/"], allow_self=True) as plan,
        pytest.raises(UsageError, match="not on a loop"),
    ):
        ReflinkProvider().check(plan.members)


def test_foreign_freeze_unwinds_prepared_files_and_hooks(loopfs, tmp_path):
    """EBUSY at the freeze: the empty clone file made in prepare is removed, the hook is
    released with ok=False, nothing is written to the state directory."""
    pair = image_on_reflink_host(loopfs)
    pair.inner.freeze_externally()
    log: list[str] = []
    try:
        with pytest.raises(AlreadyFrozen):
            snapshots.create(
                [pair.inner.path], "reflink", state_dir=tmp_path / "state",
                quiescers=[Recorder("app", log)],
            )  # fmt: skip
    finally:
        pair.inner.thaw_externally()
    assert log == ["app.before_freeze", "app.after_thaw(False)"]
    assert [p.name for p in pair.outer.mountpoint.iterdir()] == [pair.inner.image.name]
    assert not (tmp_path / "state").exists()


def test_two_images_one_window(loopfs, tmp_path):
    host = loopfs("xfs")
    a = loopfs("ext4", image_dir=host.mountpoint)
    b = loopfs("ext4", image_dir=host.mountpoint)
    man = snapshots.create([a.path, b.path], "reflink", state_dir=tmp_path / "s")
    assert len(man.snapshots) == 2
    assert {v["state"] for v in man.window["volumes"]} == {"thawed"}
    assert len({s.location for s in man.snapshots}) == 2
    assert all(os.path.isfile(s.location) for s in man.snapshots)


def test_clone_of_btrfs_image_mounts_beside_the_origin(loopfs, tmp_path):
    """A btrfs clone has the origin's fsid: it mounts next to it through temp-fsid."""
    pair = image_on_reflink_host(loopfs, "btrfs", "xfs")
    (pair.inner.mountpoint / "marker").write_text("b\n")
    man = snapshots.create([pair.inner.path], "reflink", state_dir=tmp_path / "s")
    view = tmp_path / "view"
    snapshots.mount(man.id, view, tmp_path / "s")
    try:
        assert (view / "marker").read_text() == "b\n"
    finally:
        snapshots.umount(man.id, tmp_path / "s")
    snapshots.delete(man.id, tmp_path / "s")
