"""Every command that reads state names the same state directory: --state-dir, the
state_dir of --job JOB.toml, else $QUIESCE_STATE_DIR (issue 11: `status` said "nothing is
frozen" while a job with its own state_dir was running)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from helpers.snaptools import image_on_reflink_host

from quiesce import snapshot as snapshots
from quiesce.state.journal import Journal
from quiesce.state.locks import job_lock


def _quiesce(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "QUIESCE_STATE_DIR"}
    return subprocess.run(
        [sys.executable, "-m", "quiesce", *args],
        capture_output=True, text=True, timeout=300, env=environ | (env or {}),
    )  # fmt: skip


def _job(tmp_path: Path, volume: str = "/srv") -> Path:
    job = tmp_path / "own.toml"
    job.write_text(
        f'volumes = ["{volume}"]\nstate_dir = "{tmp_path / "state"}"\n'
        '[provider]\ntype = "reflink"\n'
    )
    job.chmod(0o600)
    return job


def test_status_lists_a_running_job_of_its_own_state_dir(tmp_path: Path) -> None:
    job = _job(tmp_path)
    state = tmp_path / "state"
    with job_lock(state, "own", "run"):
        for args, env in [
            (["--job", str(job)], None),
            (["--state-dir", str(state)], None),
            ([], {"QUIESCE_STATE_DIR": str(state)}),
        ]:
            p = _quiesce("status", *args, env=env)
            assert p.returncode == 0, p.stderr
            assert "job own: run running since" in p.stdout, args
            p = _quiesce("status", "--json", *args, env=env)
            assert [j["job"] for j in json.loads(p.stdout)["running"]] == ["own"]
        other = tmp_path / "other"
        p = _quiesce("status", "--json", "--state-dir", str(other))
        assert json.loads(p.stdout)["running"] == []
        # two names for the state directory that disagree: refused, nothing read
        p = _quiesce("status", "--state-dir", str(other), "--job", str(job))
        assert p.returncode == 2 and "give only one of --state-dir and --job" in p.stderr


def test_cleanup_with_job_cleans_the_jobs_state_dir(tmp_path: Path) -> None:
    state = tmp_path / "state"
    left = tmp_path / "left-behind"
    j = Journal.open(state, job="own")
    j.intent("dir", path=str(left))
    left.mkdir()
    os.close(j.fd)  # the run died: its lock is gone, its journal stays
    assert _quiesce("cleanup").stdout.strip() != f"removed dir: {left}"
    p = _quiesce("cleanup", "--job", str(_job(tmp_path)))
    assert p.returncode == 0, p.stderr
    assert f"removed dir: {left}" in p.stdout
    assert not left.exists()


def test_snapshot_commands_with_job_use_its_state_dir(loopfs, tmp_path: Path) -> None:
    pair = image_on_reflink_host(loopfs, "ext4")
    (pair.inner.mountpoint / "f").write_text("data")
    job = _job(tmp_path, pair.inner.path)
    man = snapshots.create([pair.inner.path], "reflink", job="own", state_dir=tmp_path / "state")
    p = _quiesce("snapshot", "list", "--json", "--job", str(job))
    assert p.returncode == 0, p.stderr
    assert [s["id"] for s in json.loads(p.stdout)["snapshots"]] == [man.id]
    where = tmp_path / "mnt"
    p = _quiesce("snapshot", "mount", man.id, str(where), "--job", str(job))
    assert p.returncode == 0, p.stderr
    try:
        assert (where / "f").read_text() == "data"
    finally:
        p = _quiesce("snapshot", "umount", str(where), "--job", str(job))
    assert p.returncode == 0, p.stderr
    assert not os.path.ismount(where)
    p = _quiesce("snapshot", "delete", man.id, "--job", str(job))
    assert p.returncode == 0, p.stderr
    assert snapshots.list_manifests(tmp_path / "state") == []
