"""What a killed run leaves behind, and that the next run is not broken by it (issue 11)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.snaptools import image_on_reflink_host

from quiesce import snapshot as snapshots
from quiesce.backup.targets.restic import ResticTarget
from quiesce.state.statedir import journal_dir


def _quiesce(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "quiesce", *args], capture_output=True, text=True, timeout=600
    )


def _descendants(pid: int) -> list[int]:
    found: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        for kids in Path(f"/proc/{p}/task").glob("*/children"):
            try:
                more = [int(k) for k in kids.read_text().split()]
            except OSError:
                continue
            found += more
            todo += more
    return found


def _restic_backup_of(pid: int) -> int | None:
    for kid in _descendants(pid):
        try:
            argv = Path(f"/proc/{kid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[0].endswith(b"restic") and b"backup" in argv:
            return kid
    return None


def _restic_job(tmp_path: Path, volume: str) -> Path:
    pw = tmp_path / "pw"
    pw.write_text("secret")
    pw.chmod(0o600)
    job = tmp_path / "nightly.toml"
    job.write_text(
        f'volumes = ["{volume}"]\nstate_dir = "{tmp_path / "state"}"\n'
        '[provider]\ntype = "reflink"\n\n'
        f'[backup]\ntarget = "restic"\nrepository = "{tmp_path / "repo"}"\n'
        f'password_file = "{pw}"\ninit = true\nverify = "none"\n'
        f'mount_root = "{tmp_path / "run"}"\n'
    )
    job.chmod(0o600)
    return job


@pytest.mark.parametrize("also_quiesce", [False, True], ids=["restic-killed", "both-killed"])
def test_a_sigkilled_restic_leaves_no_lock_that_breaks_the_next_run(
    loopfs, tmp_path: Path, also_quiesce: bool
) -> None:
    """restic SIGKILLed mid-backup cannot remove its lock: quiesce's own rollback (or,
    when quiesce died too, `quiesce cleanup`) removes it, and the next backup succeeds.
    It used to fail with exit 12, "repository is already locked", for ever."""
    pair = image_on_reflink_host(loopfs, "xfs")
    big = pair.inner.mountpoint / "big"
    with open(big, "wb") as f:
        f.truncate(1 << 40)  # restic reads zeros for a long time; no space used
    job = _restic_job(tmp_path, pair.inner.path)
    state = tmp_path / "state"
    snapshots.create([pair.inner.path], "reflink", job="nightly", state_dir=state)
    repo = ResticTarget(str(tmp_path / "repo"), password_file=str(tmp_path / "pw"), job="nightly")
    run = subprocess.Popen(
        [sys.executable, "-m", "quiesce", "backup", str(job)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        until = time.monotonic() + 120
        restic = None
        while time.monotonic() < until:
            restic = _restic_backup_of(run.pid)
            if restic and repo._child("list", "locks", "--no-lock").stdout.strip():
                break
            time.sleep(0.2)
        assert restic, "restic backup never started"
        if also_quiesce:
            run.send_signal(signal.SIGSTOP)  # so that it cannot clean up after restic
        os.kill(restic, signal.SIGKILL)
        if also_quiesce:
            run.send_signal(signal.SIGKILL)
        run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode != 0
    if also_quiesce:
        # its lock is there, with a pid that is gone: cleanup removes it
        assert repo._child("list", "locks", "--no-lock").stdout.strip()
        p = _quiesce("cleanup", "--state-dir", str(state), "--json")
        assert p.returncode == 0, p.stderr
        kinds = [r["kind"] for r in json.loads(p.stdout)["removed"]]
        assert "repository" in kinds and "mount" in kinds
        assert "secret" not in p.stdout and "config" not in p.stdout
    assert repo._child("list", "locks", "--no-lock").stdout.strip() == ""
    assert list(journal_dir(state).iterdir()) == []

    big.unlink()
    snapshots.create([pair.inner.path], "reflink", job="nightly", state_dir=state)
    p = _quiesce("backup", str(job))
    assert p.returncode == 0, p.stderr


def test_cleanup_leaves_a_live_restics_lock_alone(tmp_path: Path) -> None:
    """Only a dead process's lock on this host is stale: a live restic's lock stays."""
    pw = tmp_path / "pw"
    pw.write_text("secret")
    repo = ResticTarget(str(tmp_path / "repo"), password_file=str(pw), job="t")
    repo.init()
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "sparse", "wb") as f:
        f.truncate(1 << 40)
    live = subprocess.Popen(
        ["restic", "backup", "--json", "."], cwd=src, env=os.environ | repo.env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        until = time.monotonic() + 60
        while not repo._child("list", "locks", "--no-lock").stdout.strip():
            assert time.monotonic() < until and live.poll() is None
            time.sleep(0.1)
        assert repo.remove_stale_locks() == []
        assert repo._child("list", "locks", "--no-lock").stdout.strip()
        os.kill(live.pid, signal.SIGKILL)
        live.wait()
        [removed] = repo.remove_stale_locks()
        assert f"(pid {live.pid})" in removed
        assert repo._child("list", "locks", "--no-lock").stdout.strip() == ""
    finally:
        if live.poll() is None:
            live.kill()
            live.wait()


def test_thaw_of_two_bind_mounts_of_one_volume_thaws_once_and_succeeds(loopfs) -> None:
    """`freeze b1 b2` of one filesystem worked, `thaw b1 b2` thawed, then exited 7 (the
    second path was not frozen any more)."""
    from conftest import is_writable, thaw_quietly

    fs = loopfs("ext4")
    b1, b2 = loopfs.bind(fs.mountpoint), loopfs.bind(fs.mountpoint)
    try:
        p = _quiesce("freeze", "--timeout", "60", str(b1), str(b2))
        assert p.returncode == 0, p.stderr
        assert not is_writable(fs.path, timeout=0.5)
        p = _quiesce("thaw", "--json", str(b1), str(b2))
        assert p.returncode == 0, p.stdout + p.stderr
        results = json.loads(p.stdout)["results"]
        assert [r["path"] for r in results] == [str(b1), str(b2)]
        assert results[1]["thawed_by"] == f"with {b1}"
        assert is_writable(fs.path)
        # a volume that is not frozen still says so
        p = _quiesce("thaw", str(b1))
        assert p.returncode == 7, p.stderr
    finally:
        thaw_quietly(fs.path)


def test_borg_removes_a_sigkilled_borgs_lock_by_itself(tmp_path: Path) -> None:
    """borg 1.2 takes over the stale lock of a dead process of this host on its own
    (BORG_HOSTNAME_IS_UNIQUE=yes, its default): nothing for quiesce to unlock."""
    from quiesce.backup.targets.borg import BorgTarget

    pw = tmp_path / "pw"
    pw.write_text("secret")
    borg = BorgTarget(str(tmp_path / "repo"), password_file=str(pw), job="t")
    borg.init()
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "sparse", "wb") as f:
        f.truncate(1 << 40)
    env = {k: v for k, v in os.environ.items() if k != "BORG_HOSTNAME_IS_UNIQUE"}
    live = subprocess.Popen(
        ["borg", "create", "::big", "."], cwd=src, env=env | borg.env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        until = time.monotonic() + 60
        while not (tmp_path / "repo" / "lock.exclusive").exists():
            assert time.monotonic() < until and live.poll() is None
            time.sleep(0.1)
        time.sleep(1)
        os.kill(live.pid, signal.SIGKILL)
        live.wait()
    finally:
        if live.poll() is None:
            live.kill()
            live.wait()
    assert (tmp_path / "repo" / "lock.exclusive").exists()  # left behind
    (src / "sparse").unlink()
    (src / "small").write_text("x")
    result = borg.backup(src, paths=["small"])
    assert result.snapshot_id
    assert not (tmp_path / "repo" / "lock.exclusive").exists()
