"""Running a job: build its quiescers, hand them to ``quiesce.snapshot.create``, back up
the snapshot, apply retention, write the metrics, run the after-run hooks, and turn what
happened into a :class:`Report`. Never raises for the run's own failures.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from quiesce import snapshot as snapshots
from quiesce.apps.hooks import HookContext, run_command
from quiesce.backup.config import BackupConfig
from quiesce.backup.phase import BackupReport, apply_snapshot_retention, run_backup
from quiesce.backup.targets.base import ProgressFn
from quiesce.errors import HookFailed, JobBusy, QuiesceError, ReleaseFailed, UntrustedState
from quiesce.job.build import PhaseMarks, build_quiescers, build_writers, hook_files, hook_name
from quiesce.job.dryrun import describe_plan
from quiesce.job.metrics import run_metrics, write_textfile
from quiesce.job.report import Phase, Report
from quiesce.job.schema import Job
from quiesce.job.timeline import fill_from_manifest, window_phases
from quiesce.snapshot.consistency import Consistency
from quiesce.state.locks import job_lock
from quiesce.state.retention import RetentionPolicy
from quiesce.state.statedir import state_dir
from quiesce.util.events import EventFn, emit, phase_events
from quiesce.util.redact import redact


def _degrade(manifest: Any, reasons: Sequence[str], state: str | None) -> str | None:
    """A failed hook that the policy let pass: the application was not quiesced, so at
    best the restore sees what a power cut leaves (``atomic``); the stored manifest must
    say so too."""
    from quiesce import snapshot as snapshots

    level = Consistency.read(manifest.consistency).at_most(Consistency.ATOMIC)
    manifest.consistency = str(level)
    manifest.consistency_reason = (
        "not quiesced, as after a power cut at best: "
        + "; ".join(reasons)
        + " (on_hook_failure = crash-consistent); "
        + manifest.consistency_reason
    )
    try:
        snapshots.save_manifest(state, manifest)
    except Exception as e:
        return f"could not rewrite the manifest {manifest.id} as crash-consistent: {e}"
    return None


def run_job(job: Job, *, dry_run: bool = False, events: EventFn | None = None) -> Report:
    """Run the job (or, with ``dry_run``, describe what it would do) and return its report.

    Never raises for failures of the run itself: they are in ``report.error`` and
    ``report.exit_code``. ``events`` hears each phase as it starts and ends, and the
    backup's progress; those of the freeze window only after the thaw.
    """
    c = job.config
    report = Report(
        job=job.name,
        job_file=str(job.path) if job.path else None,
        provider=c.provider.type,
        volumes=list(c.volumes),
        dry_run=dry_run,
        on_hook_failure=c.on_hook_failure,
    )
    if dry_run:
        describe_plan(job, report)
        return report.finish()
    lock = contextlib.ExitStack()
    try:
        lock.enter_context(job_lock(state_dir(c.state_dir), job.name))
    except (JobBusy, UntrustedState) as e:  # nothing was run: no hook, no writer, no freeze
        report.set_error(e)
        return report.finish()
    except OSError as e:
        report.set_error(
            QuiesceError(
                f"cannot use the state directory {state_dir(c.state_dir)}: {e.strerror}",
                "set state_dir in the job (or QUIESCE_STATE_DIR) to a writable directory",
            )
        )
        return report.finish()
    with lock:
        return _run_locked(job, report, events)


def _run_locked(job: Job, report: Report, events: EventFn | None = None) -> Report:
    c = job.config
    ctx = HookContext(
        job=job.name,
        volumes=list(c.volumes),
        on_hook_failure=c.on_hook_failure,
        default_timeout=c.timeouts.hook,
        deadline=time.monotonic() + c.timeouts.run,
    )
    marks = PhaseMarks()
    manifest: Any = None
    writers: list[Any] = []
    called = time.time()
    anchor = (time.time(), time.monotonic())
    try:
        writers = build_writers(c)
        quiescers = build_quiescers(job, ctx, marks, writers)
        called = time.time()
        manifest = snapshots.create(
            list(c.volumes),
            c.provider.type,
            job=job.name,
            options=c.provider.options,
            timeout=c.timeouts.freeze,
            lease=c.timeouts.lease,
            syncfs=c.syncfs,
            expedite=c.expedite,
            end_blockers_after=c.timeouts.end_blockers_after,
            allow_self=c.allow_self,
            state_dir=Path(c.state_dir) if c.state_dir else None,
            quiescers=quiescers,
            events=events,
            depends_on=hook_files(job),
        )
        if c.backup is not None:  # incomplete (retention: not counted) until backed up
            manifest.backup = {"ok": False, "state": "pending", "target": c.backup.target}
            snapshots.save_manifest(c.state_dir, manifest)
    except QuiesceError as e:
        report.set_error(e)
        manifest = e.manifest if isinstance(e, ReleaseFailed) else None
        window = e.window
        if manifest is None and window is not None:
            report.window = window.to_dict() | {
                "start_ns": window.start_ns,
                "end_ns": window.end_ns,
            }
            report.phases += window_phases(report.window, anchor)
    except Exception as e:  # a bug: still report what the hooks did
        report.set_error(
            QuiesceError(
                f"internal error: {type(e).__name__}: {e}",
                "please report this bug, with this report",
            )
        )
    if manifest is not None:
        if writers:  # backup_label & co. go into the manifest, for restore
            from quiesce.job.appfiles import keep_app_files

            ctx.warnings += keep_app_files(manifest, writers, c.state_dir)
        if ctx.degraded:
            problem = _degrade(manifest, ctx.degraded, c.state_dir)
            if problem:
                ctx.warnings.append(problem)
        hooks_start = next((p.start for p in marks.phases if p.name == "pre-freeze hooks"), None)
        fill_from_manifest(report, manifest, called, anchor, hooks_start)
    report.phases += marks.phases
    report.hooks = [r.to_dict() for r in ctx.results]
    report.warnings += [w for w in ctx.warnings if w not in report.warnings]
    report.writers = [{"name": w.name, "kind": w.kind, "info": dict(w.info)} for w in writers]
    if ctx.release_failures and report.error is None:
        kept = f"; the snapshot {manifest.id} was kept" if manifest is not None else ""
        report.set_error(
            HookFailed(
                "; ".join(ctx.release_failures) + kept,
                "the application may still be quiesced: check it, and the hook's output",
            )
        )
    after_run(
        report,
        manifest,
        job=job.name,
        backup=c.backup,
        retention=c.retention,
        metrics_file=c.metrics_file,
        state=c.state_dir,
        events=events,
        writers=writers,
    )
    if c.state_dir and job.path:  # its hints must name the job's state directory
        _hints_with_job(report, str(job.path))
    report.finish()
    if job.config.hooks.after_run:
        with phase_events(events, "after-run hooks"):
            _after_run_hooks(job, ctx, report)
    return report


def _hints_with_job(report: Report, job_file: str) -> None:
    from quiesce.job.hints import with_job

    if report.error:
        for key in ("message", "hint"):
            if isinstance(report.error.get(key), str):
                report.error[key] = with_job(report.error[key], job_file)
    report.warnings = [with_job(w, job_file) for w in report.warnings]


def after_run(
    report: Report,
    manifest: Any,
    *,
    job: str,
    backup: BackupConfig | None,
    retention: RetentionPolicy | None = None,
    metrics_file: str | None = None,
    state: str | Path | None = None,
    progress: ProgressFn | None = None,
    events: EventFn | None = None,
    writers: Sequence[Any] | None = None,
) -> BackupReport | None:
    """What ``quiesce run`` does after the snapshot: the backup phase if the job has
    ``[backup]`` and the snapshot succeeded (else [retention] prunes snapshots), then the
    metrics file. Mutates ``report``: ``backup``, phases, warnings, and the error/exit
    code of a failed backup. ``writers`` name the applications the restore drill starts
    (``verify`` holds ``app``)."""
    bk = None
    if backup is not None and manifest is not None and report.error is None:
        drill = None
        if backup.drill:
            from quiesce.apps.drills import backup_drill, targets_from_writers

            targets = targets_from_writers(writers) if writers else None
            drill = backup_drill(targets, scratch_root=backup.verify_dir)
        bk = run_backup(
            manifest, backup, job=job, state=state, retention=retention, progress=progress,
            events=events, drill=drill,
            force=True,  # this run just made the snapshot: no target holds it (one restic less)
        )  # fmt: skip
        report.backup = bk.to_dict()
        report.phases += [Phase.from_any(p | {"name": f"backup: {p['name']}"}) for p in bk.phases]
        report.warnings += [w for w in bk.warnings if w not in report.warnings]
        if bk.error is not None:
            report.ok = False
            report.exit_code = bk.exit_code
            report.error = bk.error
    elif manifest is not None and report.error is None and retention and not retention.empty:
        # no [backup]: [retention] still prunes the job's snapshots (never the new one)
        phase = Phase.begin("retention")
        emit(events, "start", "retention")
        try:
            kept = apply_snapshot_retention(job, retention, state_dir(state), keep={manifest.id})
            report.warnings += [f"retention: {f}" for f in kept["failed"]]
            phase.detail = f"deleted {len(kept['deleted'])} snapshot(s)"
            report.phases.append(phase.finish(ok=not kept["failed"]))
        except QuiesceError as e:
            report.warnings.append(f"retention: {e.message}")
            report.phases.append(phase.finish(ok=False))
        emit(events, "end", "retention", ok=report.phases[-1].ok)
    if metrics_file:
        metrics = run_metrics(
            job,
            success=report.error is None,
            exit_code=report.exit_code,
            duration_s=time.monotonic() - report.t0,
            freeze_window_s=report.window_s,
            backup=bk.to_dict() if bk is not None else None,
            consistency=getattr(manifest, "consistency", None),
        )
        try:
            write_textfile(metrics_file, metrics)
        except OSError as e:
            report.warnings.append(f"cannot write the metrics file {metrics_file}: {e.strerror}")
    return bk


def _after_run_hooks(job: Job, ctx: HookContext, report: Report) -> None:
    """``hooks.after_run``: last, on every outcome, told how the run went (environment,
    and the report as JSON on stdin) so that they can notify or ping a monitor. Their
    failure is a warning: the run's own outcome stands."""
    specs = job.config.hooks.after_run
    if not specs:
        return
    told = {
        "QUIESCE_STATUS": "ok" if report.ok else "failed",
        "QUIESCE_EXIT_CODE": str(report.exit_code),
        "QUIESCE_ERROR": redact((report.error or {}).get("message", "")),
        "QUIESCE_SNAPSHOT": report.manifest_id or "",
    }
    stdin = report.to_json().encode()  # redacted (Report's serializer)
    for i, h in enumerate(specs):
        r = run_command(
            list(h.command), name=hook_name(h, "after_run", i), kind="after-run",
            timeout=h.timeout or job.config.timeouts.hook,
            env=ctx.env("after-run", h.env) | told, stdin=stdin,
        )  # fmt: skip
        report.hooks.append(r.to_dict())
        if not r.ok:
            report.warnings.append(r.describe())


__all__ = ["after_run", "run_job"]
