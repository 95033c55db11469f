"""`quiesce run JOB.toml` and `quiesce check JOB.toml` (registered by cli/app.py).

The job machinery (pydantic schema, writers, backup targets) is imported when one of
these commands runs, so that `quiesce thaw` and `quiesce status` start fast.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from quiesce.cli.common import JobFile, JsonOpt, emit_json, err, fail, out, print_error
from quiesce.cli.watch import Quiet, Verbose
from quiesce.errors import QuiesceError

if TYPE_CHECKING:
    from quiesce.job.schema import Job


DryRun = Annotated[
    bool, typer.Option("--dry-run", help="Print the plan (volumes, hazards, hooks, steps).")
]


def _load(job_file: Path, as_json: bool) -> Job:
    from quiesce.job.validate import load_job

    try:
        return load_job(job_file)
    except QuiesceError as e:
        raise fail(e, as_json) from None


def run_cmd(
    job_file: JobFile,
    dry_run: DryRun = False,
    as_json: JsonOpt = False,
    verbose: Verbose = False,
    quiet: Quiet = False,
) -> None:
    """Run a job: hooks and writers quiesce the applications, the group is frozen and
    snapshotted, everything is released; print the report. Progress goes to stderr as
    it happens (a live display on a terminal, timestamped lines otherwise)."""
    from quiesce.cli.render import render
    from quiesce.cli.watch import watching
    from quiesce.job.run import run_job

    try:
        job = _load(job_file, as_json)
    except typer.Exit as e:  # refused before it ran: the metrics say so too
        from quiesce.job.metrics import refused_run_metrics

        if not dry_run:
            refused_run_metrics(job_file, e.exit_code)
        raise
    # SIGTERM (systemd, cron, kill) unwinds like Ctrl-C: thaw, release every hook.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with watching(err, verbose=verbose, quiet=quiet or dry_run) as events:
        report = run_job(job, dry_run=dry_run, events=events)
    if as_json:
        sys.stdout.write(report.to_json() + "\n")
        sys.stdout.flush()
        if report.error:
            print_error(report.error)
    else:
        render(report, out, err)
    raise typer.Exit(report.exit_code)


def check_cmd(job_file: JobFile, as_json: JsonOpt = False) -> None:
    """Validate a job file (schema, permissions, hooks, volumes) and make every check a
    run would make (the backup repository, password file, directories); run nothing."""
    from quiesce.errors import JobConfigError
    from quiesce.job.readiness import readiness_problems

    job = _load(job_file, as_json)
    problems = readiness_problems(job)
    if problems:
        raise fail(JobConfigError(str(job_file), problems), as_json)
    c = job.config
    h = c.hooks
    summary = {
        "job": job.name,
        "file": str(job_file),
        "ok": True,
        "volumes": list(c.volumes),
        "provider": c.provider.type,
        "hooks": {
            "pre_freeze": len(h.pre_freeze),
            "post_thaw": len(h.post_thaw),
            "after_run": len(h.after_run),
            "session": len(h.session),
            "directory": [str(s) for s in job.hook_dir_scripts],
        },
        "writers": {k: len(v) for k, v in c.writers.model_dump().items()},
        "backup": (
            {"target": c.backup.target, "repository": c.backup.repository or c.backup.directory}
            if c.backup is not None
            else None
        ),
    }
    if as_json:
        emit_json(summary)
        return
    n_hooks = len(h.pre_freeze) + len(h.post_thaw) + len(h.after_run) + len(h.session)
    n_hooks += len(job.hook_dir_scripts)
    n_writers = sum(len(v) for v in (c.writers.sqlite, c.writers.postgresql, c.writers.mysql))
    out.print(
        f"{job_file!s}: OK (job {job.name}: {len(c.volumes)} volume(s), "
        f"provider {c.provider.type}, {n_hooks} hook(s), {n_writers} writer(s))"
    )


__all__ = ["check_cmd", "run_cmd"]
