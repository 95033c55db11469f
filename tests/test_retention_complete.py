"""Retention over complete runs only (issue 19): a snapshot whose backup failed or was
killed never counts towards keep_*; it is kept until a newer run is complete, then
deleted, and the report says which. The old behaviour (every snapshot counted) is the
negative control: with keep_last = 2 it would keep the never-backed-up snapshot and
delete the backed-up one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from helpers.backup_tree import make_tree
from helpers.snaptools import image_on_reflink_host

from quiesce import snapshot as snapshots
from quiesce.snapshot.manifest import Manifest
from quiesce.state.retention import RetentionPolicy, decide


def _job(tmp_path: Path, vol: str, name: str, command: list[str] | None = None) -> Path:
    state = tmp_path / "state"
    target = (
        f'command = {json.dumps(command)}\nsha256_dir = "{tmp_path / "sums"}"\n'
        if command
        else f'directory = "{tmp_path / "tars"}"\n'
    )
    job = tmp_path / name
    job.write_text(
        f'name = "nightly"\nvolumes = ["{vol}"]\nstate_dir = "{state}"\n'
        '[provider]\ntype = "reflink"\n\n'
        f'[backup]\nmount_root = "{tmp_path / "run"}"\ntarget = "tar"\nverify = "none"\n'
        + target
        + "\n[retention]\nkeep_last = 2\n"
    )
    job.chmod(0o600)
    return job


def _run(job: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "quiesce", "run", str(job), *args],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_a_killed_backup_never_counts_and_is_removed_after_the_next_complete_run(loopfs, tmp_path):
    pair = image_on_reflink_host(loopfs, "ext4")
    make_tree(pair.inner.mountpoint / "d", n_files=3)
    vol = str(pair.inner.path)
    good = _job(tmp_path, vol, "good.toml")
    # the backup command SIGKILLs the run itself, mid-backup (its parent is quiesce)
    killer = _job(tmp_path, vol, "killer.toml", ["sh", "-c", "kill -9 $PPID; sleep 5"])
    failing = _job(tmp_path, vol, "failing.toml", ["sh", "-c", "cat >/dev/null; exit 3"])
    state = tmp_path / "state"

    first = _run(good)
    assert first.returncode == 0, first.stderr
    killed = _run(killer)
    assert killed.returncode == -9, killed.stderr
    failed = _run(failing)
    assert failed.returncode == 12, failed.stderr
    said = [ln for ln in failed.stderr.splitlines() if ln.startswith(("quiesce:", "warning:"))]
    assert said and len(said) == len(set(said)), failed.stderr  # issue 19: printed twice
    done, pending, broken = snapshots.list_manifests(state)  # oldest first
    assert done.complete and done.backup["ok"]
    assert not pending.complete and pending.backup["state"] == "pending"  # killed
    assert not broken.complete and broken.backup["ok"] is False  # failed: exit 3

    third = _run(good, "--json")
    assert third.returncode == 0, third.stderr
    report = json.loads(third.stdout)
    r = report["backup"]["retention"]
    newest = report["manifest_id"]
    assert sorted(r["incomplete"]["deleted"]) == sorted([pending.id, broken.id])
    assert set(r["kept"]) == {newest, done.id}  # keep_last = 2 over complete runs
    assert {m.id for m in snapshots.list_manifests(state)} == {newest, done.id}
    human = _run(good)
    assert "incomplete" not in human.stdout  # nothing incomplete is left
    assert "retention: kept 2 complete snapshot(s), deleted 1" in human.stdout, human.stdout

    # the negative control: counting every snapshot, as before, keeps the killed one
    times = {m.id: m.created for m in (done, pending, broken)} | {newest: "9999"}
    old = decide(
        {i: _iso(t) for i, t in times.items()}, RetentionPolicy(keep_last=2), held={newest}
    )
    assert done.id in old.delete


def test_an_incomplete_snapshot_is_kept_until_a_complete_run_is_newer(tmp_path):
    m = Manifest(
        id="j-1", job="j", provider="reflink", created="2026-01-01T00:00:00Z", volumes=[],
        snapshots=[], window=None, freeze_mode="fifreeze", consistency="application",
        consistency_reason="", phases=[], backup={"ok": False, "state": "pending"},
    )  # fmt: skip
    assert not m.complete
    assert Manifest.from_dict(m.to_dict()).consistency == "atomic"  # an old name, read
    m.backup = {"ok": True, "verified": False}
    assert not m.complete  # verification configured and failed
    m.backup = {"ok": True, "verified": None}
    assert m.complete
    m.drill = {"ok": False}
    assert not m.complete  # the drill, when configured, must pass too
    m.backup, m.drill = None, None  # no backup asked for: the snapshot is the run
    assert m.complete


def _iso(t: str) -> float:
    from datetime import datetime

    if t == "9999":
        return 4e9
    return datetime.fromisoformat(t.replace("Z", "+00:00")).timestamp()


def test_runs_within_one_second_are_ordered(tmp_path):
    """Load run 2 (a busy machine): a failed run and the next complete one made their
    snapshots in the same second; with second-resolution times the complete run was not
    "newer" and the failed run's snapshot was kept. Times now carry milliseconds; a
    manifest written before (seconds) still sorts and compares."""
    from quiesce.backup.phase import apply_snapshot_retention
    from quiesce.snapshot.store import save_manifest

    def man(snap_id: str, created: str, ok: bool) -> Manifest:
        return Manifest(
            id=snap_id, job="j", provider="reflink", created=created, volumes=[],
            snapshots=[], window=None, freeze_mode="fifreeze", consistency="atomic",
            consistency_reason="", phases=[],
            backup={"ok": True, "verified": None} if ok else {"ok": False},
        )  # fmt: skip

    state = tmp_path / "state"
    save_manifest(state, man("j-old", "2026-01-01T00:00:14Z", True))  # the old format
    save_manifest(state, man("j-failed", "2026-01-01T00:00:15.200Z", False))
    save_manifest(state, man("j-good", "2026-01-01T00:00:15.900Z", True))
    assert [m.id for m in snapshots.list_manifests(state)] == ["j-old", "j-failed", "j-good"]
    out = apply_snapshot_retention("j", RetentionPolicy(keep_last=2), state)
    assert out["incomplete"]["deleted"] == ["j-failed"], out
    assert {m.id for m in snapshots.list_manifests(state)} == {"j-old", "j-good"}
