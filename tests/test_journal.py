"""The cleanup journal: SIGKILL a run in the middle of its backup, then `quiesce cleanup`."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import HELPERS, is_writable
from helpers.snaptools import image_on_reflink_host, sh

from quiesce.host.mounts import loop_devices_of
from quiesce.snapshot.cleanup import cleanup
from quiesce.state.cleanup import held_snapshot_ids
from quiesce.state.journal import Journal
from quiesce.state.statedir import UntrustedState, journal_dir


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
    assert loop_devices_of(man.snapshots[0].location) == []
    assert list(journal_dir(state).iterdir()) == []
    assert _processes_with_env(f"RESTIC_REPOSITORY={tmp_path / 'repo'}") == []  # not orphaned
    assert parse((tmp_path / "q.prom").read_text())["sig"]["last_run_success"] == 0
    assert Path(man.snapshots[0].location).exists()  # the snapshot itself is kept


# -- the state directory is a trust boundary ----------------------------------------------

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A root-owned 0711 directory under /tmp that uid 65534 can pass through (the
    pytest tmp_path is 0700 root's)."""
    d = Path(tempfile.mkdtemp(prefix="quiesce-trust-"))
    d.chmod(0o711)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _journal_text(marker: Path) -> str:
    begin = {"op": "begin", "run": "evil", "job": "x", "pid": 1, "t": 0}
    intent = {"op": "intent", "id": 1, "kind": "command",
              "argv": ["/bin/sh", "-c", f"touch {marker}"]}  # fmt: skip
    return json.dumps(begin) + "\n" + json.dumps(intent) + "\n"


def _as_nobody(code: str, *args: str) -> None:
    subprocess.run([*NOBODY, sys.executable, "-c", code, *args], check=True, timeout=30)


PLANT = """
import os, sys
state, text = sys.argv[1], sys.argv[2]
os.makedirs(os.path.join(state, "journal"), exist_ok=True)
with open(os.path.join(state, "journal", "evil.jsonl"), "w") as f:
    f.write(text)
"""


@pytest.mark.parametrize("how", ["sticky-1777", "owned-by-nobody", "parent-owned-by-nobody"])
def test_cleanup_refuses_a_state_dir_another_user_can_write(shared_dir: Path, how: str) -> None:
    """uid 65534 plants a journal whose command would run as root: refused, exit 2, the
    command never runs and the journal stays where it is."""
    marker = shared_dir / "marker"
    if how == "parent-owned-by-nobody":
        parent = shared_dir / "nobody"
        parent.mkdir()
        os.chown(parent, 65534, 65534)
        state = parent / "state"
        (state / "journal").mkdir(parents=True, mode=0o700)
        (state / "journal" / "evil.jsonl").write_text(_journal_text(marker))  # root's file
        culprit = parent
    else:
        state = shared_dir / "state"
        state.mkdir()
        if how == "sticky-1777":
            state.chmod(0o1777)
        else:
            os.chown(state, 65534, 65534)
        _as_nobody(PLANT, str(state), _journal_text(marker))
        culprit = state
    planted = state / "journal" / "evil.jsonl"
    before = planted.read_text()
    p = _quiesce("cleanup", "--state-dir", str(state))
    assert p.returncode == 2, p.stderr
    first = p.stderr.splitlines()[0]
    assert first.startswith("quiesce: refusing the state directory") and str(culprit) in first
    assert "hint:" in p.stderr and "--state-dir" in p.stderr
    assert not marker.exists()
    assert planted.read_text() == before
    j = _quiesce("cleanup", "--state-dir", str(state), "--json")
    assert j.returncode == 2 and json.loads(j.stdout)["exit_code"] == 2
    assert not marker.exists()


@pytest.mark.parametrize("how", ["symlink", "owned-by-nobody", "group-writable"])
def test_cleanup_refuses_a_journal_root_did_not_write(tmp_path: Path, how: str) -> None:
    """In a good state directory, a journal that is a symlink (to a journal elsewhere), is
    another user's or is writable by others is refused before anything is undone."""
    marker, victim = tmp_path / "marker", tmp_path / "victim"
    victim.write_text("x")
    state = tmp_path / "state"
    j = Journal.open(state, job="good")
    j.intent("file", path=str(victim))
    os.close(j.fd)  # a crashed run: its victim would be removed by a cleanup
    journal = journal_dir(state) / "evil.jsonl"
    if how == "symlink":
        elsewhere = tmp_path / "elsewhere.jsonl"
        elsewhere.write_text(_journal_text(marker))
        journal.symlink_to(elsewhere)
    else:
        journal.write_text(_journal_text(marker))
        if how == "owned-by-nobody":
            os.chown(journal, 65534, 65534)
        else:
            journal.chmod(0o660)
    p = _quiesce("cleanup", "--state-dir", str(state))
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith(f"quiesce: refusing the state file {journal}")
    if how == "symlink":
        assert f"hint: remove {journal} if root did not make it" in p.stderr
    assert not marker.exists()
    assert victim.exists()  # nothing at all was undone
    with pytest.raises(UntrustedState):
        held_snapshot_ids(state)


def test_manifests_and_locks_are_checked_too(tmp_path: Path) -> None:
    """A manifest drives provider.delete with its options, a lock file is truncated: a
    planted one is refused (exit 2) and the provider's delete command never runs."""
    from quiesce import snapshot as snapshots
    from quiesce.state.locks import job_lock

    state, marker = tmp_path / "state", tmp_path / "marker"
    (state / "snapshots").mkdir(parents=True, mode=0o700)
    man = {
        "id": "evil", "job": "x", "provider": "command", "created": "2026-01-01T00:00:00Z",
        "volumes": [], "window": None, "freeze_mode": "fifreeze", "consistency": "crash",
        "consistency_reason": "", "phases": [],
        "snapshots": [{"id": "e/v", "provider": "command", "volume": "/v", "dev": "0:0",
                       "fstype": "ext4", "created": 0.0, "location": "L"}],
        "options": {"create": ["true"], "delete": ["/bin/sh", "-c", f"touch {marker}"]},
    }  # fmt: skip
    planted = state / "snapshots" / "evil.json"
    planted.write_text(json.dumps(man))
    os.chown(planted, 65534, 65534)
    p = _quiesce("snapshot", "delete", "evil", "--state-dir", str(state))
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith(f"quiesce: refusing the state file {planted}")
    assert not marker.exists() and planted.exists()
    with pytest.raises(UntrustedState):
        snapshots.list_manifests(state)
    # a lock file that is a symlink: root would truncate what it points to
    target = tmp_path / "precious"
    target.write_text("keep me")
    (state / "locks").mkdir(mode=0o700)
    (state / "locks" / "run-j.lock").symlink_to(target)
    with pytest.raises(UntrustedState), job_lock(state, "j"):
        pass
    assert target.read_text() == "keep me"


def test_what_quiesce_creates_in_the_state_dir_is_private(tmp_path: Path) -> None:
    """Under umask 022: the state directory (and any parent quiesce makes for it), its
    journal and locks directories are 0700, journals and lock files 0600."""
    from quiesce.state.locks import job_lock

    state = tmp_path / "var" / "quiesce"
    old = os.umask(0o022)
    try:
        with Journal.open(state, job="p") as j, job_lock(state, "p"):
            modes = {
                p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o7777
                for p in [tmp_path / "var", *sorted(state.rglob("*")), state]
            }
            assert j.path.exists()
    finally:
        os.umask(old)
    assert modes == {
        "var": 0o700, "var/quiesce": 0o700, "var/quiesce/journal": 0o700,
        "var/quiesce/locks": 0o700, f"var/quiesce/journal/{j.run}.jsonl": 0o600,
        "var/quiesce/locks/run-p.lock": 0o600,
    }  # fmt: skip
