"""Guest disk snapshots (the ``qemu`` provider) through the backup phase, without a guest.

The disk images are loop filesystems a test made on an XFS reflink filesystem, mounted on
this host; the agent is tests/helpers/fakeqga.py (the QGA protocol, FIFREEZE/FITHAW on
those mounts). The job path is the product's own: load_job, run_job, the backup phase,
restic, restore. What a real guest and its agent do is the VM tier's
(tests/vm/test_vm_qga.py, ``test_backup_of_a_guest_snapshot_restores_every_acknowledged_record``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.backup_tree import change_some, make_tree
from helpers.fakeqga import FakeAgent
from helpers.snaptools import sh

from quiesce import snapshot as snapshots
from quiesce.backup.restoring import restore
from quiesce.errors import ExitCode
from quiesce.host import images
from quiesce.job.run import run_job
from quiesce.job.validate import load_job
from quiesce.state.statedir import journal_dir

pytestmark = pytest.mark.timeout(300)


def _sfdisk(image: Path, label: str) -> None:
    if shutil.which("sfdisk") is None:
        pytest.skip(
            "sfdisk is not installed (scripts/backup-setup.sh; Debian: apt-get install fdisk)"
        )
    subprocess.run(
        ["sfdisk", "-q", str(image)], input=f"label: {label}\n,\n", text=True, check=True,
        capture_output=True, timeout=60,
    )  # fmt: skip


def _quiesce(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "quiesce", *args], capture_output=True, text=True, timeout=300
    )


def _job(tmp_path: Path, host: str, agent: Path, disks: list[Path]) -> Path:
    job = tmp_path / "vms.toml"
    disk_list = ", ".join(f'"{d}"' for d in disks)
    (tmp_path / "pw").write_text("secret")
    (tmp_path / "pw").chmod(0o600)
    job.write_text(
        f'name = "vms"\nvolumes = ["{host}"]\nstate_dir = "{tmp_path / "state"}"\n\n'
        '[provider]\ntype = "qemu"\n\n'
        f'[[provider.guests]]\nname = "vm1"\nagent = "{agent}"\nimages = [{disk_list}]\n\n'
        f'[backup]\ntarget = "restic"\nrepository = "{tmp_path / "repo"}"\n'
        f'password_file = "{tmp_path / "pw"}"\ninit = true\nhost = "h"\n'
        f'mount_root = "{tmp_path / "run"}"\nverify = "sample"\nsample_files = 6\n'
        f'verify_dir = "{tmp_path}"\n\n[retention]\nkeep_last = 1\n'
    )
    job.chmod(0o600)
    return job


@pytest.fixture
def guest_disks(loopfs, tmp_path: Path) -> Iterator[tuple[str, list, FakeAgent]]:
    """Two guest disks (ext4, xfs: bare filesystems) as images on an XFS reflink host
    filesystem, mounted here, and an agent that freezes them."""
    host = loopfs("xfs", size_mb=800)
    disks = [loopfs("ext4", image_dir=host.mountpoint), loopfs("xfs", image_dir=host.mountpoint)]
    agent = FakeAgent(tmp_path / "qga.sock", [d.mountpoint for d in disks])
    try:
        yield host.path, disks, agent
    finally:
        agent.close()


def test_a_guest_job_snapshots_backs_up_verifies_restores_and_prunes(guest_disks, tmp_path):
    """provider.type = "qemu" with [backup]: each disk clone is mounted read-only as the
    filesystem it holds and backed up file by file; the second run is incremental,
    retention keeps one snapshot, one file restores by itself, nothing is left."""
    host, disks, agent = guest_disks
    trees = [make_tree(d.mountpoint / "data", n_files=12, seed=i + 1) for i, d in enumerate(disks)]
    job_file = _job(tmp_path, host, agent.path, [d.image for d in disks])
    state = tmp_path / "state"

    first = run_job(load_job(job_file))
    assert first.error is None and first.backup is not None, first.error
    bk = first.backup
    assert bk["ok"] and bk["verify"]["ok"] and bk["verify"]["files_checked"] == 6, bk
    assert [m["fstype"] for m in bk["mounts"]] == ["ext4", "xfs"]
    assert {"ro", "noexec", "nouuid", "norecovery"} <= set(bk["mounts"][1]["options"].split(","))
    assert bk["backup"]["files"] == sum(len(t) for t in trees)
    assert (
        agent.calls.count("guest-fsfreeze-freeze") == 1 == agent.calls.count("guest-fsfreeze-thaw")
    )
    names = [p.name for p in first.phases]
    assert names[names.index("window") :] == [
        "window", "provider_after_thaw", "backup: cleanup", "backup: init", "backup: mount",
        "backup: backup", "backup: verify", "backup: umount", "backup: retention",
        "backup: prune",
    ]  # fmt: skip

    changed = change_some(disks[0].mountpoint / "data", trees[0], 0.25)
    second = run_job(load_job(job_file))
    assert second.error is None, second.error
    r = second.backup["backup"]
    assert (r["files_unmodified"], r["files_changed"]) == (
        sum(len(t) for t in trees) - len(changed), len(changed)
    )  # fmt: skip
    assert second.backup["retention"]["deleted"] == [first.manifest_id]
    assert [m.id for m in snapshots.list_manifests(state)] == [second.manifest_id]

    # a single file of the first disk, restored from the newest backup
    cfg = load_job(job_file).config.backup
    assert cfg is not None
    slug = second.backup["mounts"][0]["slug"]
    got = restore(cfg, job="vms", state=state, dest=tmp_path / "restored", volumes=[slug])
    assert got.volumes == [slug]
    rel = changed[0]
    assert (tmp_path / "restored" / slug / "data" / rel).read_bytes() == (
        disks[0].mountpoint / "data" / rel
    ).read_bytes()
    # `quiesce snapshot mount` sees the disks as the backup does: their filesystems
    at = tmp_path / "look"
    points = snapshots.mount(second.manifest_id, at, state)
    try:
        assert len(points) == 2
        assert (Path(points[0]) / "data" / rel).read_bytes() == (
            disks[0].mountpoint / "data" / rel
        ).read_bytes()
    finally:
        snapshots.umount(str(at), state)
    # nothing left: mounts, loop devices of the clones, journal entries
    assert not any((tmp_path / "run" / "vms").glob("*"))
    assert list(journal_dir(state).iterdir()) == []
    loops = sh("losetup", "-a").stdout
    clones = snapshots.load(second.manifest_id, state).snapshot_objects()
    assert not any(s.location in loops for s in clones)


def test_a_disk_with_a_partition_table_is_refused_before_anything_is_mounted(guest_disks, tmp_path):
    """A guest disk holding a partition table (not one bare filesystem): the snapshot is
    made and kept, the backup phase refuses the whole snapshot with one line naming the
    disk and what it holds (exit 12), mounts nothing and backs up nothing."""
    host, disks, agent = guest_disks
    parted = Path(host) / "parted.raw"
    with open(parted, "wb") as f:
        f.truncate(64 << 20)
    _sfdisk(parted, "gpt")
    job_file = _job(tmp_path, host, agent.path, [disks[0].image, parted])

    # `quiesce check` finds it first, from the live image, at its TOML key
    p = _quiesce("check", "--json", str(job_file))
    assert p.returncode == 2, p.stderr
    problems = json.loads(p.stdout)["problems"]
    assert [x["path"] for x in problems] == ["provider.guests[0].images[1]"], problems
    [problem] = problems
    assert "holds a partition table (gpt)" in problem["message"]

    report = run_job(load_job(job_file))
    assert report.exit_code == ExitCode.BACKUP == 12
    msg = report.error["message"]
    assert msg.startswith(f"guest vm1: the clone of {parted} holds a partition table (gpt)"), msg
    assert "\n" not in msg and "mkfs on the whole raw disk" in report.error["hint"]
    assert [p.name for p in report.phases if p.name.startswith("backup: ")][-1] == "backup: mount"
    assert report.backup["mounts"] == [] and report.backup["backup"] is None
    [man] = snapshots.list_manifests(tmp_path / "state")  # the snapshot was kept
    assert man.id == report.manifest_id
    assert not any((tmp_path / "run").rglob("*"))  # nothing was mounted
    assert list(journal_dir(tmp_path / "state").iterdir()) == []

    # `quiesce backup` says the same, on one line, with the same exit code
    p = _quiesce("backup", str(job_file))
    assert p.returncode == 12, p.stderr
    [line] = [x for x in p.stderr.splitlines() if x.startswith("quiesce: ")]
    assert line.startswith("quiesce: guest vm1: the clone of") and "partition table" in line


@pytest.mark.parametrize(
    ("make", "fstype", "what"),
    [
        ("ext4", "ext4", "a filesystem (ext4)"),
        ("gpt", None, "a partition table (gpt)"),
        ("dos", None, "a partition table (dos)"),
        ("swap", None, "swap space"),
        ("zeros", None, "no filesystem or partition table blkid knows"),
        ("qcow2", None, "a qcow2 image"),
    ],
)
def test_what_an_image_holds(tmp_path, make, fstype, what):
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(64 << 20)
    if make == "ext4":
        sh("mkfs.ext4", "-q", "-F", str(img))
    elif make in ("gpt", "dos"):
        _sfdisk(img, make)
    elif make == "swap":
        sh("mkswap", str(img))
    elif make == "qcow2":
        img.unlink()
        if shutil.which("qemu-img") is None:
            pytest.skip("qemu-img is not installed (Debian: apt-get install qemu-utils)")
        sh("qemu-img", "create", "-q", "-f", "qcow2", str(img), "64M")
    got = images.contents(str(img))
    assert (got.fstype, got.what) == (fstype, what)
