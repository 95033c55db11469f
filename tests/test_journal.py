"""The cleanup journal: SIGKILL a run in the middle of its backup, then `quiesce cleanup`."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import HELPERS, is_writable
from helpers.snaptools import image_on_reflink_host, sh

from quiesce.snapshot.cleanup import cleanup
from quiesce.state.cleanup import held_snapshot_ids
from quiesce.state.journal import Journal
from quiesce.state.statedir import journal_dir
from quiesce.sys.mounts import loop_devices_of


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _processes_with_env(entry: str) -> list[int]:
    """Pids whose environment holds ``entry`` (restic gets its repository there)."""
    found = []
    for env in Path("/proc").glob("[0-9]*/environ"):
        with contextlib.suppress(OSError):
            if entry.encode() in env.read_bytes().split(b"\0"):
                found.append(int(env.parent.name))
    return found


def _quiesce(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "quiesce", *args], capture_output=True, text=True, timeout=120
    )


def test_sigkill_during_backup_then_cleanup_leaves_nothing(loopfs, tmp_path: Path) -> None:
    pair = image_on_reflink_host(loopfs, "ext4")
    origin = pair.inner.mountpoint
    for i in range(30):
        (origin / f"file{i}").write_bytes(os.urandom(200_000))
    before = _digest(origin)
    state, root, repo = tmp_path / "state", tmp_path / "run", tmp_path / "repo"
    pw = tmp_path / "pw"
    pw.write_text("pw")
    env = os.environ | {"RESTIC_PASSWORD_FILE": str(pw), "RESTIC_REPOSITORY": str(repo)}
    subprocess.run(["restic", "init", "-q"], env=env, check=True, capture_output=True)
    clone = pair.outer.mountpoint / "crash-clone.img"
    run = subprocess.Popen(
        [sys.executable, str(HELPERS / "backup_crash_run.py"), str(state), pair.inner.path,
         str(pair.inner.image), str(clone), str(root), str(repo), str(pw)],
        stdout=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        assert run.stdout is not None
        assert run.stdout.readline().strip() == "mounted"
        assert run.stdout.readline().strip() == "backing-up"
        mnt = root / "crash" / "vol"
        assert sh("findmnt", "-no", "SOURCE", str(mnt)).stdout.startswith("/dev/loop")
        assert clone.exists() and len(loop_devices_of(str(clone))) == 1
        # the run is alive: cleanup must leave it alone
        assert cleanup(state).skipped_live and clone.exists()
    finally:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
    assert sh("findmnt", str(mnt), check=False).returncode == 0  # the crash left it behind

    p = _quiesce("cleanup", "--state-dir", str(state), "--json")
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)
    assert [r["kind"] for r in report["removed"]] == ["mount", "loop", "dir", "dir", "file"]
    assert sh("findmnt", str(mnt), check=False).returncode == 1
    assert loop_devices_of(str(clone)) == []
    assert not clone.exists() and not (root / "crash").exists()
    assert list(journal_dir(state).iterdir()) == []
    # the origin volume is untouched: still mounted, same content, writable, not frozen
    assert sh("findmnt", "-no", "SOURCE", pair.inner.path).stdout.strip() == pair.inner.device
    assert _digest(origin) == before
    assert is_writable(origin)
    assert sorted(p.name for p in pair.outer.mountpoint.iterdir()) == [pair.inner.image.name]
    # idempotent
    again = _quiesce("cleanup", "--state-dir", str(state))
    assert again.returncode == 0 and "nothing to clean up" in again.stdout


LIVE = """
import sys, time
from quiesce.state.journal import Journal
j = Journal.open(sys.argv[1], job="live")
j.intent("file", path=sys.argv[2])
j.intent("dir", path=sys.argv[3], holds="snap-1")
print("ready", flush=True)
time.sleep(3600)
"""


def test_a_live_run_is_left_alone_and_its_holds_count(tmp_path: Path) -> None:
    state = tmp_path / "state"
    victim, held_dir = tmp_path / "clone.img", tmp_path / "held"
    victim.write_text("x")
    held_dir.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", LIVE, str(state), str(victim), str(held_dir)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        assert held_snapshot_ids(state) == {"snap-1"}
        rep = cleanup(state)
        assert len(rep.skipped_live) == 1 and rep.removed == []
        assert victim.exists()
    finally:
        proc.kill()
        proc.wait()
    assert held_snapshot_ids(state) == set()  # a dead run holds nothing
    dry = cleanup(state, dry_run=True)
    assert [r["kind"] for r in dry.removed] == ["dir", "file"] and victim.exists()
    rep = cleanup(state)
    assert [r["kind"] for r in rep.removed] == ["dir", "file"]
    assert not victim.exists() and not held_dir.exists()
    assert cleanup(state).removed == []


def test_done_committed_and_torn_entries(tmp_path: Path) -> None:
    state = tmp_path / "state"
    kept, removed, torn = (tmp_path / n for n in ("kept", "removed", "torn"))
    for f in (kept, removed, torn):
        f.write_text("x")
    j = Journal.open(state, job="t")
    a = j.intent("file", path=str(kept))
    j.commit(a)  # the run keeps it (a finished snapshot)
    j.intent("file", path=str(removed))
    c = j.intent("file", path=str(tmp_path / "never-made"))  # crashed before making it
    j.undo(c)
    path = j.path
    os.close(j.fd)  # "crash": lock released, nothing rolled back
    with open(path, "a") as f:
        f.write('{"op":"intent","id":9,"kind":"file","path":"' + str(torn))  # torn write
    rep = cleanup(state)
    assert [r["path"] for r in rep.removed] == [str(removed)]
    assert kept.exists() and torn.exists() and not removed.exists()
    assert not path.exists()


def test_a_failed_undo_keeps_the_journal_for_the_next_cleanup(tmp_path: Path) -> None:
    state = tmp_path / "state"
    j = Journal.open(state, job="t")
    j.intent("command", argv=["false"])
    j.intent("file", path=str(tmp_path / "gone"))
    os.close(j.fd)
    rep = cleanup(state)
    assert len(rep.errors) == 1 and "false exited 1" in rep.errors[0]
    assert [r["kind"] for r in rep.removed] == ["file"]
    assert len(list(journal_dir(state).glob("*.jsonl"))) == 1  # retried next time
    p = _quiesce("cleanup", "--state-dir", str(state))
    assert p.returncode == 1 and "false exited 1" in p.stderr


@pytest.mark.timeout(15)  # a hang on the empty journal dir fails here, not at 120 s
def test_journal_close_rolls_back_what_the_run_did_not_remove(tmp_path: Path) -> None:
    f = tmp_path / "leak"
    with pytest.raises(RuntimeError), Journal.open(tmp_path / "state") as j:
        j.intent("file", path=str(f))
        f.write_text("x")
        raise RuntimeError("the run failed")
    assert not f.exists()
    assert list(journal_dir(tmp_path / "state").iterdir()) == []
    rep = cleanup(tmp_path / "state")
    assert (rep.removed, rep.errors) == ([], [])


def test_sigterm_during_quiesce_backup_unwinds_by_itself(loopfs, tmp_path: Path) -> None:
    """systemd's stop (SIGTERM) in the middle of restic: the run unmounts, detaches, kills
    restic, closes its journal and records the failure in the metrics file."""
    from quiesce import snapshot as snapshots
    from quiesce.job.metrics import parse

    pair = image_on_reflink_host(loopfs, "ext4")
    tree = pair.inner.mountpoint / "t"
    tree.mkdir()
    for i in range(40):
        (tree / f"f{i}").write_bytes(os.urandom(1 << 20))
    state = tmp_path / "state"
    man = snapshots.create([pair.inner.path], "reflink", job="sig", state_dir=state)
    (tmp_path / "pw").write_text("x")
    job = tmp_path / "sig.toml"
    job.write_text(
        f'name = "sig"\nvolumes = ["{pair.inner.path}"]\nstate_dir = "{state}"\n'
        f'metrics_file = "{tmp_path / "q.prom"}"\n[provider]\ntype = "reflink"\n'
        f'[backup]\ntarget = "restic"\nrepository = "{tmp_path / "repo"}"\n'
        f'password_file = "{tmp_path / "pw"}"\ninit = true\nmount_root = "{tmp_path / "run"}"\n'
    )
    job.chmod(0o600)
    proc = subprocess.Popen(
        [sys.executable, "-m", "quiesce", "backup", str(job)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    mnt = str(tmp_path / "run" / "sig")
    try:
        for _ in range(600):  # until the snapshot is mounted and restic reads it
            if mnt in Path("/proc/self/mountinfo").read_text():
                break
            time.sleep(0.02)
        repo_env = f"RESTIC_REPOSITORY={tmp_path / 'repo'}"
        for _ in range(500):
            if _processes_with_env(repo_env):
                break  # restic backup is running
            time.sleep(0.02)
        else:
            pytest.fail("restic backup did not start")
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143 and "stopped by a signal" in err
    assert mnt not in Path("/proc/self/mountinfo").read_text()
    assert loop_devices_of(man.snapshots[0]["location"]) == []
    assert list(journal_dir(state).iterdir()) == []
    assert _processes_with_env(f"RESTIC_REPOSITORY={tmp_path / 'repo'}") == []  # not orphaned
    assert parse((tmp_path / "q.prom").read_text())["sig"]["last_run_success"] == 0
    assert Path(man.snapshots[0]["location"]).exists()  # the snapshot itself is kept
