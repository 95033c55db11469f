"""`quiesce backup JOB.toml` and `quiesce restore` (registered by cli/app.py)."""

from __future__ import annotations

import contextlib
import signal
from pathlib import Path
from typing import Annotated, Any

import typer

from quiesce.cli.common import (
    JobFile,
    JobStateOpt,
    JsonOpt,
    StateDirOpt,
    chosen_state_dir,
    emit_json,
    err,
    fail,
    out,
    print_error,
)
from quiesce.cli.watch import Quiet, Verbose
from quiesce.errors import ExitCode, QuiesceError, UsageError


def _terminate_as_exit() -> None:
    """SIGTERM (systemd stop, timeout) unwinds like Ctrl-C: unmount, detach, kill children."""

    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def backup_cmd(
    job_file: JobFile,
    snapshot: Annotated[
        str | None, typer.Option("--snapshot", help="Back up this snapshot id, not the newest.")
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Back up the snapshot even if the target already holds a backup of it."
        ),
    ] = False,
    as_json: JsonOpt = False,
    verbose: Verbose = False,
    quiet: Quiet = False,
) -> None:
    """Back up the job's newest snapshot: mount it read-only at a stable path, run the
    [backup] target, verify, unmount, and apply [retention]. A snapshot already backed
    up is not backed up again: its backup is reported (--force makes another)."""
    from quiesce import snapshot as snapshots
    from quiesce.backup.phase import newest_snapshot, run_backup
    from quiesce.cli.watch import watching
    from quiesce.job.backupjob import load_backup_job
    from quiesce.state.statedir import state_dir

    _terminate_as_exit()
    try:
        job = load_backup_job(job_file)
        if job.backup is None:
            raise UsageError(
                f"job {job.name} has no [backup] section",
                '[backup] with target = "restic", repository = ..., password_file = ...',
            )
        state = state_dir(job.state_dir)
        man = snapshots.load(snapshot, state) if snapshot else newest_snapshot(job.name, state)
    except QuiesceError as e:
        raise fail(e, as_json) from None
    drill = None
    if job.backup.drill:
        from quiesce.apps.drills import backup_drill, targets_from_config

        fallback = targets_from_config(getattr(job.config, "writers", None))
        drill = backup_drill(None, scratch_root=job.backup.verify_dir, fallback=fallback)
    try:
        with watching(err, verbose=verbose, quiet=quiet) as events:
            report = run_backup(
                man, job.backup, job=job.name, state=state, retention=job.retention,
                events=events, force=force, drill=drill,
            )  # fmt: skip
    except (SystemExit, KeyboardInterrupt) as stop:
        err.print("quiesce: stopped by a signal; the snapshot's mounts were removed", markup=False)
        if job.metrics_file:
            from quiesce.job.metrics import RunMetrics, write_textfile

            with contextlib.suppress(OSError):
                keep = frozenset({"freeze_window_seconds"})
                stopped = RunMetrics(job.name, False, exit_code=_stop_code(stop), keep=keep)
                write_textfile(job.metrics_file, stopped)
        raise
    data = report.to_dict()
    if job.state_dir:  # hints must name the job's own state directory
        from quiesce.job.hints import with_job

        data["warnings"] = [with_job(w, str(job_file)) for w in data["warnings"]]
        for key in ("message", "hint"):
            if data.get("error") and isinstance(data["error"].get(key), str):
                data["error"][key] = with_job(data["error"][key], str(job_file))
    if job.metrics_file:
        from quiesce.job.metrics import run_metrics, write_textfile

        # an older snapshot's window is not the job's latest: keep the newest figure
        newest = snapshot is None or _is_newest(man, job.name, state)
        metrics = run_metrics(
            job.name, success=report.ok, exit_code=report.exit_code,
            duration_s=report.duration_s, backup=data,
            freeze_window_s=man.window_s if newest else None,
            keep=frozenset() if newest else frozenset({"freeze_window_seconds"}),
        )  # fmt: skip
        try:
            write_textfile(job.metrics_file, metrics)
        except OSError as e:
            data["warnings"].append(f"cannot write {job.metrics_file}: {e.strerror}")
    if as_json:
        emit_json(data)
    else:
        from quiesce.cli.render import print_backup_report

        print_backup_report(data, out, err)
    raise typer.Exit(report.exit_code)


def verify_cmd(
    snapshot: Annotated[str, typer.Argument(metavar="SNAPSHOT", help="A snapshot id (or prefix).")],
    app: Annotated[
        bool,
        typer.Option(
            "--app",
            help="The restore drill: start each application on a throwaway copy of the "
            "snapshot, let it recover, run its own check, remove the copy.",
        ),
    ] = False,
    job_file: JobStateOpt = None,
    state_dir: StateDirOpt = None,
    scratch: Annotated[
        Path | None,
        typer.Option(
            "--dir",
            help="Where the copy's writable layer goes (default: the --job's "
            "[backup] verify_dir, else /var/tmp); never on a volume of the group.",
        ),
    ] = None,
    timeout: Annotated[
        float, typer.Option("--timeout", help="Seconds for the whole drill.", min=1)
    ] = 600.0,
    as_json: JsonOpt = False,
) -> None:
    """Drill a snapshot: every application on it (the --job's writers, the snapshot's
    last drill, or the PostgreSQL and MariaDB data directories found on it) must
    recover on a throwaway copy and pass its own check. The result is recorded in the
    snapshot's manifest. Exit 14 if the drill failed."""
    from quiesce import snapshot as snapshots
    from quiesce.apps.drills import drill_snapshot, targets_from_config, targets_from_manifest
    from quiesce.errors import DrillFailed

    _terminate_as_exit()
    try:
        if not app:
            raise UsageError(
                "say what to verify: --app (the restore drill)",
                "quiesce verify --app SNAPSHOT; backups are verified by [backup] verify",
            )
        state = chosen_state_dir(state_dir, job_file)
        from quiesce.snapshot.store import resolve_id

        man = snapshots.load(resolve_id(snapshot, state), state)
        targets = targets_from_manifest(man)
        root: str | Path = scratch or "/var/tmp"
        mount_root = None
        if job_file is not None:
            from quiesce.job.backupjob import load_backup_job

            job = load_backup_job(job_file)
            targets = targets or targets_from_config(getattr(job.config, "writers", None))
            if job.backup is not None:
                root = scratch or job.backup.verify_dir
                mount_root = job.backup.mount_root
        from quiesce.state.statedir import state_dir as resolve_state

        report = drill_snapshot(
            man, state=resolve_state(state), targets=targets, scratch_root=root,
            mount_root=mount_root, timeout=timeout,
        )  # fmt: skip
    except QuiesceError as e:
        raise fail(e, as_json) from None
    data = report.to_dict()
    man.drill = data
    try:
        snapshots.save_manifest(state, man)
    except (OSError, QuiesceError) as e:
        err.print(f"quiesce: cannot record the drill in the manifest: {e}", markup=False)
    code = ExitCode.OK
    if not report.ok:
        failed = DrillFailed(f"the restore drill of {man.id} failed: {report.summary()}")
        code = failed.exit_code
        data["error"] = failed.to_dict()
    if as_json:
        emit_json(data)
    else:
        from quiesce.cli.render import print_drill

        print_drill(data, out, err)
        if data.get("error"):
            print_error(data["error"], err)
    raise typer.Exit(code)


def _stop_code(stop: BaseException) -> int:
    code = getattr(stop, "code", None)
    return code if isinstance(code, int) else 130


def _is_newest(man: Any, job: str, state: Path) -> bool:
    from quiesce.backup.phase import newest_snapshot

    try:
        return bool(newest_snapshot(job, state).id == man.id)
    except QuiesceError:
        return False


def restore_cmd(
    job_file: JobFile,
    dest: Annotated[Path, typer.Argument(help="A new or empty directory to restore into.")],
    backup_id: Annotated[
        str | None,
        typer.Option("--backup", help="This backup (an id, or its prefix), not the newest."),
    ] = None,
    volumes: Annotated[
        list[str] | None,
        typer.Option("--volume", help="Only this volume, by its slug (srv-db for /srv/db)."),
    ] = None,
    pitr: Annotated[
        bool,
        typer.Option(
            "--pitr",
            help="Write PostgreSQL's backup_label as backup_label (for a point-in-time "
            "recovery from your WAL archive), not as backup_label.quiesce.",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Restore the job's newest backup (or --backup ID) into DIR, each volume under its
    slug (/srv/db as DIR/srv-db). Never writes into a directory that is not empty."""
    from quiesce.backup.restoring import restore
    from quiesce.job.backupjob import load_backup_job
    from quiesce.state.statedir import state_dir

    _terminate_as_exit()
    try:
        job = load_backup_job(job_file)
        if job.backup is None:
            raise UsageError(
                f"job {job.name} has no [backup] section", "there is nothing to restore from"
            )
        res = restore(
            job.backup, job=job.name, state=state_dir(job.state_dir), dest=dest.absolute(),
            backup_id=backup_id, volumes=volumes or (), pitr=pitr,
        )  # fmt: skip
    except QuiesceError as e:
        raise fail(e, as_json) from None
    if as_json:
        emit_json(res.to_dict())
        return
    from quiesce.util.units import human_bytes, human_duration

    out.print(
        f"restored {res.target} backup {res.backup_id} ({res.backup_time}) of job "
        f"{job.name} to {res.dest}: {', '.join(res.volumes)}; {res.files} "
        f"file(s), {human_bytes(res.bytes)} in {human_duration(res.duration_s)}"
    )
    for done in res.app_files:
        out.print(f"{done} (from the snapshot's manifest)", markup=False)
    for w in res.warnings:
        err.print(f"warning: {w}", markup=False)


__all__ = [
    "backup_cmd",
    "restore_cmd",
]
