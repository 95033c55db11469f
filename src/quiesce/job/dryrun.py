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
    for i, x in enumerate(h.session):
        name = hook_name(x, "session", i)
        before.append(
            f"session hook {name!r}: start {_argv_text(x.command)}, send 'freeze', "
            f"wait for 'ready' ({x.ready_timeout or t.hook:g}s)"
        )
        after.insert(
            0,
            f"session hook {name!r}: send 'thaw', wait for 'done' "
            f"({x.done_timeout or t.hook:g}s), close its stdin",
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
    for i, x in enumerate(h.after_run):
        after.append(
            f"after-run hook {hook_name(x, 'after_run', i)!r}: "
            f"{_argv_text(x.command)} (last, on every outcome; the report on stdin)"
        )
    return before, after


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
        steps.append("write the manifest and the report")


__all__ = ["describe_plan"]
