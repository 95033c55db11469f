"""`quiesce restore`: a job's backup back into a directory, from real restic and tar
backups of real reflink snapshots; refusals change nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.backup_tree import make_tree
from helpers.snaptools import image_on_reflink_host

from quiesce.errors import ExitCode
from quiesce.providers.base import volume_slug

pytestmark = pytest.mark.timeout(240)


def _quiesce(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "quiesce", *args], capture_output=True, text=True, timeout=200
    )


def _job(tmp_path: Path, volume: str, backup: str) -> Path:
    job = tmp_path / "nightly.toml"
    job.write_text(
        f'volumes = ["{volume}"]\nstate_dir = "{tmp_path / "state"}"\n'
        '[provider]\ntype = "reflink"\n\n'
        f'[backup]\nmount_root = "{tmp_path / "run"}"\nverify = "none"\n{backup}\n'
    )
    job.chmod(0o600)
    return job


def _same_tree(origin: Path, restored: Path, files: list[str]) -> None:
    for rel in files:
        assert (restored / rel).read_bytes() == (origin / rel).read_bytes(), rel
    assert (restored / "d1" / "private").stat().st_mode & 0o777 == 0o600
    assert (restored / "d0" / "link").readlink() == Path("sub0/f000.bin")


def test_restic_restore_of_the_newest_backup_and_refusals(loopfs, tmp_path):
    pair = image_on_reflink_host(loopfs, "ext4")
    origin = pair.inner.mountpoint
    files = make_tree(origin / "data", n_files=12)
    (tmp_path / "pw").write_text("secret")
    job = _job(
        tmp_path, pair.inner.path,
        f'target = "restic"\nrepository = "{tmp_path / "repo"}"\n'
        f'password_file = "{tmp_path / "pw"}"\ninit = true\n',
    )  # fmt: skip
    slug = volume_slug(pair.inner.path)

    none_yet = _quiesce("restore", str(job), str(tmp_path / "none"))
    assert none_yet.returncode == ExitCode.USAGE, none_yet.stderr
    assert "job nightly has no backup yet" in none_yet.stderr
    assert not (tmp_path / "none").exists()

    assert _quiesce("run", str(job)).returncode == 0
    (origin / "data" / "d0" / "later.txt").write_text("second night")
    assert _quiesce("run", str(job)).returncode == 0

    dest = tmp_path / "restore"
    r = _quiesce("restore", str(job), str(dest), "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["target"] == "restic" and res["volumes"] == [slug]
    assert res["files"] >= len(files) + 1 and res["dest"] == str(dest)
    _same_tree(origin / "data", dest / slug / "data", files)
    assert (dest / slug / "data" / "d0" / "later.txt").read_text() == "second night"  # newest

    # refusals: a non-empty directory, an unknown volume, an unknown backup id
    again = _quiesce("restore", str(job), str(dest))
    assert again.returncode == ExitCode.USAGE
    assert f"quiesce: {dest} is not an empty directory" in again.stderr
    assert (dest / slug / "data" / "d0" / "later.txt").exists()  # untouched
    other = tmp_path / "other"
    bad = _quiesce("restore", str(job), str(other), "--volume", "srv-nope")
    assert bad.returncode == ExitCode.USAGE
    assert "has no volume srv-nope" in bad.stderr and not other.exists()
    unknown = _quiesce("restore", str(job), str(other), "--backup", "zzzz")
    assert unknown.returncode == ExitCode.USAGE
    assert "'zzzz' is not a backup of this job" in unknown.stderr and not other.exists()


def test_tar_restore_checks_the_stream_first(loopfs, tmp_path):
    pair = image_on_reflink_host(loopfs, "ext4")
    origin = pair.inner.mountpoint
    files = make_tree(origin / "data", n_files=6)
    tars = tmp_path / "tars"
    job = _job(tmp_path, pair.inner.path, f'target = "tar"\ndirectory = "{tars}"\n')
    slug = volume_slug(pair.inner.path)
    assert _quiesce("run", str(job)).returncode == 0
    [stream] = tars.glob("*.tar.zst")

    dest = tmp_path / "restore"
    r = _quiesce("restore", str(job), str(dest), "--backup", stream.name[:10])  # a prefix
    assert r.returncode == 0, r.stderr
    assert f"restored tar backup {stream.name}" in r.stdout
    _same_tree(origin / "data", dest / slug / "data", files)

    with open(stream, "r+b") as f:  # one flipped byte
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 0xFF]))
    broken = tmp_path / "broken"
    r = _quiesce("restore", str(job), str(broken))
    assert r.returncode == ExitCode.BACKUP, r.stderr
    assert f"the tar backup {stream.name} is damaged" in r.stderr
    assert not broken.exists()
