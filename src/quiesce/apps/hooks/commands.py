"""One-shot command hooks: pre-freeze and post-thaw commands, and a hook directory.

Every hook runs without a shell (an argv list), in its own process group, with its own
timeout; on timeout the whole group is killed. Output is captured in memory (bounded),
never written to a file: the volume it would land on may be about to freeze. A hook gets
a clean environment (:meth:`HookContext.env`), and its output is redacted before it is
kept: it goes into reports and into the ``after_run`` hooks' stdin.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from quiesce.apps.hooks.context import HookContext
from quiesce.apps.hooks.results import HookResult, StepTimer
from quiesce.errors import HookFailed
from quiesce.host import proc
from quiesce.host.proc import OUTPUT_LIMIT
from quiesce.util.redact import redact, redact_url

KILL_GRACE = 2.0  # seconds between SIGTERM and SIGKILL of a hook's process group
_SKIPPED_SUFFIXES = (
    *("~", ".disabled", ".dpkg-old", ".dpkg-new", ".dpkg-dist", ".dpkg-tmp"),
    *(".rpmnew", ".rpmsave", ".rpmorig", ".ucf-old", ".ucf-new", ".ucf-dist"),
)


def hook_dir_scripts(directory: Path) -> list[Path]:
    """Executable regular files of a hook directory in name order (like run-parts and
    qemu-guest-agent's fsfreeze-hook.d); hidden files and package-manager leftovers
    are skipped."""
    out = []
    for entry in sorted(directory.iterdir(), key=lambda p: p.name):
        if entry.name.startswith(".") or entry.name.endswith(_SKIPPED_SUFFIXES):
            continue
        if entry.is_file() and os.access(entry, os.X_OK):
            out.append(entry)
    return out


def run_command(
    argv: Sequence[str],
    *,
    name: str,
    kind: str,
    timeout: float,
    env: Mapping[str, str],
    limit: int = OUTPUT_LIMIT,
    stdin: bytes | None = None,
) -> HookResult:
    """Run one hook to completion; never raises for the hook's own failures."""
    result = HookResult(name=name, kind=kind, argv=[redact_url(a) for a in argv])
    timer = StepTimer(result)
    try:
        done = proc.run_bounded(
            argv, timeout=timeout, env=env, merge_stderr=True, limit=limit, grace=KILL_GRACE,
            input=stdin,
        )  # fmt: skip
    except OSError as e:
        result.status, result.error = "error", f"cannot run {argv[0]}: {e.strerror}"
        return timer.stop()
    result.returncode = done.returncode
    result.output = redact(done.stdout.decode(errors="replace"))
    if done.timed_out:
        result.status = "timeout"
        result.error = f"timed out after {timeout:g}s; its process group was killed"
    elif done.returncode != 0:
        result.status = "failed"
        rc = done.returncode
        result.error = f"exit {rc}" if rc > 0 else f"killed by signal {-rc}"
    return timer.stop()


@dataclass
class HookSpec:
    """A one-shot command hook."""

    name: str
    argv: list[str]
    timeout: float | None = None
    env: dict[str, str] = field(default_factory=dict)  # the job's per-hook `env` table


class PreFreezeCommands:
    """``pre-freeze`` commands in order. A failing one stops the rest under ``abort``."""

    def __init__(self, ctx: HookContext, specs: Sequence[HookSpec]) -> None:
        self.ctx, self.specs = ctx, list(specs)

    @property
    def steps(self) -> list[str]:
        """What quiesced, for the consistency reason."""
        return [f"pre-freeze hook {s.name!r}" for s in self.specs]

    def before_freeze(self) -> None:
        for spec in self.specs:
            r = run_command(
                spec.argv, name=spec.name, kind="pre-freeze",
                timeout=self.ctx.budget(spec.timeout), env=self.ctx.env("pre-freeze", spec.env),
            )  # fmt: skip
            self.ctx.record(r)
            if not r.ok:
                self.ctx.failed(r, quiescing=True)

    def after_thaw(self, ok: bool) -> None:
        pass


class PostThawCommands:
    """``post-thaw`` commands. First in the quiescer list, so their ``after_thaw`` runs
    last, on every path out of the window: success, failure, guardian thaw. They quiesce
    nothing (they run after the thaw), so they never make a snapshot application-consistent."""

    quiesces = False

    def __init__(self, ctx: HookContext, specs: Sequence[HookSpec]) -> None:
        self.ctx, self.specs = ctx, list(specs)
        self.done = False

    def before_freeze(self) -> None:
        pass

    def after_thaw(self, ok: bool) -> None:
        if self.done:
            return
        self.done = True
        if not ok:
            self.ctx.status = "failed"
        for spec in self.specs:
            r = run_command(
                spec.argv, name=spec.name, kind="post-thaw",
                timeout=self.ctx.budget(spec.timeout, releasing=True),
                env=self.ctx.env("post-thaw", spec.env),
            )  # fmt: skip
            self.ctx.record(r)
            if not r.ok:
                self.ctx.failed(r, quiescing=False)


class HookDirectory:
    """Every executable in a directory, run as ``SCRIPT freeze`` before the window and
    ``SCRIPT thaw`` after it, in name order (qemu-guest-agent's fsfreeze-hook.d)."""

    def __init__(
        self,
        ctx: HookContext,
        scripts: Sequence[Path],
        timeout: float | None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.ctx, self.scripts, self.timeout = ctx, list(scripts), timeout
        self.env = dict(env or {})  # the job's hooks.directory_env
        self.started: list[Path] = []
        self.done = False

    @property
    def steps(self) -> list[str]:
        """What quiesced (each script's ``freeze`` runs before the window)."""
        return [f"hook-directory script {p.name!r}" for p in self.scripts]

    def _run(self, script: Path, action: str, *, releasing: bool) -> HookResult:
        return self.ctx.record(
            run_command(
                [str(script), action], name=script.name, kind=f"hook-dir:{action}",
                timeout=self.ctx.budget(self.timeout, releasing=releasing),
                env=self.ctx.env("pre-freeze" if action == "freeze" else "post-thaw", self.env),
            )
        )  # fmt: skip

    def before_freeze(self) -> None:
        for script in self.scripts:
            self.started.append(script)
            r = self._run(script, "freeze", releasing=False)
            if not r.ok:
                try:
                    self.ctx.failed(r, quiescing=True)
                except HookFailed:
                    self.after_thaw(False)  # release what the earlier scripts quiesced
                    raise

    def after_thaw(self, ok: bool) -> None:
        if self.done:
            return
        self.done = True
        if not ok:
            self.ctx.status = "failed"
        for script in self.started:
            r = self._run(script, "thaw", releasing=True)
            if not r.ok:
                self.ctx.failed(r, quiescing=False)


__all__ = [
    "KILL_GRACE",
    "HookDirectory",
    "HookSpec",
    "PostThawCommands",
    "PreFreezeCommands",
    "hook_dir_scripts",
    "run_command",
]
