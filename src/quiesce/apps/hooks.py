"""Application hooks around the freeze window: commands, a hook directory, session hooks.

Every hook runs without a shell (an argv list), in its own process group, with its own
timeout; on timeout the whole group is killed. Output is captured in memory (bounded),
never written to a file: the volume it would land on may be about to freeze.

Session hooks hold locks that live only as long as a connection (MySQL's
``FLUSH TABLES WITH READ LOCK``, PostgreSQL's ``pg_backup_start``). Line protocol on
the hook's stdin/stdout::

    quiesce -> hook: freeze      hook -> quiesce: ready   (lock held)
    quiesce -> hook: thaw        hook -> quiesce: done    (lock released)
    EOF on stdin: abort, release the lock and exit.       (also when quiesce dies)

A hook may answer ``error <text>`` instead of ``ready``/``done``. Other stdout lines are
kept as output.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import stat
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from quiesce.errors import ExitCode, QuiesceError
from quiesce.sys import proc
from quiesce.sys.proc import OUTPUT_LIMIT, BoundedOutput, kill_group

KILL_GRACE = 2.0  # seconds between SIGTERM and SIGKILL of a hook's process group
INTERPRETERS = frozenset({"sh", "bash", "dash", "python3", "python", "perl", "ruby", "env"})
_SKIPPED_SUFFIXES = (
    *("~", ".disabled", ".dpkg-old", ".dpkg-new", ".dpkg-dist", ".dpkg-tmp"),
    *(".rpmnew", ".rpmsave", ".rpmorig", ".ucf-old", ".ucf-new", ".ucf-dist"),
)


class HookFailed(QuiesceError):
    """A hook or writer failed or timed out and the policy is ``abort``."""

    exit_code = ExitCode.HOOK
    default_hint = (
        "see the hook's output in the report; to snapshot anyway (only crash-consistent), "
        'set on_hook_failure = "crash-consistent"'
    )


class RunTimeout(QuiesceError):
    """The whole run's time budget (timeouts.run) was used up."""

    exit_code = ExitCode.HOOK
    default_hint = "raise timeouts.run in the job file, or shorten the hooks"


# -- results -----------------------------------------------------------------------------


@dataclass
class HookResult:
    """What one hook (or writer step) did: the report shows one row per result."""

    name: str
    kind: str  # pre-freeze post-thaw hook-dir:freeze hook-dir:thaw session writer:...
    argv: list[str] = field(default_factory=list)
    status: str = "ok"  # ok failed timeout error skipped
    returncode: int | None = None
    start: float = 0.0  # unix time
    end: float = 0.0
    duration_s: float = 0.0
    output: str = ""
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "skipped")

    def describe(self) -> str:
        """One line for messages: `pre-freeze hook 'x' failed: exit 3`."""
        what = self.error or self.status
        return f"{self.kind} {self.name!r}: {what}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Timer:
    def __init__(self, result: HookResult) -> None:
        self.result = result
        self.t0 = time.monotonic()
        result.start = time.time()

    def stop(self) -> HookResult:
        self.result.duration_s = time.monotonic() - self.t0
        self.result.end = self.result.start + self.result.duration_s
        return self.result


# -- safety checks ---------------------------------------------------------------------------


def resolve_executable(argv0: str) -> Path | None:
    """The file that ``argv0`` names (PATH lookup for bare names), or None."""
    if "/" in argv0:
        p = Path(argv0)
        return p if p.exists() else None
    found = shutil.which(argv0)
    return Path(found) if found else None


def permission_problem(path: Path) -> str | None:
    """Why quiesce (running as root) must not trust ``path``, or None if it may.

    Like sudo and cron: the file must be owned by root and writable by nobody else,
    otherwise any user who can write it runs code as root at the next run.
    """
    try:
        st = path.stat()
    except OSError as e:
        return f"cannot stat {path}: {e.strerror}"
    if st.st_uid != 0:
        return f"{path} is owned by uid {st.st_uid}, not root"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        who = "others" if st.st_mode & stat.S_IWOTH else "its group"
        return f"{path} is writable by {who} (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def executable_problem(argv: Sequence[str]) -> str | None:
    """Why ``argv`` cannot be run safely: missing, not executable, or unsafe permissions."""
    if not argv or not argv[0]:
        return "the command is empty"
    exe = resolve_executable(argv[0])
    if exe is None:
        where = "" if "/" in argv[0] else " on PATH"
        return f"{argv[0]} does not exist{where}"
    if not exe.is_file():
        return f"{exe} is not a regular file"
    if not os.access(exe, os.X_OK):
        return f"{exe} is not executable"
    problem = permission_problem(exe)
    if problem:
        return problem
    # ["/bin/sh", "/etc/quiesce/pre.sh"]: the script is the code that runs as root.
    interpreter = (
        exe.name.rstrip("0123456789.") in INTERPRETERS or Path(argv[0]).name in INTERPRETERS
    )
    if interpreter and len(argv) > 1 and argv[1].startswith("/"):
        script = Path(argv[1])
        if script.is_file():
            return permission_problem(script)
    return None


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


# -- one-shot commands ----------------------------------------------------------------------


def _spawn(argv: Sequence[str], env: Mapping[str, str], *, stdin: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        list(argv),
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if stdin == subprocess.DEVNULL else subprocess.PIPE,
        env=dict(env),
        cwd="/",  # never a cwd on a volume that is about to freeze
        start_new_session=True,  # its own process group, killed as one
        close_fds=True,
    )


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
    result = HookResult(name=name, kind=kind, argv=list(argv))
    timer = _Timer(result)
    try:
        done = proc.run_bounded(
            argv, timeout=timeout, env=env, merge_stderr=True, limit=limit, grace=KILL_GRACE,
            input=stdin,
        )  # fmt: skip
    except OSError as e:
        result.status, result.error = "error", f"cannot run {argv[0]}: {e.strerror}"
        return timer.stop()
    result.returncode = done.returncode
    result.output = done.stdout.decode(errors="replace")
    if done.timed_out:
        result.status = "timeout"
        result.error = f"timed out after {timeout:g}s; its process group was killed"
    elif done.returncode != 0:
        result.status = "failed"
        rc = done.returncode
        result.error = f"exit {rc}" if rc > 0 else f"killed by signal {-rc}"
    return timer.stop()


# -- the policy shared by every hook of a run ------------------------------------------------


class Quiescer(Protocol):
    """What snapshots.create drives: ``before_freeze`` in order before the window,
    ``after_thaw`` in reverse order on every path out."""

    def before_freeze(self) -> None: ...

    def after_thaw(self, ok: bool) -> None: ...


@dataclass
class HookContext:
    """State shared by the hooks and writers of one run: policy, budget, results."""

    job: str = "adhoc"
    volumes: Sequence[str] = ()
    on_hook_failure: str = "abort"  # "abort" | "crash-consistent"
    default_timeout: float = 60.0
    deadline: float | None = None  # monotonic: the whole run's budget
    results: list[HookResult] = field(default_factory=list)
    degraded: list[str] = field(default_factory=list)  # why only crash-consistent
    release_failures: list[str] = field(default_factory=list)  # post-thaw steps that failed
    warnings: list[str] = field(default_factory=list)
    status: str = "ok"  # what post-thaw hooks see in QUIESCE_STATUS

    def env(self, phase: str) -> dict[str, str]:
        return os.environ | {
            "QUIESCE_JOB": self.job,
            "QUIESCE_PHASE": phase,
            "QUIESCE_VOLUMES": "\n".join(self.volumes),
            "QUIESCE_STATUS": self.status,
        }

    def budget(self, timeout: float | None, *, releasing: bool = False) -> float:
        """The timeout a step gets: its own, capped by what is left of the run's budget.

        Releasing steps (post-thaw) always get their own timeout: releasing an
        application matters more than the run's budget.
        """
        own = self.default_timeout if timeout is None else timeout
        if releasing or self.deadline is None:
            return own
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise RunTimeout("the run's time budget (timeouts.run) was used up before the freeze")
        return min(own, left)

    def record(self, result: HookResult) -> HookResult:
        self.results.append(result)
        return result

    def failed(self, result: HookResult, *, quiescing: bool) -> None:
        """Apply ``on_hook_failure`` to a failed step.

        Quiescing steps (before the window) raise HookFailed under ``abort``; under
        ``crash-consistent`` they mark the run as only crash-consistent and go on.
        Releasing steps (after the window) never stop the release of the others: they
        are collected in ``release_failures``, and the run reports them as its error.
        """
        if not quiescing:
            self.release_failures.append(result.describe())
            return
        if self.on_hook_failure == "crash-consistent":
            self.degraded.append(result.describe())
            self.warnings.append(
                f"{result.describe()}; continuing: the snapshot is only crash-consistent "
                '(on_hook_failure = "crash-consistent")'
            )
            return
        raise HookFailed(f"{result.describe()}; nothing was snapshotted", result=result)


# -- quiescers built from hooks -----------------------------------------------------------


@dataclass
class HookSpec:
    """A one-shot command hook."""

    name: str
    argv: list[str]
    timeout: float | None = None


class PreFreezeCommands:
    """``pre-freeze`` commands in order. A failing one stops the rest under ``abort``."""

    def __init__(self, ctx: HookContext, specs: Sequence[HookSpec]) -> None:
        self.ctx, self.specs = ctx, list(specs)

    def before_freeze(self) -> None:
        for spec in self.specs:
            r = run_command(
                spec.argv, name=spec.name, kind="pre-freeze",
                timeout=self.ctx.budget(spec.timeout), env=self.ctx.env("pre-freeze"),
            )  # fmt: skip
            self.ctx.record(r)
            if not r.ok:
                self.ctx.failed(r, quiescing=True)

    def after_thaw(self, ok: bool) -> None:
        pass


class PostThawCommands:
    """``post-thaw`` commands. First in the quiescer list, so their ``after_thaw`` runs
    last, on every path out of the window: success, failure, guardian thaw."""

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
                env=self.ctx.env("post-thaw"),
            )  # fmt: skip
            self.ctx.record(r)
            if not r.ok:
                self.ctx.failed(r, quiescing=False)


class HookDirectory:
    """Every executable in a directory, run as ``SCRIPT freeze`` before the window and
    ``SCRIPT thaw`` after it, in name order (qemu-guest-agent's fsfreeze-hook.d)."""

    def __init__(self, ctx: HookContext, scripts: Sequence[Path], timeout: float | None) -> None:
        self.ctx, self.scripts, self.timeout = ctx, list(scripts), timeout
        self.started: list[Path] = []
        self.done = False

    def _run(self, script: Path, action: str, *, releasing: bool) -> HookResult:
        return self.ctx.record(
            run_command(
                [str(script), action], name=script.name, kind=f"hook-dir:{action}",
                timeout=self.ctx.budget(self.timeout, releasing=releasing),
                env=self.ctx.env("pre-freeze" if action == "freeze" else "post-thaw"),
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


# -- session hooks ------------------------------------------------------------------------


@dataclass
class SessionSpec:
    """A long-running hook that speaks the freeze/ready/thaw/done protocol."""

    name: str
    argv: list[str]
    ready_timeout: float | None = None
    done_timeout: float | None = None


class _LineReader:
    """Reads the hook's stdout lines into a queue (None at EOF) on a daemon thread."""

    def __init__(self, stream: Any, output: BoundedOutput) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.output = output
        self.thread = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self.thread.start()

    def _run(self, stream: Any) -> None:
        with contextlib.suppress(OSError, ValueError):
            for raw in iter(stream.readline, b""):
                line = raw.decode(errors="replace").rstrip("\r\n")
                self.lines.put(line)
        self.lines.put(None)

    def expect(self, word: str, timeout: float) -> tuple[str, str]:
        """Wait for ``word``. Returns (status, detail): ok, eof, error or timeout."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return "timeout", f"no {word!r} within {timeout:g}s"
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                return "eof", f"exited before answering {word!r}"
            stripped = line.strip()
            if stripped == word:
                return "ok", ""
            if stripped == "error" or stripped.startswith(("error ", "error:")):
                return "error", stripped[5:].strip(" :") or "the hook reported an error"
            self.output.add((line + "\n").encode())


def _drain(stream: Any, output: BoundedOutput) -> threading.Thread:
    def run() -> None:
        with contextlib.suppress(OSError, ValueError):
            for chunk in iter(lambda: stream.read1(65536), b""):
                output.add(chunk)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


class SessionHook:
    """One session hook: started before the window, holds its lock across it.

    The hook is started in a new session, so it outlives a killed quiesce; the only
    copy of its stdin's write end is in this process, so when quiesce dies the hook sees
    EOF and must release its lock.
    """

    def __init__(self, ctx: HookContext, spec: SessionSpec) -> None:
        self.ctx, self.spec = ctx, spec
        self.proc: subprocess.Popen[bytes] | None = None
        self.output = BoundedOutput()
        self.reader: _LineReader | None = None
        self.stderr_thread: threading.Thread | None = None
        self.result = HookResult(name=spec.name, kind="session", argv=list(spec.argv))
        self.timer: _Timer | None = None
        self.ready = False

    def before_freeze(self) -> None:
        timeout = self.ctx.budget(self.spec.ready_timeout)
        self.timer = _Timer(self.result)
        self.ctx.record(self.result)
        try:
            self.proc = _spawn(self.spec.argv, self.ctx.env("pre-freeze"), stdin=subprocess.PIPE)
        except OSError as e:
            self._fail("error", f"cannot run {self.spec.argv[0]}: {e.strerror}")
            return
        self.reader = _LineReader(self.proc.stdout, self.output)
        self.stderr_thread = _drain(self.proc.stderr, self.output)
        if not self._send("freeze"):
            self._fail("failed", "it closed its stdin before 'freeze'")
            return
        status, detail = self.reader.expect("ready", timeout)
        if status == "ok":
            self.ready = True
            self.result.output = self.output.text()
            return
        self._fail("timeout" if status == "timeout" else "failed", detail)

    def _send(self, word: str) -> bool:
        assert self.proc is not None and self.proc.stdin is not None
        try:
            self.proc.stdin.write(f"{word}\n".encode())
            self.proc.stdin.flush()
            return True
        except (BrokenPipeError, OSError, ValueError):
            return False

    def _fail(self, status: str, detail: str) -> None:
        """Not ready: abort it (EOF, then kill), then apply the policy."""
        self._close(self.spec.done_timeout)
        rc = self.proc.returncode if self.proc is not None else None
        if rc not in (0, None) and status != "timeout":
            detail += f" (exit {rc})" if rc > 0 else f" (killed by signal {-rc})"
        self.result.status, self.result.error = status, detail
        self._finish()
        self.ctx.failed(self.result, quiescing=True)

    def _close(self, timeout: float | None) -> None:
        """EOF on stdin (abort / goodbye), wait for the exit, else kill its group."""
        if self.proc is None:
            return
        with contextlib.suppress(OSError, ValueError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=self.ctx.budget(timeout, releasing=True))
        except subprocess.TimeoutExpired:
            kill_group(self.proc, KILL_GRACE)
            self.ctx.warnings.append(
                f"session hook {self.spec.name!r} did not exit after EOF: its process group "
                "was killed"
            )
        self.result.returncode = self.proc.returncode

    def _finish(self) -> None:
        if self.reader is not None:
            self.reader.thread.join(timeout=1.0)
        if self.stderr_thread is not None:
            self.stderr_thread.join(timeout=1.0)
        self.result.output = self.output.text()
        if self.timer is not None:
            self.timer.stop()
            self.timer = None

    def after_thaw(self, ok: bool) -> None:
        if self.proc is None or not self.ready:
            return  # never started, or already aborted by before_freeze
        self.ready = False
        if not ok:
            self.ctx.status = "failed"
        if ok:
            sent = self._send("thaw")
            assert self.reader is not None
            status, detail = (
                self.reader.expect("done", self.ctx.budget(self.spec.done_timeout, releasing=True))
                if sent
                else ("failed", "its stdin was closed before 'thaw'")
            )
        else:
            status, detail = "ok", ""  # abort: EOF tells it to release
        self._close(self.spec.done_timeout)
        if status != "ok":
            self.result.status = "timeout" if status == "timeout" else "failed"
            self.result.error = f"{detail} after 'thaw'"
        self._finish()
        if status != "ok":
            self.ctx.failed(self.result, quiescing=False)


@contextlib.contextmanager
def held(quiescers: Sequence[Quiescer]) -> Iterator[None]:
    """Run ``before_freeze`` in order and ``after_thaw`` in reverse on every way out.

    What snapshots.create does around its window; handy for library users who take the
    snapshot themselves.
    """
    entered: list[Quiescer] = []
    ok = False
    try:
        for q in quiescers:
            entered.append(q)
            q.before_freeze()
        yield
        ok = True
    finally:
        errors: list[BaseException] = []
        for q in reversed(entered):
            try:
                q.after_thaw(ok)
            except Exception as e:  # every quiescer gets released, whatever the others do
                errors.append(e)
        if errors and ok:
            raise errors[0]
