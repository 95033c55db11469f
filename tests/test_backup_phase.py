"""The backup phase end to end: real reflink snapshots, real repositories, the CLI."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

from helpers.backup_tree import change_some, make_tree
from helpers.snaptools import image_on_reflink_host, sh

from quiesce import snapshot as snapshots
from quiesce.backup.config import BackupConfig
from quiesce.backup.phase import run_backup
from quiesce.backup.targets.restic import ResticTarget
from quiesce.job.metrics import parse
from quiesce.state.retention import RetentionPolicy
from quiesce.state.statedir import journal_dir


def _quiesce(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "quiesce", *args], capture_output=True, text=True, timeout=300
    )


def test_restic_backups_of_two_snapshots_incremental_and_retention(loopfs, tmp_path):
    pair = image_on_reflink_host(loopfs, "xfs")
    origin = pair.inner.mountpoint
    files = make_tree(origin / "data", n_files=30)
    state = tmp_path / "state"
    pw = tmp_path / "pw"
    pw.write_text("secret")
    cfg = BackupConfig(
        target="restic", repository=str(tmp_path / "repo"), password_file=str(pw), init=True,
        mount_root=str(tmp_path / "run"), verify="sample", sample_files=8,
        verify_dir=str(tmp_path), host="h",
    )  # fmt: skip
    first = snapshots.create([pair.inner.path], "reflink", job="web", state_dir=state)
    rep1 = run_backup(first, cfg, job="web", state=state, rng=random.Random(1))
    assert rep1.ok, rep1.error
    assert rep1.verify is not None and rep1.verify.ok and rep1.verify.files_checked == 8
    [mount] = rep1.mounts
    assert mount["path"].startswith(str(tmp_path / "run" / "web" / "/"))
    assert {"nouuid", "norecovery", "noexec"} <= set(mount["options"].split(","))
    total = rep1.result.files
    assert total == len(files)

    changed = change_some(origin / "data", files, 0.1)
    second = snapshots.create([pair.inner.path], "reflink", job="web", state_dir=state)
    rep2 = run_backup(second, cfg, job="web", state=state, retention=RetentionPolicy(keep_last=1))
    assert rep2.ok, rep2.error
    r = rep2.result
    # another clone, another loop device and mount: same path, so restic rereads only
    # the changed files
    assert (r.files_unmodified, r.files_changed) == (total - len(changed), len(changed))
    assert [p["name"] for p in rep2.phases] == [
        "cleanup", "init", "existing", "mount", "backup", "verify", "umount", "retention",
        "prune",
    ]  # fmt: skip
    assert rep2.retention["deleted"] == [first.id]
    assert rep2.retention["target"]["removed"] and len(rep2.retention["target"]["kept"]) == 1
    assert [m.id for m in snapshots.list_manifests(state)] == [second.id]
    tags = ResticTarget(str(tmp_path / "repo"), password_file=str(pw), job="web", host="h")
    [snap] = tags.snapshots()
    assert f"quiesce-snapshot={second.id}" in snap.tags and "quiesce-job=web" in snap.tags
    assert snap.paths == [mount["path"]]  # the stable path
    # nothing left behind
    assert not (tmp_path / "run" / "web").exists()
    assert list(journal_dir(state).iterdir()) == []
    assert str(second.snapshots[0].location) not in sh("losetup", "-a").stdout


def _job(tmp_path: Path, volume: str, backup: str, extra: str = "") -> Path:
    job = tmp_path / "nightly.toml"
    job.write_text(
        f'volumes = ["{volume}"]\nstate_dir = "{tmp_path / "state"}"\n'
        f'metrics_file = "{tmp_path / "textfile" / "quiesce.prom"}"\n{extra}\n'
        '[provider]\ntype = "reflink"\n\n'
        f'[backup]\nmount_root = "{tmp_path / "run"}"\nverify_dir = "{tmp_path}"\n{backup}\n'
    )
    job.chmod(0o600)
    return job


def test_cli_backup_with_tar_metrics_and_a_failed_verification(loopfs, tmp_path):
    pair = image_on_reflink_host(loopfs, "ext4")
    make_tree(pair.inner.mountpoint / "d", n_files=10)
    (pair.inner.mountpoint / "d" / "skip.log").write_text("excluded")
    job = _job(
        tmp_path, pair.inner.path,
        f'target = "tar"\ndirectory = "{tmp_path / "tars"}"\nverify = "full"\n',
        "[retention]\nkeep_last = 1\n",
    )  # fmt: skip
    p = _quiesce("backup", str(job))
    assert p.returncode == 2 and "job nightly has no snapshot" in p.stderr

    state = tmp_path / "state"
    first = snapshots.create([pair.inner.path], "reflink", job="nightly", state_dir=state)
    p = _quiesce("backup", str(job), "--json")
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout)
    assert rep["snapshot"] == first.id and rep["verify"]["ok"] and rep["verify"]["mode"] == "full"
    tar_file = Path(rep["backup"]["location"])
    assert tar_file.is_file() and Path(f"{tar_file}.sha256").is_file()
    metrics = parse((tmp_path / "textfile" / "quiesce.prom").read_text())["nightly"]
    assert metrics["last_run_success"] == 1 and metrics["verify_success"] == 1
    assert metrics["backup_bytes"] == rep["backup"]["bytes"]
    assert metrics["freeze_window_seconds"] == first.window_s

    # a target that leaves a file out: the full verification fails and nothing is pruned
    second = snapshots.create([pair.inner.path], "reflink", job="nightly", state_dir=state)
    job = _job(
        tmp_path, pair.inner.path,
        f'target = "tar"\ndirectory = "{tmp_path / "tars"}"\nverify = "full"\n'
        'exclude = ["*.log"]\n',
        "[retention]\nkeep_last = 1\n",
    )  # fmt: skip
    p = _quiesce("backup", str(job))
    assert p.returncode == 12  # ExitCode.BACKUP
    assert "verification (full) of the backup failed" in p.stderr
    assert "skip.log: missing from the restore" in p.stderr
    assert sorted(m.id for m in snapshots.list_manifests(state)) == sorted([first.id, second.id])
    assert len(list((tmp_path / "tars").glob("*.tar.zst"))) == 2
    metrics = parse((tmp_path / "textfile" / "quiesce.prom").read_text())["nightly"]
    assert metrics["last_run_success"] == 0 and metrics["verify_success"] == 0
    assert list(journal_dir(state).iterdir()) == []
    assert not (tmp_path / "run" / "nightly").exists()


def test_bad_backup_section_lists_every_problem(tmp_path):
    job = tmp_path / "j.toml"
    job.write_text(
        'volumes = ["/srv"]\n[provider]\ntype = "reflink"\n'
        '[backup]\ntarget = "restic"\nverfy = "full"\n[retention]\nkeep_daily = "7"\n'
    )
    job.chmod(0o600)
    p = _quiesce("backup", str(job))
    assert p.returncode == 2
    assert "backup.verfy: unknown key" in p.stderr and "did you mean 'verify'" in p.stderr
    assert "retention.keep_daily: wrong type" in p.stderr
    assert "the restic target needs `repository`" in p.stderr


def test_after_run_adds_the_backup_to_a_job_report(loopfs, tmp_path):
    """job.run_job (the snapshot) + backup.phase.after_run, as `quiesce run` calls it."""
    from quiesce.job.run import after_run, run_job
    from quiesce.job.validate import load_job

    pair = image_on_reflink_host(loopfs, "ext4")
    make_tree(pair.inner.mountpoint / "d", n_files=5)
    job_file = tmp_path / "j.toml"
    job_file.write_text(
        f'name = "j"\nvolumes = ["{pair.inner.path}"]\nstate_dir = "{tmp_path / "state"}"\n'
        '[provider]\ntype = "reflink"\n'
    )
    job_file.chmod(0o600)
    report = run_job(load_job(job_file))
    assert report.error is None and report.manifest_id
    man = snapshots.load(report.manifest_id, tmp_path / "state")
    cfg = BackupConfig(
        target="tar", directory=str(tmp_path / "tars"), verify="full",
        mount_root=str(tmp_path / "run"), verify_dir=str(tmp_path),
    )  # fmt: skip
    prom = tmp_path / "q.prom"
    bk = after_run(
        report, man, job="j", backup=cfg, metrics_file=str(prom), state=tmp_path / "state"
    )
    assert bk is not None and bk.ok and report.error is None, bk.error
    names = [p.name for p in report.phases]
    assert "backup: backup" in names and "backup: verify" in names
    m = parse(prom.read_text())["j"]
    assert m["last_run_success"] == 1 and m["freeze_window_seconds"] == report.window_s
    assert m["backup_files"] == bk.result.files


def test_after_run_without_backup_still_applies_snapshot_retention(loopfs, tmp_path):
    from quiesce.job.run import after_run, run_job
    from quiesce.job.validate import load_job

    pair = image_on_reflink_host(loopfs, "ext4")
    job_file = tmp_path / "j.toml"
    job_file.write_text(
        f'name = "j"\nvolumes = ["{pair.inner.path}"]\nstate_dir = "{tmp_path / "state"}"\n'
        '[provider]\ntype = "reflink"\n'
    )
    job_file.chmod(0o600)
    ids = []
    for _ in range(3):
        report = run_job(load_job(job_file))
        man = snapshots.load(report.manifest_id, tmp_path / "state")
        after_run(
            report, man, job="j", backup=None, retention=RetentionPolicy(keep_last=2),
            state=tmp_path / "state",
        )  # fmt: skip
        ids.append(man.id)
    assert [m.id for m in snapshots.list_manifests(tmp_path / "state")] == ids[1:]
    assert "retention" in [p.name for p in report.phases]


def test_quiesce_run_snapshots_then_backs_up_and_reports_it(loopfs, tmp_path):
    """`quiesce run` does everything: snapshot, then the [backup] section, in one report."""
    pair = image_on_reflink_host(loopfs, "xfs")
    make_tree(pair.inner.mountpoint / "data", n_files=10)
    job = _job(
        tmp_path, pair.inner.path,
        f'target = "tar"\ndirectory = "{tmp_path / "tars"}"\nverify = "full"\n',
        "[retention]\nkeep_last = 1\n",
    )  # fmt: skip
    p = _quiesce("run", "--json", str(job))
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)
    assert report["ok"] and report["manifest_id"]
    assert report["backup"]["ok"] is True
    assert report["backup"]["verify"]["ok"] is True
    assert any(ph["name"].startswith("backup: ") for ph in report["phases"])
    assert len(list((tmp_path / "tars").glob("*.tar.zst"))) == 1
    metrics = parse((tmp_path / "textfile" / "quiesce.prom").read_text())
    assert metrics["nightly"]["last_run_success"] == 1
    assert metrics["nightly"]["freeze_window_seconds"] > 0
    [man] = snapshots.list_manifests(tmp_path / "state")
    assert man.id == report["manifest_id"]


def test_backing_up_an_old_snapshot_keeps_its_backup_and_never_duplicates(loopfs, tmp_path):
    """`quiesce backup --snapshot OLD` once reported a restic snapshot that its own
    `forget --prune` (keep_last = 2) then removed; a second run made a duplicate that
    counted toward keep_last."""
    pair = image_on_reflink_host(loopfs, "xfs")
    make_tree(pair.inner.mountpoint / "d", n_files=5)
    pw = tmp_path / "pw"
    pw.write_text("secret")
    pw.chmod(0o600)
    restic = (
        f'target = "restic"\nrepository = "{tmp_path / "repo"}"\npassword_file = "{pw}"\n'
        'init = true\nhost = "h"\nverify = "none"\n'
    )
    job = _job(tmp_path, pair.inner.path, restic)  # no retention while setting up
    state = tmp_path / "state"
    old, mid, new = (
        snapshots.create([pair.inner.path], "reflink", job="nightly", state_dir=state)
        for _ in range(3)
    )
    for man in (mid, new):
        assert _quiesce("backup", str(job), "--snapshot", man.id).returncode == 0
    job = _job(tmp_path, pair.inner.path, restic, "[retention]\nkeep_last = 2\n")
    repo = ResticTarget(str(tmp_path / "repo"), password_file=str(pw), job="nightly", host="h")

    def held() -> dict[str, str | None]:
        return {s.id: s.source for s in repo.snapshots()}

    p = _quiesce("backup", str(job), "--snapshot", old.id, "--json")
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout)
    made = rep["backup"]["snapshot_id"]
    assert held().get(made) == old.id, "the backup just reported was pruned by its own run"
    assert not rep["already_backed_up"]

    again = _quiesce("backup", str(job), "--snapshot", new.id, "--json")
    assert again.returncode == 0, again.stderr
    rep = json.loads(again.stdout)
    assert rep["already_backed_up"] and "already backed up" in " ".join(rep["warnings"])
    assert held()[rep["backup"]["snapshot_id"]] == new.id
    # no duplicate; this run made nothing, so keep_last = 2 now drops `old` by policy
    assert sorted(held().values()) == sorted([mid.id, new.id])

    forced = _quiesce("backup", str(job), "--snapshot", new.id, "--force", "--json")
    assert forced.returncode == 0, forced.stderr
    assert not json.loads(forced.stdout)["already_backed_up"]
    # two archives of `new` are one snapshot to keep_last = 2: `mid` stays
    assert sorted(held().values()) == sorted([mid.id, new.id, new.id])
