"""restic, borg and tar targets against real repositories in temporary directories.

The source is a plain directory tree here (the targets do not care where it is
mounted); the snapshot mounts are tested in test_backup_mount.py and end to end in
test_backup_phase.py.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from helpers.backup_tree import change_some, make_tree

from quiesce.backup.targets.base import BackupError, ProgressUpdate, Target
from quiesce.backup.targets.borg import BorgTarget
from quiesce.backup.targets.restic import ResticTarget
from quiesce.backup.targets.tar import TarTarget
from quiesce.backup.verification import verify
from quiesce.errors import UsageError
from quiesce.state.retention import RetentionPolicy

PASSWORD = "correct horse battery staple 7f3a"
VOLUMES = ["vol-a", "vol-b"]


def _source(tmp_path: Path) -> tuple[Path, dict[str, list[str]]]:
    root = tmp_path / "mnt"
    files = {v: make_tree(root / v, n_files=25, seed=i) for i, v in enumerate(VOLUMES)}
    return root, files


def _target(kind: str, tmp_path: Path, wrapper: str | None = None) -> Target:
    pw = tmp_path / "pw"
    pw.write_text(PASSWORD)
    pw.chmod(0o600)
    if kind == "restic":
        t: Target = ResticTarget(
            str(tmp_path / "repo"), password_file=str(pw), job="t1", host="h1",
            cache_dir=tmp_path / "cache", **({"binary": wrapper} if wrapper else {}),
        )  # fmt: skip
    elif kind == "borg":
        t = BorgTarget(
            str(tmp_path / "repo"), password_file=str(pw), job="t1",
            base_dir=tmp_path / "borgbase", **({"binary": wrapper} if wrapper else {}),
        )  # fmt: skip
    else:
        t = TarTarget(directory=tmp_path / "tars", job="t1", compression=kind.split("-")[1])
    t.init()
    return t


@pytest.mark.parametrize("kind", ["restic", "borg", "tar-zstd", "tar-gzip"])
def test_backup_restore_verify_incremental_prune(kind: str, tmp_path: Path) -> None:
    root, files = _source(tmp_path)
    target = _target(kind, tmp_path)
    seen: list[ProgressUpdate] = []
    t1 = datetime(2024, 3, 1, 2, 0, tzinfo=UTC)
    first = target.backup(root, paths=VOLUMES, time=t1, progress=seen.append)
    n_files = sum(len(v) for v in files.values())
    assert first.files == n_files
    content = sum(os.lstat(root / v / f).st_size for v in VOLUMES for f in files[v])
    if kind == "borg":  # borg's original_size also counts some item metadata
        assert content <= first.bytes <= content * 1.01
    else:
        assert first.bytes == content
    assert first.snapshot_id

    full = verify(target, first, root, VOLUMES, "full", temp_root=tmp_path)
    assert full.ok, full.mismatches
    assert full.files_checked > n_files  # dirs and the symlink too
    repo = verify(target, first, root, VOLUMES, "repository")
    assert repo.ok, repo.detail

    changed = change_some(root / "vol-a", files["vol-a"], 0.2)
    second = target.backup(root, paths=VOLUMES, time=t1 + timedelta(days=1))
    if kind == "restic":
        # the same path, size/mtime/ctime/inode untouched: not reread
        assert second.files_unmodified == n_files - len(changed)
        assert second.files_changed == len(changed)
    elif kind == "borg":
        # borg never caches the file(s) with the newest ctime of a run (timestamp
        # granularity), so one unchanged file may be read again
        assert n_files - len(changed) - 1 <= second.files_unmodified <= n_files - len(changed)
    sample = verify(
        target, second, root, VOLUMES, "sample", sample_files=10, temp_root=tmp_path,
        rng=random.Random(3),
    )  # fmt: skip
    assert sample.ok and sample.files_checked == 10, sample.mismatches

    snaps = target.snapshots()
    assert [s.time.date() for s in sorted(snaps, key=lambda s: s.time)] == [
        t1.date(),
        (t1 + timedelta(days=1)).date(),
    ]
    pruned = target.forget_prune(RetentionPolicy(keep_last=1))
    assert len(pruned.removed) == 1
    assert [s.id for s in target.snapshots()] == [second.snapshot_id]


@pytest.mark.parametrize("kind", ["restic", "tar-zstd"])
def test_verification_catches_a_backup_that_differs(kind: str, tmp_path: Path) -> None:
    """A verify that cannot fail is worthless: change the "snapshot" after the backup."""
    root, files = _source(tmp_path)
    target = _target(kind, tmp_path)
    result = target.backup(root, paths=VOLUMES)
    victim = root / "vol-b" / files["vol-b"][3]
    victim.write_bytes(victim.read_bytes() + b"!")
    (root / "vol-a" / "new-file").write_text("not in the backup")
    full = verify(target, result, root, VOLUMES, "full", temp_root=tmp_path)
    assert not full.ok
    joined = "\n".join(full.mismatches)
    assert f"vol-b/{files['vol-b'][3]}: size" in joined
    assert "vol-a/new-file: missing from the restore" in joined
    every = verify(target, result, root, VOLUMES, "sample", sample_files=1000, temp_root=tmp_path)
    assert not every.ok
    if kind == "restic":  # and the target's own check sees a damaged repository
        packs = [p for p in (tmp_path / "repo" / "data").rglob("*") if p.is_file()]
        victim = max(packs, key=lambda p: p.stat().st_size)
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
        assert isinstance(target, ResticTarget)
        assert not target.check(read_data_subset="100%").ok


def _wrapper(tmp_path: Path, real: str) -> tuple[str, Path]:
    """A stand-in binary that records its argv and environment names, then runs ``real``."""
    log = tmp_path / "calls.jsonl"
    script = tmp_path / f"{real}-wrapper"
    script.write_text(
        "#!/usr/bin/python3\n"
        "import json, os, sys\n"
        f"with open({str(log)!r}, 'a') as f:\n"
        "    f.write(json.dumps({'argv': sys.argv, 'env': {k: v for k, v in os.environ.items()"
        " if k.startswith(('RESTIC_', 'BORG_'))}}) + '\\n')\n"
        f"os.execvp({real!r}, [{real!r}] + sys.argv[1:])\n"
    )
    script.chmod(0o755)
    return str(script), log


@pytest.mark.parametrize("kind", ["restic", "borg"])
def test_password_never_on_a_command_line(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, _ = _source(tmp_path)
    wrapper, log = _wrapper(tmp_path, kind)
    target = _target(kind, tmp_path, wrapper=wrapper)
    target.backup(root, paths=VOLUMES)
    # the same repository through a password held in a named environment variable
    monkeypatch.setenv("MY_BACKUP_PW", PASSWORD)
    cls = ResticTarget if kind == "restic" else BorgTarget
    extra = {"cache_dir": tmp_path / "c2"} if kind == "restic" else {"base_dir": tmp_path / "b2"}
    by_env = cls(
        str(tmp_path / "repo"), password_env="MY_BACKUP_PW", job="t1", host="h1",
        binary=wrapper, **extra,
    )  # fmt: skip
    assert len(by_env.snapshots()) == 1
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(calls) >= 3
    for call in calls:
        assert not any(PASSWORD in a for a in call["argv"]), call["argv"]
        assert not any(str(tmp_path / "repo") in a for a in call["argv"])  # repo via env too
    names = set().union(*(c["env"] for c in calls))
    if kind == "restic":
        assert {"RESTIC_PASSWORD_FILE", "RESTIC_PASSWORD", "RESTIC_REPOSITORY"} <= names
    else:
        assert {"BORG_PASSCOMMAND", "BORG_PASSPHRASE", "BORG_REPO"} <= names
    monkeypatch.delenv("MY_BACKUP_PW")
    with pytest.raises(UsageError, match="MY_BACKUP_PW") as e:
        by_env.snapshots()
    assert PASSWORD not in str(e.value)
    bad = tmp_path / "bad-pw"
    bad.write_text("Zebra " + PASSWORD)
    wrong = cls(str(tmp_path / "repo"), password_file=str(bad), job="t1", **extra)
    with pytest.raises(BackupError) as e2:
        wrong.backup(root, paths=VOLUMES)
    assert "Zebra" not in e2.value.message and PASSWORD not in e2.value.message
    if kind == "restic":
        assert "wrong password" in e2.value.message


def test_tar_stream_to_a_command_with_sha256_beside(tmp_path: Path) -> None:
    root, _ = _source(tmp_path)
    out = tmp_path / "remote"
    out.mkdir()
    sums = tmp_path / "sums"
    t = TarTarget(
        command=["dd", f"of={out}/{{name}}", "bs=1M", "status=none"], sha256_dir=sums, job="t1"
    )
    result = t.backup(root, paths=VOLUMES)
    name = result.snapshot_id
    assert (out / name).is_file() and name.endswith(".tar.zst")
    # sha256sum -c reads the file beside the stream
    shutil.copy(sums / f"{name}.sha256", out)
    p = subprocess.run(["sha256sum", "-c", f"{name}.sha256"], cwd=out, capture_output=True)
    assert p.returncode == 0, p.stdout + p.stderr
    listing = subprocess.run(
        f"zstd -dc {out / name} | tar -t", shell=True, capture_output=True, text=True, check=True
    ).stdout.split()
    assert "vol-a/d1/private" in listing and "vol-b/sparse.img" in listing
    failing = TarTarget(command=["false"], sha256_dir=sums, job="t1")
    with pytest.raises(BackupError, match="false exit 1"):
        failing.backup(root, paths=VOLUMES)


def test_tar_file_is_renamed_only_when_complete(tmp_path: Path) -> None:
    root, _ = _source(tmp_path)
    t = TarTarget(directory=tmp_path / "tars", job="t1", extra_args=["--no-such-option"])
    with pytest.raises(BackupError, match="tar exit"):
        t.backup(root, paths=VOLUMES)
    assert list((tmp_path / "tars").iterdir()) == []


def test_sigterm_while_a_child_starts_never_orphans_it() -> None:
    """systemd's SIGTERM can land while Popen is still starting restic: the child must
    still be killed (a race: many tries, the signal sent at spread-out moments)."""
    import signal
    import threading
    import time
    import uuid

    from quiesce.backup.targets.base import run_child

    mark = f"QUIESCE_TEST_MARK={uuid.uuid4().hex}"

    def survivors() -> list[str]:
        found = []
        for env in Path("/proc").glob("[0-9]*/environ"):
            try:
                if mark.encode() in env.read_bytes().split(b"\0"):
                    found.append(env.parent.name)
            except OSError:
                pass
        return found

    def stop(_s: int, _f: object) -> None:
        raise SystemExit(143)

    old = signal.signal(signal.SIGTERM, stop)
    try:
        for i in range(60):
            delay = (i % 20) * 0.0002
            t = threading.Timer(delay, os.kill, (os.getpid(), signal.SIGTERM))
            with pytest.raises(SystemExit):
                t.start()
                run_child(["sleep", "30"], env=dict([mark.split("=", 1)]))
                time.sleep(5)  # (only if the signal came before the child started)
            t.join()
    finally:
        signal.signal(signal.SIGTERM, old)
    time.sleep(0.2)
    assert survivors() == []


def _mode(p: Path | str) -> int:
    return os.stat(p).st_mode & 0o7777


def test_tar_archive_and_sha256_are_private_under_umask_022(tmp_path: Path) -> None:
    """A backup holds copies of root-only files: whatever quiesce creates for it is
    0700/0600 whatever the umask (under 022 it was 0755/0644, world-readable)."""
    root, _ = _source(tmp_path)
    (root / "vol-a" / "secret").write_text("root only")
    (root / "vol-a" / "secret").chmod(0o600)
    tars, sums = tmp_path / "tars" / "nightly", tmp_path / "sums" / "nightly"
    old = os.umask(0o022)
    try:
        result = TarTarget(directory=tars, job="t1").backup(root, paths=VOLUMES)
        streamed = TarTarget(
            command=["dd", f"of={tmp_path}/{{name}}", "status=none"], sha256_dir=sums, job="t1"
        ).backup(root, paths=VOLUMES)
    finally:
        os.umask(old)
    name = result.snapshot_id
    assert sorted(p.name for p in tars.iterdir()) == [name, f"{name}.sha256"]  # no .part
    assert (_mode(tars.parent), _mode(tars)) == (0o700, 0o700)
    assert (_mode(result.location), _mode(tars / f"{name}.sha256")) == (0o600, 0o600)
    assert (_mode(sums.parent), _mode(sums)) == (0o700, 0o700)
    assert _mode(sums / f"{streamed.snapshot_id}.sha256") == 0o600


@pytest.mark.parametrize("kind", ["restic", "borg"])
def test_a_target_that_echoes_its_password_and_repository_is_redacted(
    kind: str, tmp_path: Path
) -> None:
    """The password (read from the job's password file by the child) and a credentialed
    repository URL never reach an error message, a check's output or a BackupResult."""
    pw = tmp_path / "pw"
    pw.write_text(PASSWORD + "\n")
    pw.chmod(0o600)
    url_pw = "url-secret-4e1d"
    repo = f"rest:https://user:{url_pw}@127.0.0.1:1/repo" if kind == "restic" else (
        f"ssh://user:{url_pw}@127.0.0.1:1/./repo"
    )  # fmt: skip
    fake = tmp_path / f"fake-{kind}"
    fake.write_text(
        "#!/usr/bin/python3\n"
        "import os, shlex, subprocess, sys\n"
        "e = os.environ\n"
        "if 'RESTIC_PASSWORD_FILE' in e:\n"
        "    secret = open(e['RESTIC_PASSWORD_FILE']).read()\n"
        "else:  # borg: run the passcommand, as borg does\n"
        "    secret = subprocess.run(shlex.split(e['BORG_PASSCOMMAND']),\n"
        "                            capture_output=True, text=True).stdout\n"
        "repo = e.get('RESTIC_REPOSITORY') or e.get('BORG_REPO')\n"
        "print(f'Fatal: wrong password {secret.strip()!r} for {repo}', file=sys.stderr)\n"
        "sys.exit(2)\n"
    )
    fake.chmod(0o755)
    if kind == "restic":
        t: Target = ResticTarget(repo, password_file=str(pw), job="t1", binary=str(fake))
    else:
        t = BorgTarget(repo, password_file=str(pw), job="t1", binary=str(fake))
    with pytest.raises(BackupError) as e:
        t.backup(tmp_path, paths=["x"])
    masked = repo.replace(url_pw, "***")
    assert e.value.message.endswith(f"Fatal: wrong password '***' for {masked}")
    check = t.check()
    assert not check.ok
    assert PASSWORD not in check.output and url_pw not in check.output
    assert masked in check.output


KILLED_RUN = r"""
import sys, time
from pathlib import Path
from quiesce.backup.targets.restic import ResticTarget

repo, pw, src, cache = sys.argv[1:5]


def progress(_update):
    print("backing-up", flush=True)
    time.sleep(3600)


ResticTarget(repo, password_file=pw, job="t1", cache_dir=cache).backup(
    Path(src), paths=["big"], progress=progress
)
"""


def test_a_sigkilled_run_leaves_no_restic_and_no_lock(tmp_path: Path) -> None:
    """A SIGKILLed `quiesce run` used to leave restic reading on, its lock in the
    repository: now restic is told (SIGINT, on which it removes its lock) and is gone."""
    import signal
    import sys
    import time

    from quiesce.host import proc

    target = _target("restic", tmp_path)
    src = tmp_path / "src"
    (src / "big").mkdir(parents=True)
    with open(src / "big" / "sparse", "wb") as f:
        f.truncate(1 << 40)  # restic reads zeros for minutes; no disk space used
    env = os.environ | {"PYTHONPATH": str(Path(proc.__file__).parents[2])}
    parent = subprocess.Popen(
        [sys.executable, "-c", KILLED_RUN, str(tmp_path / "repo"), str(tmp_path / "pw"),
         str(src), str(tmp_path / "cache")],
        stdout=subprocess.PIPE, env=env,
    )  # fmt: skip
    restic: list[int] = []
    try:
        assert parent.stdout is not None
        assert parent.stdout.readline().strip() == b"backing-up"
        for kids in Path(f"/proc/{parent.pid}/task").glob("*/children"):
            restic += [int(pid) for pid in kids.read_text().split()]
        assert len(restic) == 1
        assert Path(f"/proc/{restic[0]}/cmdline").read_bytes().split(b"\0")[1] == b"backup"
        assert isinstance(target, ResticTarget)
        assert target._child("list", "locks", "--no-lock").stdout.strip()  # locked now
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    until = time.monotonic() + 10
    while Path(f"/proc/{restic[0]}/cmdline").exists() and time.monotonic() < until:
        state = Path(f"/proc/{restic[0]}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "Z":
            break
        time.sleep(0.05)
    else:
        assert not Path(f"/proc/{restic[0]}/cmdline").exists(), "restic outlived quiesce"
    locks = target._child("list", "locks", "--no-lock")
    assert locks.returncode == 0 and locks.stdout.strip() == "", "the repository stays locked"


@pytest.mark.parametrize("kind", ["restic", "borg", "tar-zstd"])
def test_retention_counts_snapshots_not_duplicate_archives(kind: str, tmp_path: Path) -> None:
    """Two backups of one quiesce snapshot are one snapshot to keep_last; the caller's
    own backup (``keep``) is never pruned even when the policy alone would drop it."""
    root, _ = _source(tmp_path)
    target = _target(kind, tmp_path)
    t0 = datetime(2024, 3, 1, 2, 0, tzinfo=UTC)
    made = {}
    for i, snap in enumerate(["web-A", "web-B", "web-B"]):
        when = t0 + timedelta(hours=min(i, 1))
        made.setdefault(snap, []).append(
            target.backup(root, paths=VOLUMES, time=when, tags=[f"quiesce-snapshot={snap}"])
        )
    key_a = target.source_key("web-A", t0)
    key_b = target.source_key("web-B", t0 + timedelta(hours=1))
    assert sorted(s.id for s in target.backups_of("web-B", t0 + timedelta(hours=1))) == sorted(
        r.snapshot_id for r in made["web-B"]
    )
    pruned = target.forget_prune(RetentionPolicy(keep_last=2))
    assert pruned.removed == []  # restic's own --keep-last 2 removed web-A here
    assert len(target.snapshots()) == 3
    pruned = target.forget_prune(RetentionPolicy(keep_last=1), keep={key_a})
    assert pruned.removed == []  # web-B is the newest, web-A is the caller's
    pruned = target.forget_prune(RetentionPolicy(keep_last=1))
    assert sorted(pruned.removed) == [made["web-A"][0].snapshot_id]
    assert {s.source for s in target.snapshots()} == {key_b}
