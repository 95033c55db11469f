"""Read-only mounts of real snapshots at stable paths (backup/mount.py).

Real kernel, real filesystems: reflink clones of ext4 and XFS images taken by
snapshots.create, a btrfs read-only subvolume snapshot, and a crash-consistent ext4
clone (taken without the freeze) that needs the no-journal-replay fallback.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from helpers.snaptools import image_on_reflink_host, sh

from quiesce import snapshot as snapshots
from quiesce.backup.mount import mount_readonly, mounted_snapshots, stable_path, unmount
from quiesce.errors import UsageError
from quiesce.host import kernel
from quiesce.host.mounts import loop_devices_of
from quiesce.providers.registry import get_provider
from quiesce.state.journal import Journal
from quiesce.state.statedir import journal_dir


def _options(path: Path) -> set[str]:
    return set(sh("findmnt", "-no", "OPTIONS", str(path)).stdout.strip().split(","))


def _write_probe(path: Path) -> int:
    """errno of creating a file there (in a child: never write from the test itself)."""
    code = "import os,sys\ntry: open(sys.argv[1], 'w')\nexcept OSError as e: sys.exit(e.errno)"
    return subprocess.run(["python3", "-c", code, str(path / "probe")]).returncode


@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
def test_reflink_snapshot_mounts_read_only_at_a_stable_path(loopfs, tmp_path, fstype):
    pair = image_on_reflink_host(loopfs, fstype)
    origin = pair.inner.mountpoint
    (origin / "data").mkdir()
    (origin / "data" / "a.txt").write_text("before\n")
    state = tmp_path / "state"
    man = snapshots.create([pair.inner.path], "reflink", job="nightly", state_dir=state)
    (origin / "data" / "a.txt").write_text("after the snapshot\n")
    provider = get_provider("reflink")()
    root = tmp_path / "run"
    [snap] = man.snapshot_objects()
    clone = snap.location
    with Journal.open(state, job="nightly") as j:
        with mounted_snapshots(
            man.snapshot_objects(), job="nightly", journal=j, root=root, provider=provider,
            holds=man.id,
        ) as [mv]:  # fmt: skip
            assert mv.path == stable_path("nightly", snap.id.split("/")[1], root)
            assert (mv.path / "data" / "a.txt").read_text() == "before\n"
            opts = _options(mv.path)
            assert {"ro", "nosuid", "nodev", "noexec"} <= opts
            if fstype == "xfs":
                assert {"nouuid", "norecovery"} <= opts
            assert _write_probe(mv.path) == 30  # EROFS
            [dev] = loop_devices_of(clone)
            assert Path(f"/sys/block/{Path(dev).name}/ro").read_text().strip() == "1"
            assert not mv.warnings  # frozen clone: no journal replay needed
            # held while mounted: the snapshot cannot be deleted underneath the backup
            with pytest.raises(UsageError, match="mounted"):
                snapshots.delete(man.id, state)
            # the same stable path cannot be taken twice
            with pytest.raises(UsageError, match="already a mount point"):
                mount_readonly(clone, mv.path, journal=j)
        assert not mv.path.exists() and not (root / "nightly").exists()
        assert loop_devices_of(clone) == []
    assert list(journal_dir(state).iterdir()) == []
    snapshots.delete(man.id, state)


def test_btrfs_subvolume_snapshot_is_bind_mounted_read_only(loopfs, tmp_path):
    fs = loopfs("btrfs")
    (fs.mountpoint / "f").write_text("x")
    state = tmp_path / "state"
    man = snapshots.create([fs.path], "btrfs", job="b", state_dir=state)
    (fs.mountpoint / "f").write_text("changed")
    with Journal.open(state, job="b") as j, mounted_snapshots(
        man.snapshot_objects(), job="b", journal=j, root=tmp_path / "run",
        provider=get_provider("btrfs")(),
    ) as [mv]:  # fmt: skip
        assert (mv.path / "f").read_text() == "x"
        assert {"ro", "nosuid", "nodev", "noexec"} <= _options(mv.path)
        assert _write_probe(mv.path) == 30
        assert (fs.mountpoint / "f").read_text() == "changed"
    assert not (tmp_path / "run" / "b").exists()
    snapshots.delete(man.id, state)


def test_crash_consistent_ext4_clone_mounts_without_replay_and_says_so(loopfs, tmp_path):
    """A clone taken while the ext4 is mounted, without a freeze: needs_recovery is set,
    a read-only device cannot replay the journal, so the mount falls back to noload."""
    pair = image_on_reflink_host(loopfs, "ext4")
    (pair.inner.mountpoint / "f").write_text("x")
    os.sync()
    clone = pair.outer.mountpoint / "crash.img"
    with open(pair.inner.image, "rb") as src, open(clone, "wb") as dst:
        kernel.ficlone(dst.fileno(), src.fileno())
    assert "needs_recovery" in sh("dumpe2fs", "-h", str(clone)).stdout
    target = tmp_path / "run" / "j" / "v"
    with Journal.open(tmp_path / "state", job="j") as j:
        mv = mount_readonly(str(clone), target, journal=j, fstype="ext4", root=tmp_path / "run")
        try:
            assert {"noload", "norecovery"} & _options(target)  # the kernel shows the latter
            assert mv.warnings and "journal recovery" in mv.warnings[0]
            assert (target / "f").read_text() == "x"
        finally:
            unmount(mv, j)
    assert loop_devices_of(str(clone)) == []
    # the clone itself was never written (read-only loop device): still needs recovery
    assert "needs_recovery" in sh("dumpe2fs", "-h", str(clone)).stdout


@pytest.mark.parametrize("block", [1024, 4096])
def test_direct_io_only_where_the_filesystem_block_size_allows(loopfs, tmp_path, block):
    """A reflinked file's direct I/O alignment (4 KiB on XFS) becomes the loop device's
    sector size: a 4 KiB-block ext4 gets direct I/O, a 1 KiB-block one a buffered device."""
    host = loopfs("xfs")
    image = host.mountpoint / "fs.img"
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    sh("mkfs.ext4", "-q", "-F", "-b", str(block), "-d", str(Path(__file__).parent / "helpers"),
       str(image))  # fmt: skip
    clone = host.mountpoint / "clone.img"
    with open(image, "rb") as src, open(clone, "wb") as dst:
        kernel.ficlone(dst.fileno(), src.fileno())
    target = tmp_path / "run" / "j" / "v"
    with Journal.open(tmp_path / "state", job="j") as j:
        mv = mount_readonly(str(clone), target, journal=j, root=tmp_path / "run")
        try:
            dio = Path(f"/sys/block/{Path(mv.source).name}/loop/dio").read_text().strip()
            assert dio == ("1" if block == 4096 else "0")
            assert (target / "backup_tree.py").read_bytes() == (
                Path(__file__).parent / "helpers" / "backup_tree.py"
            ).read_bytes()
        finally:
            unmount(mv, j)
    assert loop_devices_of(str(clone)) == []
