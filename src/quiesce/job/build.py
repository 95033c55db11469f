"""Building a run's quiescers from its job: hooks and writers, in the order they quiesce,
each writer guarded by the job's failure policy, with the report's phase marks."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from quiesce.apps.hooks import (
    INTERPRETERS,
    HookContext,
    HookDirectory,
    HookResult,
    HookSpec,
    PostThawCommands,
    PreFreezeCommands,
    SessionHook,
    SessionSpec,
    StepTimer,
)
from quiesce.apps.writers import WriterConfig
from quiesce.errors import QuiesceError, UsageError
from quiesce.job.report import Phase
from quiesce.job.schema import CommandHookConfig, Job, JobConfig, SessionHookConfig
from quiesce.snapshot.consistency import Claim
from quiesce.snapshot.quiescers import Quiescer, claim_of, files_of, quiesces, quiescing_steps
from quiesce.util.redact import redact, register_secret

_C = TypeVar("_C", bound=WriterConfig)


class _Marked:
    """A quiescer with the report's phase marks around it (no quiescer of its own, so
    snapshots.create counts only real hooks and writers)."""

    def __init__(self, inner: Quiescer, marks: PhaseMarks, *, first: bool, last: bool) -> None:
        self.inner, self.marks, self.first, self.last = inner, marks, first, last

    @property
    def quiesces(self) -> bool:
        return quiesces(self.inner)

    @property
    def steps(self) -> list[str]:
        return quiescing_steps(self.inner)

    @property
    def who(self) -> str:
        q = self.inner
        return str(getattr(q, "who", None) or getattr(q, "name", None) or type(q).__name__)

    def depends_on(self) -> list[tuple[str, str]]:
        return files_of(self.inner)

    def claims(self, frozen_ns: int | None) -> list[Claim]:
        return claim_of(self.inner, frozen_ns)

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


class PhaseMarks:
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
        self.quiesced = False  # before_freeze succeeded (stays set after the release)

    @property
    def steps(self) -> list[str]:
        """What quiesced, for the consistency reason."""
        return [f"writer {self.writer.name}"]

    @property
    def who(self) -> str:
        return f"writer {self.writer.name}"

    def depends_on(self) -> list[tuple[str, str]]:
        """The writer's files; under ``on_hook_failure = "crash-consistent"`` a writer
        that cannot say (its server is down) declares none: its before_freeze fails the
        same way and the policy records it."""
        try:
            return list(self.writer.depends_on())
        except QuiesceError:
            if self.ctx.on_hook_failure == "crash-consistent":
                return []
            raise

    def claims(self, frozen_ns: int | None) -> list[Claim]:
        """The writer's own, if it quiesced (a failure the policy let pass claims none)."""
        return list(self.writer.claims(frozen_ns)) if self.quiesced else []

    def _step(self, kind: str, fn: Any, *args: Any) -> HookResult:
        r = HookResult(name=self.writer.name, kind=kind)
        timer = StepTimer(r)
        try:
            fn(*args)
        except Exception as e:
            r.status = "failed"
            r.error = redact(getattr(e, "message", None) or f"{type(e).__name__}: {e}")
        timer.stop()
        shown = {k: v for k, v in self.writer.info.items() if k not in _LONG_INFO}
        if shown:
            r.output = redact(json.dumps(shown, separators=(", ", ": "), default=str))
        return self.ctx.record(r)

    def before_freeze(self) -> None:
        r = self._step("writer", self.writer.before_freeze)
        if r.ok:
            self.held = self.quiesced = True
        else:
            self.ctx.failed(r, quiescing=True)

    def after_thaw(self, ok: bool) -> None:
        if not self.held:
            return
        self.held = False
        r = self._step("writer-release", self.writer.after_thaw, ok)
        if not r.ok:
            self.ctx.failed(r, quiescing=False)


def writer_password(password_env: str | None, key: str) -> str | None:
    """The value of the variable a writer's ``password_env`` names (read here, passed to
    the client library in memory: never an argv, a file or a hook's environment), and
    remembered as a secret so that no report shows it."""
    if password_env is None:
        return None
    value = os.environ.get(password_env)
    if value is None:
        raise UsageError(
            f"{key}: the environment variable {password_env} is not set",
            "export it for quiesce (systemd: EnvironmentFile= or LoadCredential=)",
        )
    register_secret(value)
    return value


def build_writers(config: JobConfig) -> list[Any]:
    """The job's built-in writers, each from its own config model; a UsageError (nothing
    has run yet) if a writer's ``password_env`` is not set."""
    from quiesce.apps.writers.mysql import MysqlWriter
    from quiesce.apps.writers.postgresql import PostgresWriter
    from quiesce.apps.writers.sqlite import SqliteWriter

    w = config.writers
    out: list[Any] = []
    for i, s in enumerate(w.sqlite):
        out.append(SqliteWriter(_named(s, f"sqlite[{i}]")))
    for i, pg in enumerate(w.postgresql):
        pw = writer_password(pg.password_env, f"writers.postgresql[{i}].password_env")
        out.append(PostgresWriter(_named(pg, f"postgresql[{i}]"), password=pw))
    for i, m in enumerate(w.mysql):
        pw = writer_password(m.password_env, f"writers.mysql[{i}].password_env")
        out.append(MysqlWriter(_named(m, f"mysql[{i}]"), password=pw))
    return out


def hook_files(job: Job) -> dict[str, list[tuple[str, str]]]:
    """The files each hook declares (``depends_on``), by hook name, for the proof that
    they lie on the group."""
    h = job.config.hooks
    out: dict[str, list[tuple[str, str]]] = {}
    named: list[tuple[str, Sequence[CommandHookConfig | SessionHookConfig]]] = [
        ("pre_freeze", h.pre_freeze),
        ("session", h.session),
    ]
    for kind, hooks in named:
        for i, x in enumerate(hooks):
            if x.depends_on:
                out[f"hook {hook_name(x, kind, i)!r}"] = [(p, "depends_on") for p in x.depends_on]
    return out


def _named(config: _C, default: str) -> _C:
    """The config with a name for the report: its own, else its table and index."""
    return config if config.name else config.model_copy(update={"name": default})


def hook_name(h: CommandHookConfig | SessionHookConfig, kind: str, i: int) -> str:
    """The hook's name, else its kind, index and program (the script, for interpreters)."""
    if h.name:
        return h.name
    prog = Path(h.command[0]).name
    if prog.rstrip("0123456789.") in INTERPRETERS and len(h.command) > 1:
        prog = Path(h.command[1]).name
    return f"{kind}[{i}] {prog}"


def build_quiescers(
    job: Job, ctx: HookContext, marks: PhaseMarks | None = None, writers: Sequence[Any] = ()
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
            HookSpec(hook_name(x, "post_thaw", i), list(x.command), x.timeout, dict(x.env))
            for i, x in enumerate(h.post_thaw)
        ]
        out.append(PostThawCommands(ctx, specs))
    if h.pre_freeze:
        specs = [
            HookSpec(hook_name(x, "pre_freeze", i), list(x.command), x.timeout, dict(x.env))
            for i, x in enumerate(h.pre_freeze)
        ]
        out.append(PreFreezeCommands(ctx, specs))
    if job.hook_dir_scripts:
        out.append(HookDirectory(ctx, job.hook_dir_scripts, h.directory_timeout, h.directory_env))
    for i, x in enumerate(h.session):
        name = hook_name(x, "session", i)
        spec = SessionSpec(name, list(x.command), x.ready_timeout, x.done_timeout, dict(x.env))
        out.append(SessionHook(ctx, spec))
    out += [GuardedWriter(ctx, w) for w in writers]
    return marks.wrap(out) if marks is not None and out else out


__all__ = [
    "GuardedWriter",
    "PhaseMarks",
    "build_quiescers",
    "build_writers",
    "hook_files",
    "hook_name",
    "writer_password",
]
