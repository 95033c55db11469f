"""``quiesce run --dry-run``: every step a run would take, in order. Changes nothing."""

from __future__ import annotations

import shlex
from collections.abc import Sequence

from quiesce.errors import QuiesceError
from quiesce.job.build import build_writers, hook_name
from quiesce.job.report import Report
from quiesce.job.schema import Job


def _argv_text(argv: Sequence[str]) -> str:
    return shlex.join(argv)


def _quiesce_steps(job: Job) -> tuple[list[str], list[str]]:
    """What the hooks and writers do before the window, and after it (in that order)."""
    c = job.config
    h, t = c.hooks, c.timeouts
    before: list[str] = []
    after: list[str] = []
    for i, x in enumerate(h.pre_freeze):
        before.append(
            f"pre-freeze hook {hook_name(x, 'pre_freeze', i)!r}: "
            f"{_argv_text(x.command)} (timeout {x.timeout or t.hook:g}s)"
        )
    for s in job.hook_dir_scripts:
        before.append(f"hook directory: {s} freeze (timeout {h.directory_timeout or t.hook:g}s)")
        after.insert(0, f"hook directory: {s} thaw")
    for i, sx in enumerate(h.session):
        name = hook_name(sx, "session", i)
        before.append(
            f"session hook {name!r}: start {_argv_text(sx.command)}, send 'freeze', "
            f"wait for 'ready' ({sx.ready_timeout or t.hook:g}s)"
        )
        after.insert(
            0,
            f"session hook {name!r}: send 'thaw', wait for 'done' "
            f"({sx.done_timeout or t.hook:g}s), close its stdin",
        )
    for w in build_writers(c):
        take, release = w.describe()
        before.append(f"writer {w.name}: {take}")
        if release:
            after.insert(0, f"writer {w.name}: {release}")
    for i, x in enumerate(h.post_thaw):
        after.append(
            f"post-thaw hook {hook_name(x, 'post_thaw', i)!r}: "
            f"{_argv_text(x.command)} (on every path out)"
        )
    return before, after


def _after_steps(job: Job) -> list[str]:
    """What a run does after the snapshot, in the order job/run.py does it: the backup
    phase (backup/phase.py), retention, the metrics file, the after-run hooks."""
    c = job.config
    steps: list[str] = []
    b, policy = c.backup, c.retention
    rules = ", ".join(f"keep_{k} = {n}" for k, n in policy.counts().items() if n) or "none"
    if b is not None:
        where = b.repository or b.directory or _argv_text(b.command or [])
        steps.append("backup: remove what crashed runs left behind (the cleanup journal)")
        if b.init:
            steps.append(f"backup: create the {b.target} repository {where} if it does not exist")
        steps.append(
            f"backup: if {b.target} already holds a backup of this snapshot, report it and stop"
        )
        steps.append(
            f"backup: mount the snapshot read-only at {b.mount_root}/{c.name}/<volume> "
            "(nosuid, nodev, noexec)"
        )
        steps.append(
            f"backup: {b.target} backup to {where}"
            + (f" (timeout {b.timeout:g}s)" if b.timeout else "")
        )
        if b.check != "none":
            detail = f", {b.sample_files} file(s) restored under {b.verify_dir}"
            steps.append(
                f"verify ({b.check}) the backup against the snapshot"
                + (detail if b.check in ("sample", "full") else "")
            )
        if b.drill:
            steps.append(
                "restore drill (verify = app): each writer's application started on an overlay "
                f"copy of the snapshot (upper layer under {b.verify_dir}), recovered, checked"
            )
        steps.append("backup: unmount the snapshot")
        if b.delete_snapshot:
            steps.append("retention: delete the snapshot just backed up (delete_snapshot)")
        if not policy.empty:
            steps.append(f"retention of the job's snapshots ({rules}); never the new one")
        if b.prune and not policy.empty:
            steps.append(
                f"prune the {b.target} backups ({rules}, counting snapshots); never the new one"
            )
    elif not policy.empty:
        steps.append(f"retention of the job's snapshots ({rules}); never the new one")
    if c.metrics_file:
        steps.append(f"metrics: write {c.metrics_file} (Prometheus textfile)")
    for i, x in enumerate(c.hooks.after_run):
        steps.append(
            f"after-run hook {hook_name(x, 'after_run', i)!r}: "
            f"{_argv_text(x.command)} (last, on every outcome; the report on stdin)"
        )
    return steps


def describe_plan(job: Job, report: Report) -> None:
    """Fill ``report.plan`` and ``report.steps`` for ``--dry-run``. Changes nothing."""
    from quiesce.freezing.plan import make_plan
    from quiesce.providers.base import FreezeMode
    from quiesce.providers.registry import get_provider

    c = job.config
    t = c.timeouts
    steps = report.steps
    try:
        plan = make_plan(list(c.volumes), allow_self=c.allow_self)
    except QuiesceError as e:
        report.set_error(e)
        return
    with plan:
        report.plan = plan.to_dict()
        members = [m for m in plan.members if not m.skip]
        names = [m.name for m in members]
        mode: str = FreezeMode.FIFREEZE
        provider = None
        try:
            provider = get_provider(c.provider.type)(**c.provider.options)
            mode = provider.freeze_mode(members)
            provider.check(members)
        except QuiesceError as e:
            report.warnings.append(f"provider {c.provider.type}: {e.message}")
        report.freeze_mode = str(mode)
        if plan.refused:
            report.warnings.append(
                "the plan is refused: " + "; ".join(h.message for h in plan.refused)
            )
        from quiesce.job.readiness import readiness_problems

        report.warnings += [str(p) for p in readiness_problems(job)]
        steps.append(f"plan: {len(plan.members)} volume(s), freeze order: {', '.join(names)}")
        steps.append(f"provider {c.provider.type}: check and prepare (outside the window)")
        try:
            before, after = _quiesce_steps(job)
        except QuiesceError as e:  # a writer's password_env is not set: the run would stop
            report.set_error(e)
            return
        steps += before
        if mode == FreezeMode.FIFREEZE:
            steps.append(f"start the guardian (deadline {t.freeze:g}s, lease {t.lease:g}s)")
        if c.syncfs:
            steps.append("syncfs: " + ", ".join(names))
        step = provider.before_freeze_step() if provider is not None else None
        if step:
            steps.append(step)
        if mode == FreezeMode.FIFREEZE:
            steps.append("FIFREEZE in order: " + ", ".join(names))
        elif mode == FreezeMode.PROVIDER:
            steps.append("no FIFREEZE: the provider freezes the filesystems itself")
        else:
            steps.append("no FIFREEZE: the provider's snapshot is atomic")
        steps.append(f"{c.provider.type} snapshot of the group")
        if mode == FreezeMode.FIFREEZE:
            steps.append("FITHAW in reverse order: " + ", ".join(reversed(names)))
        steps += after
        steps.append("write the manifest")
        steps += _after_steps(job)
        steps.append("write the report")


__all__ = ["describe_plan"]
