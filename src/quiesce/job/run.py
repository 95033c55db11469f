"""Running a job: build its hooks and writers, hand them to ``snapshots.create`` as
quiescers, back up the snapshot, and turn what happened into a :class:`Report`.

The job file's schema and validation are in jobconfig.py.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from quiesce.apps.hooks import (
    INTERPRETERS,
    HookContext,
    HookDirectory,
    HookFailed,
    HookResult,
    HookSpec,
    PostThawCommands,
    PreFreezeCommands,
    Quiescer,
    SessionHook,
    SessionSpec,
    run_command,
)
from quiesce.backup.phase import after_run
from quiesce.errors import QuiesceError
from quiesce.job.report import Phase, Report
from quiesce.job.schema import (
    CommandHookConfig,
    Job,
    JobConfig,
    JobConfigError,
    Problem,
    SessionHookConfig,
    load_job,
)
from quiesce.state.journal import state_dir
from quiesce.state.locks import JobBusy, job_lock

# -- building the quiescers --------------------------------------------------------------------


class _Marked:
    """A quiescer with the report's phase marks around it (no quiescer of its own, so
    snapshots.create counts only real hooks and writers)."""

    def __init__(self, inner: Quiescer, marks: _PhaseMarks, *, first: bool, last: bool) -> None:
        self.inner, self.marks, self.first, self.last = inner, marks, first, last

    def before_freeze(self) -> None:
        if self.first:
            self.marks.start("pre-freeze hooks")
        self.inner.before_freeze()
        if self.last:
            self.marks.end("pre-freeze hooks")

    def after_thaw(self, ok: bool) -> None:
        if self.last:
            self.marks.start("post-thaw hooks")
        try:
            self.inner.after_thaw(ok)
        finally:
            if self.first:
                self.marks.end("pre-freeze hooks", ok=False)  # still open: a hook failed
                self.marks.end("post-thaw hooks")


class _PhaseMarks:
    """The report's "pre-freeze hooks" and "post-thaw hooks" phases."""

    def __init__(self) -> None:
        self.phases: list[Phase] = []
        self._open: dict[str, Phase] = {}

    def start(self, name: str) -> None:
        ph = Phase.begin(name)
        self._open[name] = ph
        self.phases.append(ph)

    def end(self, name: str, ok: bool = True) -> None:
        ph = self._open.pop(name, None)
        if ph is not None:
            ph.finish(ok)

    def wrap(self, quiescers: list[Quiescer]) -> list[Quiescer]:
        n = len(quiescers)
        return [
            _Marked(q, self, first=i == 0, last=i == n - 1) if i in (0, n - 1) else q
            for i, q in enumerate(quiescers)
        ]


_LONG_INFO = ("backup_label", "tablespace_map")  # in report.writers, not in the hook table


class GuardedWriter:
    """Runs a built-in writer under the job's policy, recording its steps."""

    def __init__(self, ctx: HookContext, writer: Any) -> None:
        self.ctx, self.writer = ctx, writer
        self.held = False

    def _step(self, kind: str, fn: Any, *args: Any) -> HookResult:
        from quiesce.apps.hooks import _Timer

        r = HookResult(name=self.writer.name, kind=kind)
        timer = _Timer(r)
        try:
            fn(*args)
        except Exception as e:
            r.status = "failed"
            r.error = getattr(e, "message", None) or f"{type(e).__name__}: {e}"
        timer.stop()
        shown = {k: v for k, v in self.writer.info.items() if k not in _LONG_INFO}
        if shown:
            r.output = json.dumps(shown, separators=(", ", ": "), default=str)
        return self.ctx.record(r)

    def before_freeze(self) -> None:
        r = self._step("writer", self.writer.before_freeze)
        if r.ok:
            self.held = True
        else:
            self.ctx.failed(r, quiescing=True)

    def after_thaw(self, ok: bool) -> None:
        if not self.held:
            return
        self.held = False
        r = self._step("writer-release", self.writer.after_thaw, ok)
        if not r.ok:
            self.ctx.failed(r, quiescing=False)


def build_writers(config: JobConfig) -> list[Any]:
    from quiesce.apps.writers.mysql import MysqlWriter
    from quiesce.apps.writers.postgresql import PostgresWriter
    from quiesce.apps.writers.sqlite import SqliteWriter

    w = config.writers
    out: list[Any] = []
    for i, s in enumerate(w.sqlite):
        out.append(
            SqliteWriter(
                s.databases,
                busy_timeout=s.busy_timeout,
                checkpoint=s.checkpoint,
                name=s.name or f"sqlite[{i}]",
            )
        )
    for i, pg in enumerate(w.postgresql):
        out.append(
            PostgresWriter(
                pg.dsn,
                checkpoint=pg.checkpoint,
                backup=pg.backup,
                label=pg.label,
                timeout=pg.timeout,
                name=pg.name or f"postgresql[{i}]",
            )
        )
    for i, m in enumerate(w.mysql):
        out.append(
            MysqlWriter(
                unix_socket=m.unix_socket,
                host=m.host,
                port=m.port,
                user=m.user,
                password=m.password,
                defaults_file=m.defaults_file,
                timeout=m.timeout,
                lock=m.lock,
                name=m.name or f"mysql[{i}]",
            )
        )
    return out


def _hook_name(h: CommandHookConfig | SessionHookConfig, kind: str, i: int) -> str:
    """The hook's name, else its kind, index and program (the script, for interpreters)."""
    if h.name:
        return h.name
    prog = Path(h.command[0]).name
    if prog.rstrip("0123456789.") in INTERPRETERS and len(h.command) > 1:
        prog = Path(h.command[1]).name
    return f"{kind}[{i}] {prog}"


def build_quiescers(
    job: Job, ctx: HookContext, marks: _PhaseMarks | None = None, writers: Sequence[Any] = ()
) -> list[Quiescer]:
    """Hooks and writers in the order they quiesce; create() releases them in reverse.

    Post-thaw commands come first so that they run last, on every path out. Only what
    the job has is in the list: snapshots.create calls a run with quiescers
    application-consistent.
    """
    h = job.config.hooks
    out: list[Quiescer] = []
    if h.post_thaw:
        specs = [
            HookSpec(_hook_name(x, "post_thaw", i), list(x.command), x.timeout)
            for i, x in enumerate(h.post_thaw)
        ]
        out.append(PostThawCommands(ctx, specs))
    if h.pre_freeze:
        specs = [
            HookSpec(_hook_name(x, "pre_freeze", i), list(x.command), x.timeout)
            for i, x in enumerate(h.pre_freeze)
        ]
        out.append(PreFreezeCommands(ctx, specs))
    if job.hook_dir_scripts:
        out.append(HookDirectory(ctx, job.hook_dir_scripts, h.directory_timeout))
    for i, x in enumerate(h.session):
        name = _hook_name(x, "session", i)
        out.append(
            SessionHook(ctx, SessionSpec(name, list(x.command), x.ready_timeout, x.done_timeout))
        )
    out += [GuardedWriter(ctx, w) for w in writers]
    return marks.wrap(out) if marks is not None and out else out


# -- running ------------------------------------------------------------------------------------


def _wall(mono_ns: int | None, anchor: tuple[float, float]) -> float | None:
    """A monotonic timestamp (ns) as unix time, given one (wall, monotonic) pair."""
    if mono_ns is None:
        return None
    wall, mono = anchor
    return wall + (mono_ns / 1e9 - mono)


def _window_phases(window: dict[str, Any], anchor: tuple[float, float]) -> list[Phase]:
    """Per-volume syncfs, freeze and thaw phases from the window's durations.

    Freezes run back to back from the window's start, thaws back to back up to its
    end (the gaps are IPC round trips of microseconds); syncfs runs just before.
    """
    vols = [v for v in window.get("volumes", []) if v.get("state") != "skipped"]
    start = _wall(window.get("start_ns"), anchor)
    end = _wall(window.get("end_ns"), anchor)
    out: list[Phase] = []
    if start is None:
        return out
    syncfs = [v for v in vols if v.get("syncfs_s") is not None]
    t = start - sum(v["syncfs_s"] for v in syncfs)
    for v in syncfs:
        out.append(
            Phase(
                name=f"syncfs {v['mount_point']}",
                start=t,
                end=t + v["syncfs_s"],
                duration_s=v["syncfs_s"],
            )
        )
        t += v["syncfs_s"]
    t = start
    for v in vols:
        if v.get("freeze_s") is not None:
            out.append(
                Phase(
                    name=f"freeze {v['mount_point']}",
                    start=t,
                    end=t + v["freeze_s"],
                    duration_s=v["freeze_s"],
                    ok=v.get("state") != "failed",
                )
            )
            t += v["freeze_s"]
    frozen_end = t
    if end is not None:
        t = end
        for v in vols:  # freeze order; thawed in reverse, so the first thaws last
            if v.get("thaw_s") is not None:
                out.append(
                    Phase(
                        name=f"thaw {v['mount_point']}",
                        start=t - v["thaw_s"],
                        end=t,
                        duration_s=v["thaw_s"],
                        ok=v.get("state") == "thawed",
                        detail=v.get("thawed_by"),
                    )
                )
                t -= v["thaw_s"]
        out.append(
            Phase(
                name="provider snapshot (frozen)",
                start=frozen_end,
                end=t,
                duration_s=max(t - frozen_end, 0.0),
            )
        )
        out.append(
            Phase(
                name="freeze window",
                start=start,
                end=end,
                duration_s=end - start,
                detail=window.get("thawed_by"),
            )
        )
    return out


_SKIPPED_PHASES = {"before_freeze", "after_thaw"}  # the hooks' own marks are more precise


def _create_phases(
    phases: Sequence[dict[str, Any]], called: float, hooks_start: float | None
) -> list[Phase]:
    """snapshots.create's phases carry durations only: they ran back to back from
    ``called`` (unix time), or, more exactly, around the moment the hooks started."""
    out, t = [], called
    for d in phases:
        ph = Phase.from_any(d)
        dur = ph.duration_s or 0.0
        ph.start, ph.end = t, t + dur
        t += dur
        out.append(ph)
    mark = next((p.start for p in out if p.name == "before_freeze"), None)
    if hooks_start is not None and mark is not None:
        for p in out:
            p.start, p.end = p.start + hooks_start - mark, p.end + hooks_start - mark
    return [p for p in out if p.name not in _SKIPPED_PHASES]


def _fill_from_manifest(
    report: Report,
    manifest: Any,
    called: float,
    anchor: tuple[float, float],
    hooks_start: float | None,
) -> None:
    report.manifest_id = manifest.id
    report.consistency = manifest.consistency
    report.consistency_reason = manifest.consistency_reason
    report.freeze_mode = manifest.freeze_mode
    report.window = manifest.window
    report.snapshots = list(manifest.snapshots)
    report.phases += _create_phases(manifest.phases, called, hooks_start)
    if manifest.window:
        report.phases += _window_phases(manifest.window, anchor)
    report.warnings += [w for w in manifest.warnings if w not in report.warnings]


def _degrade(manifest: Any, reasons: Sequence[str], state: str | None) -> str | None:
    """A failed hook that the policy let pass: the stored manifest must say so too."""
    from quiesce.snapshot import engine as snapshots

    manifest.consistency = "crash"
    manifest.consistency_reason = (
        "only crash-consistent: " + "; ".join(reasons) + " (on_hook_failure = crash-consistent)"
    )
    save = getattr(snapshots, "save_manifest", None) or snapshots._write_manifest
    try:
        save(snapshots.state_dir_path(state), manifest)
    except Exception as e:
        return f"could not rewrite the manifest {manifest.id} as crash-consistent: {e}"
    return None


# -- dry run ------------------------------------------------------------------------------------


def _argv_text(argv: Sequence[str]) -> str:
    import shlex

    return shlex.join(argv)


def _quiesce_steps(job: Job) -> tuple[list[str], list[str]]:
    """What the hooks and writers do before the window, and after it (in that order)."""
    c = job.config
    h, t = c.hooks, c.timeouts
    before: list[str] = []
    after: list[str] = []
    for i, x in enumerate(h.pre_freeze):
        before.append(
            f"pre-freeze hook {_hook_name(x, 'pre_freeze', i)!r}: "
            f"{_argv_text(x.command)} (timeout {x.timeout or t.hook:g}s)"
        )
    for s in job.hook_dir_scripts:
        before.append(f"hook directory: {s} freeze (timeout {h.directory_timeout or t.hook:g}s)")
        after.insert(0, f"hook directory: {s} thaw")
    for i, x in enumerate(h.session):
        name = _hook_name(x, "session", i)
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
        if w.kind == "sqlite":
            dbs = ", ".join(str(d) for d in w.databases)
            before.append(f"writer {w.name}: WAL checkpoint, then BEGIN IMMEDIATE on {dbs}")
            after.insert(0, f"writer {w.name}: ROLLBACK (release the write lock)")
        elif w.kind == "postgresql":
            what = "CHECKPOINT" if w.checkpoint else "connect"
            if w.backup:
                what += ", pg_backup_start (session held across the window)"
                after.insert(0, f"writer {w.name}: pg_backup_stop (backup_label in the report)")
            before.append(f"writer {w.name}: {what}")
        elif w.kind == "mysql":
            take, release = {
                "auto": ("BACKUP STAGE BLOCK_COMMIT on MariaDB >= 10.4.1, else FLUSH TABLES "
                         "WITH READ LOCK", "BACKUP STAGE END / UNLOCK TABLES"),
                "backup_stage": ("BACKUP STAGE START, BLOCK_COMMIT", "BACKUP STAGE END"),
                "flush_tables": ("FLUSH TABLES WITH READ LOCK", "UNLOCK TABLES"),
            }[w.lock]  # fmt: skip
            before.append(f"writer {w.name}: {take} (session held)")
            after.insert(0, f"writer {w.name}: {release}")
    for i, x in enumerate(h.post_thaw):
        after.append(
            f"post-thaw hook {_hook_name(x, 'post_thaw', i)!r}: "
            f"{_argv_text(x.command)} (on every path out)"
        )
    for i, x in enumerate(h.after_run):
        after.append(
            f"after-run hook {_hook_name(x, 'after_run', i)!r}: "
            f"{_argv_text(x.command)} (last, on every outcome; the report on stdin)"
        )
    return before, after


def describe_plan(job: Job, report: Report) -> None:
    """Fill ``report.plan`` and ``report.steps`` for ``--dry-run``. Changes nothing."""
    from quiesce.freezing.plan import make_plan
    from quiesce.providers.base import FreezeMode, get_provider

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
        before, after = _quiesce_steps(job)
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


def run_job(job: Job, *, dry_run: bool = False) -> Report:
    """Run the job (or, with ``dry_run``, describe what it would do) and return its report.

    Never raises for failures of the run itself: they are in ``report.error`` and
    ``report.exit_code``.
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
    except JobBusy as e:  # nothing was run: no hook, no writer, no freeze
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
        return _run_locked(job, report)


def _run_locked(job: Job, report: Report) -> Report:
    c = job.config
    ctx = HookContext(
        job=job.name,
        volumes=list(c.volumes),
        on_hook_failure=c.on_hook_failure,
        default_timeout=c.timeouts.hook,
        deadline=time.monotonic() + c.timeouts.run,
    )
    marks = _PhaseMarks()
    manifest: Any = None
    writers: list[Any] = []
    called = time.time()
    anchor = (time.time(), time.monotonic())
    try:
        from quiesce.snapshot import engine as snapshots

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
            allow_self=c.allow_self,
            state_dir=Path(c.state_dir) if c.state_dir else None,
            quiescers=quiescers,
        )
    except QuiesceError as e:
        report.set_error(e)
        manifest = e.details.get("manifest")
        window = e.details.get("window")
        if manifest is None and window is not None:
            report.window = window.to_dict() | {
                "start_ns": window.start_ns,
                "end_ns": window.end_ns,
            }
            report.phases += _window_phases(report.window, anchor)
    except Exception as e:  # a bug: still report what the hooks did
        report.set_error(
            QuiesceError(
                f"internal error: {type(e).__name__}: {e}",
                "please report this bug, with this report",
            )
        )
    if manifest is not None:
        if ctx.degraded:
            problem = _degrade(manifest, ctx.degraded, c.state_dir)
            if problem:
                ctx.warnings.append(problem)
        hooks_start = next((p.start for p in marks.phases if p.name == "pre-freeze hooks"), None)
        _fill_from_manifest(report, manifest, called, anchor, hooks_start)
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
    )
    report.finish()
    _after_run_hooks(job, ctx, report)
    return report


def _after_run_hooks(job: Job, ctx: HookContext, report: Report) -> None:
    """``hooks.after_run``: last, on every outcome, told how the run went (environment,
    and the report as JSON on stdin) so that they can notify or ping a monitor. Their
    failure is a warning: the run's own outcome stands."""
    specs = job.config.hooks.after_run
    if not specs:
        return
    env = ctx.env("after-run") | {
        "QUIESCE_STATUS": "ok" if report.ok else "failed",
        "QUIESCE_EXIT_CODE": str(report.exit_code),
        "QUIESCE_ERROR": (report.error or {}).get("message", ""),
        "QUIESCE_SNAPSHOT": report.manifest_id or "",
    }
    stdin = report.to_json().encode()
    for i, h in enumerate(specs):
        r = run_command(
            list(h.command), name=_hook_name(h, "after_run", i), kind="after-run",
            timeout=h.timeout or job.config.timeouts.hook, env=env, stdin=stdin,
        )  # fmt: skip
        report.hooks.append(r.to_dict())
        if not r.ok:
            report.warnings.append(r.describe())


__all__ = [
    "Job",
    "JobConfig",
    "JobConfigError",
    "Problem",
    "build_quiescers",
    "build_writers",
    "describe_plan",
    "load_job",
    "run_job",
]
