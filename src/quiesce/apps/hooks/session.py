"""Session hooks: long-running hooks that hold a lock only as long as a connection lives
(MySQL's ``FLUSH TABLES WITH READ LOCK``, PostgreSQL's ``pg_backup_start``).

Line protocol on the hook's stdin/stdout::

    quiesce -> hook: freeze      hook -> quiesce: ready   (lock held)
    quiesce -> hook: thaw        hook -> quiesce: done    (lock released)
    EOF on stdin: abort, release the lock and exit.       (also when quiesce dies)

A hook may answer ``error <text>`` instead of ``ready``/``done``. Other stdout lines are
kept as output.
"""

from __future__ import annotations

import contextlib
import queue
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from quiesce.apps.hooks.commands import KILL_GRACE
from quiesce.apps.hooks.context import HookContext
from quiesce.apps.hooks.results import HookResult, StepTimer
from quiesce.host import proc
from quiesce.host.proc import BoundedOutput, kill_group
from quiesce.util.redact import redact, redact_url


@dataclass
class SessionSpec:
    """A long-running hook that speaks the freeze/ready/thaw/done protocol."""

    name: str
    argv: list[str]
    ready_timeout: float | None = None
    done_timeout: float | None = None
    env: dict[str, str] = field(default_factory=dict)  # the job's per-hook `env` table


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
        argv = [redact_url(a) for a in spec.argv]
        self.result = HookResult(name=spec.name, kind="session", argv=argv)
        self.timer: StepTimer | None = None
        self.ready = False

    @property
    def steps(self) -> list[str]:
        """What quiesced, for the consistency reason."""
        return [f"session hook {self.spec.name!r}"]

    def before_freeze(self) -> None:
        timeout = self.ctx.budget(self.spec.ready_timeout)
        self.timer = StepTimer(self.result)
        self.ctx.record(self.result)
        try:
            env = self.ctx.env("pre-freeze", self.spec.env)
            self.proc = proc.spawn(
                self.spec.argv, env=env, stdin=subprocess.PIPE, pdeathsig=None
            )  # outlives a killed quiesce on purpose: EOF on stdin tells it to release
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
            self.result.output = redact(self.output.text())
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
        self.result.output = redact(self.output.text())
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


__all__ = ["SessionHook", "SessionSpec"]
