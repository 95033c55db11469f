"""`quiesce snapshot mount/umount` on the snapshot layer's journaled read-only mounts
(issue 11 and 14): a multi-volume mount is undone by `umount DIR`, unique id prefixes
are taken, a crash half-way is cleaned up, a deliberate mount is left alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from helpers.snaptools import sh

from quiesce import snapshot as snapshots
from quiesce.state.statedir import journal_dir


def _quiesce(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "quiesce", *args], capture_output=True, text=True, timeout=300
    )


def _two_volumes(loopfs, tmp_path: Path):
    host = loopfs("xfs")
    a = loopfs("ext4", image_dir=host.mountpoint)
    b = loopfs("ext4", image_dir=host.mountpoint)
    (a.mountpoint / "fa").write_text("A")
    (b.mountpoint / "fb").write_text("B")
    state = tmp_path / "state"
    man = snapshots.create([a.path, b.path], "reflink", job="two", state_dir=state)
    return man, state


def _loops_of(man) -> str:
    out = sh("losetup", "-a").stdout
    return "\n".join(line for line in out.splitlines() for s in man.snapshots if s.location in line)


def test_multi_volume_mount_by_prefix_then_umount_dir(loopfs, tmp_path: Path) -> None:
    man, state = _two_volumes(loopfs, tmp_path)
    where = tmp_path / "view"
    prefix = man.id[: len("two-") + 6]
    p = _quiesce("snapshot", "mount", prefix, str(where), "--state-dir", str(state))
    assert p.returncode == 0, p.stderr
    try:
        slugs = sorted(d.name for d in where.iterdir())
        assert len(slugs) == 2
        assert {(where / s / f).read_text() for s in slugs for f in ("fa", "fb")
                if (where / s / f).exists()} == {"A", "B"}  # fmt: skip
        opts = sh("findmnt", "-no", "OPTIONS", str(where / slugs[0])).stdout
        assert {"ro", "nosuid", "nodev", "noexec"} <= set(opts.strip().split(","))
        # a deliberate mount: cleanup leaves it alone, and no journal stays
        assert _quiesce("cleanup", "--state-dir", str(state)).returncode == 0
        assert all(os.path.ismount(where / s) for s in slugs)
        assert not list(journal_dir(state).glob("*.jsonl"))
        p = _quiesce("snapshot", "umount", str(where), "--state-dir", str(state))
        assert p.returncode == 0, p.stderr
        assert sorted(p.stdout.split()) == sorted(
            ["unmounted", "unmounted", *(str(where / s) for s in slugs)]
        )
    finally:
        for s in os.listdir(where) if where.exists() else []:
            if os.path.ismount(where / s):
                sh("umount", str(where / s), check=False)
    assert list(where.iterdir()) == []  # the slug directories it made are gone
    assert _loops_of(man) == ""  # its loop devices are detached
    # delete takes the prefix too
    p = _quiesce("snapshot", "delete", prefix, "--state-dir", str(state))
    assert p.returncode == 0, p.stderr
    assert snapshots.list_manifests(state) == []


def test_ambiguous_prefix_lists_the_candidates(loopfs, tmp_path: Path) -> None:
    fs_host = loopfs("xfs")
    fs = loopfs("ext4", image_dir=fs_host.mountpoint)
    state = tmp_path / "state"
    one = snapshots.create([fs.path], "reflink", job="amb", state_dir=state)
    two = snapshots.create([fs.path], "reflink", job="amb", state_dir=state)
    for cmd in (["mount", "amb-", str(tmp_path / "v")], ["umount", "amb-"], ["delete", "amb-"]):
        p = _quiesce("snapshot", *cmd, "--state-dir", str(state))
        assert p.returncode == 2, (cmd, p.stderr)
        assert "ambiguous" in p.stderr and one.id in p.stderr and two.id in p.stderr
    assert len(snapshots.list_manifests(state)) == 2
    assert not (tmp_path / "v").exists() or not os.path.ismount(tmp_path / "v")


CRASH = r"""
import os, sys
from quiesce.snapshot import readonly

real = readonly._mount
def mount_then_die(*a, **kw):
    err = real(*a, **kw)
    os.kill(os.getpid(), 9)
readonly._mount = mount_then_die
from quiesce import snapshot
snapshot.mount(sys.argv[1], sys.argv[2], sys.argv[3])
"""


def test_a_crash_mid_mount_is_cleaned_up(loopfs, tmp_path: Path) -> None:
    man, state = _two_volumes(loopfs, tmp_path)
    where = tmp_path / "view"
    p = subprocess.run(
        [sys.executable, "-c", CRASH, man.id, str(where), str(state)], capture_output=True
    )
    assert p.returncode == -signal.SIGKILL
    [slug] = [d for d in where.iterdir() if os.path.ismount(d)]
    c = _quiesce("cleanup", "--state-dir", str(state))
    assert c.returncode == 0, c.stderr
    assert f"removed mount: {slug}" in c.stdout
    assert not os.path.ismount(slug) and not slug.exists()
    assert _loops_of(man) == ""
