"""btrfs provider: read-only subvolume snapshots through BTRFS_IOC_SNAP_CREATE_V2.

Real btrfs on a loop device. The provider never freezes (a btrfs snapshot blocks on a
frozen btrfs), so the manifest has no window.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.snaptools import Recorder, sh
from typer.testing import CliRunner

from quiesce import snapshot as snapshots
from quiesce.cli.snapshot import snapshot_app
from quiesce.errors import UsageError
from quiesce.providers.base import volume_slug
from quiesce.providers.btrfs import BTRFS_IOC_SNAP_CREATE_V2, snap_create_args


@pytest.fixture
def subvol_mounts(loopfs, tmp_path) -> Iterator[list[Path]]:
    """A btrfs with subvolumes a and b, each also mounted on its own (subvol=)."""
    fs = loopfs("btrfs")
    mounts: list[Path] = []
    try:
        for name in ("a", "b"):
            sh("btrfs", "subvolume", "create", str(fs.mountpoint / name))
            mnt = tmp_path / f"sub-{name}"
            mnt.mkdir()
            sh("mount", "-o", f"subvol={name}", fs.device, str(mnt))
            mounts.append(mnt)
        yield mounts
    finally:
        for mnt in reversed(mounts):
            sh("umount", str(mnt), check=False)


def test_ioctl_layout():
    assert BTRFS_IOC_SNAP_CREATE_V2 == 0x50009417  # _IOW(0x94, 23, 4096 bytes)
    args = snap_create_args(7, "snap")
    assert len(args) == 4096 and args[0] == 7 and args[16] == 2  # fd, flags=RDONLY
    assert bytes(args[56:61]) == b"snap\0"
    with pytest.raises(UsageError):
        snap_create_args(7, "a/b")


def test_two_subvolumes_back_to_back_read_only(subvol_mounts, tmp_path):
    a, b = subvol_mounts
    (a / "data").write_text("a1")
    (b / "data").write_text("b1")
    log: list[str] = []
    man = snapshots.create(
        [str(a), str(b)], "btrfs", job="sv", state_dir=tmp_path / "s",
        quiescers=[Recorder("app", log)],
    )  # fmt: skip
    assert log == ["app.before_freeze", "app.after_thaw(True)"]
    assert man.freeze_mode == "none" and man.window is None
    assert man.consistency == "per-volume"  # a hook cannot make two snapshots one instant
    assert "not one atomic instant" in man.consistency_reason
    locs = [Path(s.location) for s in man.snapshots]
    assert locs == [m / ".snapshots" / f"{man.id}--{volume_slug(str(m))}" for m in (a, b)]
    (a / "data").write_text("a2")
    assert (locs[0] / "data").read_text() == "a1"
    assert (locs[1] / "data").read_text() == "b1"
    for loc in locs:
        assert sh("btrfs", "property", "get", "-ts", str(loc), "ro").stdout.strip() == "ro=true"
        with pytest.raises(OSError) as err:
            (loc / "new").write_text("x")
        assert err.value.errno == errno.EROFS
    snapshots.delete(man.id, tmp_path / "s")
    assert not any(loc.exists() for loc in locs)


def test_one_subvolume_is_filesystem_consistent_and_mounts(loopfs, tmp_path):
    fs = loopfs("btrfs")
    (fs.mountpoint / "f").write_text("x")
    state = tmp_path / "s"
    man = snapshots.create([fs.path], "btrfs", state_dir=state)
    assert man.consistency == "atomic"
    assert "atomic" in man.consistency_reason
    view = tmp_path / "view"
    snapshots.mount(man.id, view, state)
    try:
        assert (view / "f").read_text() == "x"
        opts = sh("findmnt", "-no", "OPTIONS", str(view)).stdout
        assert opts.startswith("ro,nosuid,nodev,noexec")
        with pytest.raises(UsageError, match="is mounted at"):
            snapshots.delete(man.id, state)
        with pytest.raises(UsageError, match="no quiesce snapshot is mounted"):
            snapshots.umount(fs.path, state)
    finally:
        assert snapshots.umount(man.id, state) == [str(view)]
    snapshots.delete(man.id, state)


def test_plain_directory_and_other_filesystems_are_refused(loopfs, tmp_path):
    fs = loopfs("btrfs")
    (fs.mountpoint / "dir").mkdir()
    inner = loopfs.bind(fs.mountpoint / "dir")
    with pytest.raises(UsageError, match="not a subvolume"):
        snapshots.create([str(inner)], "btrfs", state_dir=tmp_path / "s")
    ext4 = loopfs("ext4")
    with pytest.raises(UsageError, match="not btrfs"):
        snapshots.create([ext4.path], "btrfs", state_dir=tmp_path / "s")
    with pytest.raises(UsageError, match="not on the btrfs"):
        snapshots.create(
            [fs.path], "btrfs", options={"dest": str(tmp_path)}, state_dir=tmp_path / "s"
        )


def test_group_without_hooks_is_crash_consistent_and_cli_mounts(subvol_mounts, tmp_path):
    a, b = subvol_mounts
    runner = CliRunner()
    env = {snapshots.STATE_ENV: str(tmp_path / "s")}
    r = runner.invoke(snapshot_app, ["create", "-p", "btrfs", "--json", str(a), str(b)], env=env)
    assert r.exit_code == 0, r.output
    man = json.loads(r.stdout)
    assert (
        man["consistency"] == "per-volume" and "not one atomic instant" in man["consistency_reason"]
    )
    view = tmp_path / "view"
    r = runner.invoke(snapshot_app, ["mount", man["id"], str(view)], env=env)
    assert r.exit_code == 0, r.output
    try:
        slugs = sorted(p.name for p in view.iterdir())
        assert slugs == sorted(volume_slug(str(m)) for m in (a, b))
        r = runner.invoke(snapshot_app, ["delete", man["id"]], env=env)
        assert r.exit_code == 2 and "is mounted at" in r.stderr
    finally:
        r = runner.invoke(snapshot_app, ["umount", man["id"]], env=env)
    assert r.exit_code == 0 and r.stdout.count("unmounted") == 2
    r = runner.invoke(snapshot_app, ["delete", man["id"]], env=env)
    assert r.exit_code == 0, r.output
    assert not (a / ".snapshots" / f"{man['id']}--{volume_slug(str(a))}").exists()


def _proc_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def _subvolumes(fs) -> list[Path]:
    d = fs.mountpoint / ".snapshots"
    return sorted(d.iterdir()) if d.is_dir() else []


def test_sigkill_during_a_group_snapshot_then_cleanup_removes_the_subvolumes(loopfs, tmp_path):
    """One volume of the group is frozen by someone else: the btrfs ioctl blocks on it, and
    the run is SIGKILLed there. The subvolumes it made (the blocked one completes at the
    thaw) have no manifest; they were journaled first, so `quiesce cleanup` deletes them."""
    a, b = loopfs("btrfs"), loopfs("btrfs")
    for fs in (a, b):
        (fs.mountpoint / "data").write_text(fs.path)
    (b.mountpoint / ".snapshots").mkdir(mode=0o700)  # prepare must not block on b (mkdir)
    state = tmp_path / "state"
    env = {**os.environ, "QUIESCE_STATE_DIR": str(state)}
    b.freeze_externally()
    proc = None
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "quiesce", "snapshot", "create", "--provider", "btrfs",
             "--job", "killed", a.path, b.path],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        blocked = 0
        deadline = time.monotonic() + 60
        while blocked < 10:  # 0.5 s in uninterruptible sleep: the ioctl waits for b's thaw
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the snapshot never blocked on the frozen volume"
            blocked = blocked + 1 if _proc_state(proc.pid) == "D" else 0
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        b.thaw_externally()
        if proc is not None:
            proc.kill()
            proc.wait(timeout=60)
    left = _subvolumes(a) + _subvolumes(b)
    assert left, "the killed run left no subvolume (nothing to test)"
    assert snapshots.list_manifests(state) == []
    p = subprocess.run(
        [sys.executable, "-m", "quiesce", "cleanup", "--state-dir", str(state), "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    removed = json.loads(p.stdout)["removed"]
    assert {r["snapshot"]["location"] for r in removed if r["kind"] == "snapshot"} >= {
        str(s) for s in left
    }
    assert _subvolumes(a) == [] and _subvolumes(b) == []
    assert not (a.mountpoint / ".snapshots").exists()  # made by the run: removed too
    assert (b.mountpoint / ".snapshots").is_dir()  # made by the test: kept
    assert [(fs.mountpoint / "data").read_text() for fs in (a, b)] == [a.path, b.path]
