"""Proof of consistency: what a quiesce snapshot holds, under a live fsync'd writer.

Each test runs the conftest writer (sequence-numbered records, fsync'd, acknowledged on a
pipe) on the origin filesystem while the snapshot is taken. "Acknowledged before the
freeze" uses the writer's acks as the test process saw them (always after the fsync
returned) and the window's first FIFREEZE (same CLOCK_MONOTONIC), so the bound is safe.

The contrast clones are the same FICLONE without the freeze: the image as a power cut
would leave it. For ext4 that is deterministic: a mounted ext4 keeps ``needs_recovery``
set on disk and only a freeze (or umount) clears it. For XFS the frozen log is covered
but has no unmount record, so ``xfs_logprint`` says DIRTY for both clones and
``xfs_repair -n`` refuses to judge either (it exits 1 on any log it may not replay); what
tells them apart is the log's content: the frozen clone's log holds only the superblock
records that cover it, the crash clone's log holds the writer's inode updates that the
metadata in place does not have yet, so its norecovery view misses acknowledged records.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from conftest import Writer
from helpers.snaptools import image_on_reflink_host, read_records, sh

from quiesce import snapshot as snapshots
from quiesce.host import kernel


def _wait_for_acks(w: Writer, n: int = 30, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while w.acked_before(time.monotonic()) < n:
        assert time.monotonic() < deadline, "the writer did not get going"
        time.sleep(0.01)


def _plain_clone(image: Path, dest: Path) -> float:
    """FICLONE without any freeze; returns the monotonic time just before it."""
    src = os.open(image, os.O_RDONLY)
    dst = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        t = time.monotonic()
        kernel.ficlone(dst, src)
        return t
    finally:
        os.close(src)
        os.close(dst)


def _acked_before_freeze(w: Writer, man: snapshots.Manifest) -> int:
    acked = w.acked_before(man.window["start_ns"] / 1e9)
    assert acked >= 30
    return acked


def _assert_holds(records: list[int], acked: int) -> None:
    assert records == list(range(1, len(records) + 1)), "torn or reordered records"
    assert len(records) >= acked, f"{acked - len(records)} acknowledged records missing"


def _ext4_features(image: Path) -> list[str]:
    out = sh("dumpe2fs", "-h", str(image)).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("Filesystem features:"))
    return line.split(":", 1)[1].split()


def _xfs_log_items(image: Path) -> str:
    return sh("xfs_logprint", "-t", str(image)).stdout


def test_ext4_clone_is_clean_and_complete(loopfs, writer_factory, tmp_path):
    pair = image_on_reflink_host(loopfs, "ext4", "xfs")
    w = writer_factory(pair.inner.path)
    _wait_for_acks(w)
    state = tmp_path / "state"
    man = snapshots.create([pair.inner.path], "reflink", state_dir=state)
    crash = pair.outer.mountpoint / "crash.img"
    t_crash = _plain_clone(pair.inner.image, crash)
    summary = w.stop()
    clone = Path(man.snapshots[0].location)

    assert "needs_recovery" not in _ext4_features(clone)
    assert sh("e2fsck", "-fn", str(clone), check=False).returncode == 0
    view = tmp_path / "view"
    snapshots.mount(man.id, view, state)  # plain `ro` on a read-only loop device
    try:
        _assert_holds(read_records(view / "records.log"), _acked_before_freeze(w, man))
    finally:
        snapshots.umount(str(view), state)

    assert w.acked_before(t_crash) > 0
    assert "needs_recovery" in _ext4_features(crash)  # the freeze is why the clone is clean
    assert summary["errors"] == 0
    w.verify(summary["acked"])


def test_xfs_clone_mounts_norecovery_complete(loopfs, writer_factory, tmp_path):
    pair = image_on_reflink_host(loopfs, "xfs", "xfs")
    w = writer_factory(pair.inner.path)
    _wait_for_acks(w)
    crash = pair.outer.mountpoint / "crash.img"
    t_crash = _plain_clone(pair.inner.image, crash)
    state = tmp_path / "state"
    man = snapshots.create([pair.inner.path], "reflink", state_dir=state)
    w.stop()
    clone = Path(man.snapshots[0].location)

    log = _xfs_log_items(clone)
    assert "SUPER Block" in log and "INODE:" not in log  # only the cover records
    view = tmp_path / "view"
    snapshots.mount(man.id, view, state)
    try:
        opts = set(sh("findmnt", "-no", "OPTIONS", str(view)).stdout.strip().split(","))
        assert {"ro", "nouuid", "norecovery"} <= opts
        _assert_holds(read_records(view / "records.log"), _acked_before_freeze(w, man))
    finally:
        snapshots.umount(str(view), state)
    # xfs_repair -n judges only a replayed log: replay it on a writable reflink copy.
    replayed = pair.outer.mountpoint / "replayed.img"
    sh("cp", "--reflink=always", str(clone), str(replayed))
    sh("mount", "-o", "loop,nouuid", str(replayed), str(view))
    sh("umount", str(view))
    assert sh("xfs_repair", "-n", str(replayed), check=False).returncode == 0

    # Contrast: the crash clone's log still holds the writer's inode updates, and without
    # recovery its view misses records that were acknowledged before the clone.
    assert "INODE:" in _xfs_log_items(crash)
    sh("mount", "-o", "loop,ro,nouuid,norecovery", str(crash), str(view))
    try:
        f = view / "records.log"
        seen = len(read_records(f)) if f.exists() else 0
    finally:
        sh("umount", str(view))
    assert seen < w.acked_before(t_crash)


def test_btrfs_snapshot_holds_every_acknowledged_record(loopfs, writer_factory, tmp_path):
    fs = loopfs("btrfs")
    w = writer_factory(fs.path)
    _wait_for_acks(w)
    man = snapshots.create([fs.path], "btrfs", state_dir=tmp_path)
    summary = w.stop()
    snap = man.snapshots[0]
    acked = w.acked_before(snap.extra["monotonic_ns"] / 1e9)
    assert acked >= 30
    _assert_holds(read_records(Path(snap.location) / "records.log"), acked)
    assert summary["errors"] == 0
    snapshots.delete(man.id, tmp_path)
