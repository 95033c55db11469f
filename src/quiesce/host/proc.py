"""The one way quiesce runs a child process.

Every child started here gets the same rules, because each one was learnt the hard way:

- no shell, ever; argv is a list;
- cwd ``/`` unless the caller says otherwise: never a directory on a volume about to freeze;
- its own session and process group (``setsid``): a timeout or Ctrl-C kills it and all it
  started, as one; and it has no controlling terminal, so a tool that would prompt on
  ``/dev/tty`` (ssh under restic's sftp) fails instead of hanging stopped;
- the signal ``pdeathsig`` when quiesce dies, even by SIGKILL (``PR_SET_PDEATHSIG``): a
  restic left running keeps its repository locked. Session hooks opt out (``None``): they
  must outlive quiesce to see EOF on their stdin;
- a minimal environment (:func:`child_env`) unless the caller builds one: PATH, HOME,
  locale, TMPDIR and nothing else, so a writer's password variable (or any secret quiesce
  was given) never reaches mount, blkid or restic; a caller adds what its child needs
  (``RESTIC_PASSWORD_FILE``) and may inherit the variables of a few named prefixes (a
  backup tool's cloud credentials), never one that holds a secret quiesce read.

PDEATHSIG is sent when the *thread* that forked the child exits, not the process. The
shapes below that wait for their child (:func:`run_bounded`, :func:`run_tool`,
:func:`run_streaming`, :func:`run_pipeline`) hold the forking thread until the child is
gone, so that is harmless for them. For :func:`spawn` (a child the caller drives) a
child asked for from any thread but the main one is forked by one long-lived daemon
thread instead, which lives as long as the process: ending a short-lived worker thread
never kills a child it started. Only the direct child gets the signal; what *it* started
goes with it only if it takes them down (restic and borg do, on SIGTERM).

Shapes: :func:`run_bounded` (to completion or timeout, output bounded in memory),
:func:`run_tool`/:func:`check_tool`/:func:`try_tool` (admin tools: mount, losetup, zfs,
lvs),
:func:`run_streaming` (lines to callbacks as they come: restic's and borg's progress),
:func:`run_pipeline` (``tar | zstd | sink`` with Python taps that count and hash between
stages) and :func:`spawn` (a long-lived child: a session hook, the demo's writer).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import queue
import selectors
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal, Protocol

from quiesce.errors import QuiesceError, ToolTimedOut, UsageError
from quiesce.host.signals import signals_deferred
from quiesce.util.redact import is_secret_name, known_secrets

OUTPUT_LIMIT = 8192  # bytes kept per stream by default (head and tail)
TOOL_OUTPUT_LIMIT = 64 << 20  # an admin tool's listing (zfs list, lvs) is parsed: keep it all
KEPT_LINES = 500  # lines kept of a stream that a callback consumes (for error messages)
CHUNK = 1 << 20  # bytes per read between the stages of a pipeline

Cwd = str | Path | None  # None: this process's cwd
Stdio = int | IO[Any] | None

# Resolved at import (before any window): the preexec below must not load anything.
_PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_prctl.restype = ctypes.c_int


# What every child may inherit from quiesce's environment: nothing that steers or feeds
# a tool beyond where it finds programs, its home, locale and temporary files.
CHILD_ENV_NAMES = frozenset({"PATH", "HOME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "NO_COLOR"})
_CHILD_ENV_PREFIXES = ("LC_",)
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def child_env(
    extra: Mapping[str, str] | None = None,
    *,
    inherit: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """A child's whole environment: the names of :data:`CHILD_ENV_NAMES` (and ``LC_*``)
    from ``environ`` (default: ours), those starting with one of ``inherit`` (a backup
    tool's own settings and cloud credentials: ``RESTIC_``, ``AWS_``), then ``extra``
    (what this call needs). An inherited variable holding a secret quiesce read
    (a writer's or another tool's password: :func:`~quiesce.util.redact.register_secret`)
    is left out whatever its name; only ``extra`` may pass a secret, on purpose."""
    env = os.environ if environ is None else environ
    secrets = set(known_secrets({}))
    out: dict[str, str] = {}
    for k, v in env.items():
        base = k in CHILD_ENV_NAMES or (k.startswith(_CHILD_ENV_PREFIXES) and not is_secret_name(k))
        if (base or k.startswith(tuple(inherit))) and v not in secrets:
            out[k] = v
    out.setdefault("PATH", DEFAULT_PATH)
    return out | dict(extra or {})


# -- starting a child ----------------------------------------------------------------------


def _die_with(parent: int, sig: int) -> Callable[[], None]:
    """The child's preexec: ask for ``sig`` when its parent dies; if it already has (between
    fork and prctl), nobody will send it: leave at once."""

    def preexec() -> None:
        _prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return preexec


_Job = tuple[Callable[[], Any], list[Any], threading.Event]


class _Forker:
    """One daemon thread that forks for other threads, so that PDEATHSIG means "quiesce
    died", not "the worker thread that asked for the child returned"."""

    def __init__(self) -> None:
        self.forget()

    def forget(self) -> None:
        """(Also in a forked child, the guardian, where the thread did not come along.)"""
        self.lock = threading.Lock()
        self.jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self.thread: threading.Thread | None = None

    def call(self, fn: Callable[[], Any]) -> Any:
        with self.lock:
            if self.thread is None:
                self.thread = threading.Thread(target=self._loop, name="quiesce-fork", daemon=True)
                self.thread.start()
        box: list[Any] = []
        done = threading.Event()
        self.jobs.put((fn, box, done))
        done.wait()
        ok, value = box
        if not ok:
            raise value
        return value

    def _loop(self) -> None:
        while True:
            fn, box, done = self.jobs.get()
            try:
                box[:] = [True, fn()]
            except BaseException as e:
                box[:] = [False, e]
            done.set()


_forker = _Forker()
os.register_at_fork(after_in_child=_forker.forget)


def _popen(
    argv: Sequence[str],
    *,
    stdin: Stdio,
    stdout: Stdio,
    stderr: Stdio,
    env: Mapping[str, str] | None,
    cwd: Cwd,
    pdeathsig: int | None,
    pass_fds: Sequence[int] = (),
    text: bool = False,
) -> subprocess.Popen[Any]:
    """The only ``Popen`` in quiesce (but for the guardian's own fork). ``env`` None: the
    minimal :func:`child_env`, never our whole environment."""
    whole = dict(env) if env is not None else child_env()

    def start() -> subprocess.Popen[Any]:
        return subprocess.Popen(
            list(argv), stdin=stdin, stdout=stdout, stderr=stderr,
            env=whole, cwd=cwd,
            start_new_session=True, close_fds=True, pass_fds=pass_fds, text=text,
            preexec_fn=_die_with(os.getpid(), pdeathsig) if pdeathsig is not None else None,
        )  # fmt: skip

    if pdeathsig is None or threading.current_thread() is threading.main_thread():
        return start()
    return _forker.call(start)


def spawn(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Cwd = "/",
    stdin: Stdio = subprocess.DEVNULL,
    stdout: Stdio = subprocess.PIPE,
    stderr: Stdio = subprocess.PIPE,
    pdeathsig: int | None = signal.SIGKILL,
    pass_fds: Sequence[int] = (),
    text: bool = False,
) -> subprocess.Popen[Any]:
    """A child that the caller drives itself (a session hook, a background writer) and must
    :func:`kill_group` on every path. ``pdeathsig=None``: it may outlive quiesce.
    ``pass_fds``: fds it inherits (a namespace fd for nsenter); ``text``: str pipes.
    Raises OSError if it cannot start."""
    return _popen(
        argv, stdin=stdin, stdout=stdout, stderr=stderr, env=env, cwd=cwd,
        pdeathsig=pdeathsig, pass_fds=pass_fds, text=text,
    )  # fmt: skip


def kill_group(
    proc: subprocess.Popen[Any], grace: float = 0.0, stop_signal: int = signal.SIGTERM
) -> None:
    """``stop_signal`` to the child's whole process group, SIGKILL after ``grace`` (0: at
    once)."""
    steps = ((stop_signal, grace), (signal.SIGKILL, 5.0)) if grace > 0 else ()
    for sig, wait in (*steps, (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    # Stragglers that left the group keep nothing of ours but maybe the pipes.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


# -- where a child's output goes -----------------------------------------------------------


class _Sink(Protocol):
    def add(self, data: bytes) -> None: ...
    def bytes(self) -> bytes: ...


class BoundedOutput:
    """Keeps the first and last ``limit/2`` bytes of a stream and counts the rest."""

    def __init__(self, limit: int = OUTPUT_LIMIT) -> None:
        self.half = limit // 2
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0
        self.lock = threading.Lock()

    def add(self, data: bytes) -> None:
        with self.lock:
            self.total += len(data)
            room = self.half - len(self.head)
            if room > 0:
                self.head += data[:room]
                data = data[room:]
            if data:
                self.tail += data
                if len(self.tail) > self.half:
                    del self.tail[: len(self.tail) - self.half]

    def bytes(self) -> bytes:
        with self.lock:
            dropped = self.total - len(self.head) - len(self.tail)
            middle = f"\n[... {dropped} bytes dropped ...]\n".encode() if dropped > 0 else b""
            return bytes(self.head + middle + self.tail)

    def text(self) -> str:
        return self.bytes().decode(errors="replace")


class LineOutput:
    """Hands each line to ``on_line`` as it comes (without its newline; a failing callback
    is ignored: a display bug must not stop a backup) and keeps the last ``keep`` lines,
    or every line when there is no callback (the output is then the result: JSON)."""

    def __init__(self, on_line: Callable[[str], None] | None, keep: int = KEPT_LINES) -> None:
        self.on_line = on_line
        self.lines: deque[bytes] = deque(maxlen=keep if on_line is not None else None)
        self.partial = bytearray()

    def add(self, data: bytes) -> None:
        self.partial += data
        if b"\n" not in data:
            return
        *complete, rest = self.partial.split(b"\n")
        self.partial = rest
        for line in complete:
            self._line(bytes(line) + b"\n")

    def _line(self, raw: bytes) -> None:
        self.lines.append(raw)
        if self.on_line is not None:
            with contextlib.suppress(Exception):
                self.on_line(raw.decode(errors="replace").rstrip("\n"))

    def bytes(self) -> bytes:
        if self.partial:  # the last line had no newline
            self._line(bytes(self.partial))
            self.partial = bytearray()
        return b"".join(self.lines)


# -- to completion: bounded, streaming, admin tools ----------------------------------------


@dataclass
class Completed:
    returncode: int
    stdout: bytes  # b"" when not captured
    stderr: bytes  # b"" when not captured or merged into stdout
    timed_out: bool
    duration_s: float


def _run(
    argv: Sequence[str],
    *,
    out: _Sink | None,
    err: _Sink | Literal["merge"] | None,
    input: bytes | None,
    timeout: float | None,
    env: Mapping[str, str] | None,
    cwd: Cwd,
    grace: float,
    interrupt_grace: float,
    stop_signal: int = signal.SIGTERM,
    pdeathsig: int | None,
    pass_fds: Sequence[int] = (),
) -> Completed:
    """The core of the shapes that wait: start, read what is captured into its sink until
    the child exits or the deadline passes, kill the group then (and on any exception).

    A child told of quiesce's death by a signal it handles (restic's SIGINT) cleans up
    (removes its repository lock) and says so on stderr, whose reader is gone by then: a
    write to a broken pipe would kill it first (Go, on fd 1 and 2). So such a child keeps
    a read end of its own output pipes (never read: it only keeps the pipe whole), made
    large (1 MiB) so that its last words fit."""
    t0 = time.monotonic()
    deadline = None if timeout is None else t0 + max(timeout, 0.0)
    last_words = pdeathsig not in (None, signal.SIGKILL)
    sinks: dict[int, _Sink] = {}
    ends: dict[str, int] = {}  # this process's write ends, until the child has them
    p: subprocess.Popen[bytes] | None = None
    try:
        for name, sink in (("out", out), ("err", err)):
            if sink is not None and sink != "merge":
                r, ends[name] = os.pipe()
                sinks[r] = sink
                if last_words:
                    with contextlib.suppress(OSError):
                        fcntl.fcntl(ends[name], fcntl.F_SETPIPE_SZ, 1 << 20)
        # A SIGTERM (systemd stop) inside Popen would orphan the child: it is held until
        # ``p`` is set, and delivered inside this try, which kills the child's group.
        with signals_deferred():
            p = _popen(
                argv,
                stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                stdout=ends.get("out"),
                stderr=subprocess.STDOUT if err == "merge" else ends.get("err"),
                env=env,
                cwd=cwd,
                pdeathsig=pdeathsig,
                pass_fds=[*pass_fds, *(sinks if last_words else ())],
            )
        while ends:  # popped first: a signal between the two never closes an fd twice
            os.close(ends.popitem()[1])
        if input is not None:
            threading.Thread(target=_feed, args=(p, input), daemon=True).start()
        timed_out = _read_until_exit(p, sinks, deadline)
        if timed_out:
            kill_group(p, grace, stop_signal)
    except BaseException:  # Ctrl-C while it runs: it must not outlive us
        if p is not None:
            kill_group(p, interrupt_grace, stop_signal)
        raise
    finally:
        for fd in [*ends.values(), *sinks]:
            os.close(fd)
    return Completed(
        returncode=p.returncode,
        stdout=out.bytes() if out is not None else b"",
        stderr=err.bytes() if err is not None and err != "merge" else b"",
        timed_out=timed_out,
        duration_s=time.monotonic() - t0,
    )


def _read_until_exit(
    p: subprocess.Popen[bytes], sinks: Mapping[int, _Sink], deadline: float | None
) -> bool:
    """Pump the captured streams into their sinks until the child has exited; True if the
    deadline passed first."""
    with selectors.DefaultSelector() as sel:
        for stream, sink in sinks.items():
            sel.register(stream, selectors.EVENT_READ, sink)
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return True
            if not sel.get_map():  # nothing captured, or every pipe closed: just wait
                try:
                    p.wait(timeout=left)
                    return False
                except subprocess.TimeoutExpired:
                    return True
            events = sel.select(timeout=0.5 if left is None else min(left, 0.5))
            for key, _ in events:
                data = os.read(key.fd, 65536)
                if data:
                    key.data.add(data)
                else:
                    sel.unregister(key.fileobj)
            if not events and p.poll() is not None and not sel.select(timeout=0.2):
                return False  # exited; a background child still holds a pipe: stop reading


def _feed(p: subprocess.Popen[bytes], data: bytes) -> None:
    assert p.stdin is not None
    with contextlib.suppress(OSError):
        p.stdin.write(data)
    with contextlib.suppress(OSError):
        p.stdin.close()


def run_bounded(
    argv: Sequence[str],
    *,
    timeout: float | None,
    env: Mapping[str, str] | None = None,
    input: bytes | None = None,
    capture_stdout: bool = True,
    capture_stderr: bool = True,
    merge_stderr: bool = False,
    limit: int = OUTPUT_LIMIT,
    grace: float = 0.0,
    cwd: Cwd = "/",
    pdeathsig: int | None = signal.SIGKILL,
    pass_fds: Sequence[int] = (),
) -> Completed:
    """Run ``argv`` to completion or ``timeout`` (None: no limit), keeping at most ``limit``
    bytes of each captured stream; an uncaptured one is inherited from this process.
    ``pass_fds``: fds it inherits. Raises OSError if it cannot start."""
    err: _Sink | Literal["merge"] | None = "merge" if merge_stderr else None
    if not merge_stderr and capture_stderr:
        err = BoundedOutput(limit)
    return _run(
        argv, out=BoundedOutput(limit) if capture_stdout else None, err=err, input=input,
        timeout=timeout, env=env, cwd=cwd, grace=grace, interrupt_grace=0.0,
        pdeathsig=pdeathsig, pass_fds=pass_fds,
    )  # fmt: skip


GATE_SHELL = "/bin/sh"
# A fixed script, not user text: the command is "$@", never parsed by the shell. It waits
# for one line on stdin (the gate), then becomes the command, which reads the rest of it.
GATE_SCRIPT = 'IFS= read -r _ || exit 125; exec "$@"'
GATE_CLOSED = 125  # the gate closed unopened: the command never ran


class Gated:
    """A child started now (outside a freeze window) that waits, before it even execs the
    command, until :meth:`release` (inside the window): the window then holds the
    command's own run time, not a fork and an exec from a large Python process.

    The child is a tiny ``/bin/sh`` blocked reading its stdin; :meth:`release` writes one
    newline (then ``input``, if any) and it execs ``argv``. :meth:`wait` reads its
    output into memory until it exits or ``timeout`` passes (its group is then killed).
    :meth:`cancel` (every path that does not release) closes the gate: the child exits
    with :data:`GATE_CLOSED` without running the command. If quiesce dies first, the
    child gets SIGKILL (``PR_SET_PDEATHSIG``) or EOF on the gate. Raises OSError if the
    child cannot start."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Cwd = "/",
        input: bytes | None = None,
        capture_stdout: bool = True,
        capture_stderr: bool = True,
        limit: int = OUTPUT_LIMIT,
    ) -> None:
        self.out = BoundedOutput(limit) if capture_stdout else None
        self.err = BoundedOutput(limit) if capture_stderr else None
        self.input = input or b""
        self.sinks: dict[int, _Sink] = {}
        ends: list[int] = []
        gate_r, self._gate = os.pipe()
        try:
            for sink in (self.out, self.err):
                if sink is not None:
                    r, w = os.pipe()
                    self.sinks[r] = sink
                    ends.append(w)
            out_end = ends[0] if self.out is not None else None
            err_end = ends[-1] if self.err is not None else None
            with signals_deferred():
                self.p: subprocess.Popen[bytes] = _popen(
                    [GATE_SHELL, "-c", GATE_SCRIPT, "quiesce-gate", *argv],
                    stdin=gate_r, stdout=out_end, stderr=err_end, env=env, cwd=cwd,
                    pdeathsig=signal.SIGKILL,
                )  # fmt: skip
        except BaseException:
            for fd in (self._gate, *self.sinks):
                os.close(fd)
            raise
        finally:
            for fd in (gate_r, *ends):
                os.close(fd)
        self.released_at = 0.0
        self._pidfd = os.pidfd_open(self.p.pid)

    def release(self) -> None:
        """Let the command run (one write; a pipe's worth of input goes in the same write,
        more is fed by a thread)."""
        self.released_at = time.monotonic()
        data = b"\n" + self.input
        head, rest = data[:PIPE_ATOMIC], data[PIPE_ATOMIC:]
        try:
            os.write(self._gate, head)
        except OSError:
            rest = b""  # it is gone already: wait() tells how
        if rest:
            gate, self._gate = self._gate, -1
            threading.Thread(target=_feed_fd, args=(gate, rest), daemon=True).start()
        else:
            self._close_gate()

    @property
    def gate(self) -> int | None:
        """The gate's write end, for another releaser (the guardian writes the one byte
        the moment every FIFREEZE returned; then call :meth:`released_by`); None
        when there is ``input`` to feed (only :meth:`release` does that)."""
        return None if self.input or self._gate < 0 else self._gate

    @property
    def pidfd(self) -> int | None:
        """Its pidfd (readable once it exited), until :meth:`wait` returns."""
        return self._pidfd if self._pidfd >= 0 else None

    def released_by(self, released_ns: int | None) -> None:
        """After the freeze: the byte was written through :attr:`gate` at ``released_ns``
        (``time.monotonic_ns()``'s clock: the command runs; our end of the gate closes, its
        stdin sees EOF once the other end is closed too), or, None, nobody released it:
        :meth:`release` now."""
        if released_ns is None:
            self.release()
            return
        self.released_at = released_ns / 1e9
        self._close_gate()

    def _close_gate(self) -> None:
        if self._gate >= 0:
            os.close(self._gate)
            self._gate = -1

    def wait(self, timeout: float | None) -> Completed:
        """Its output until it exits, or ``timeout`` (then its group is killed). Its exit
        wakes this at once (a pidfd in the same poll as its pipes; ``Popen.wait`` with a
        timeout polls with growing sleeps, which alone added milliseconds to a window)."""
        deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
        try:
            timed_out = self._pump(deadline)
            if timed_out:
                kill_group(self.p)
        except BaseException:
            kill_group(self.p)
            raise
        finally:
            self._close_sinks()
        return Completed(
            returncode=self.p.returncode,
            stdout=self.out.bytes() if self.out is not None else b"",
            stderr=self.err.bytes() if self.err is not None else b"",
            timed_out=timed_out,
            duration_s=time.monotonic() - (self.released_at or time.monotonic()),
        )

    def _pump(self, deadline: float | None) -> bool:
        """Read its pipes until it has exited (True: the deadline passed first)."""
        with selectors.DefaultSelector() as sel:
            sel.register(self._pidfd, selectors.EVENT_READ, None)
            for stream, sink in self.sinks.items():
                sel.register(stream, selectors.EVENT_READ, sink)
            exited = False
            while True:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0 and not exited:
                    return True
                ready = sel.select(timeout=0 if exited else left)
                if exited and not ready:
                    break  # exited and nothing left to read now (a grandchild's pipe)
                for key, _ in ready:
                    if key.data is None:
                        exited = True
                        sel.unregister(key.fileobj)
                        continue
                    data = os.read(key.fd, 65536)
                    if data:
                        key.data.add(data)
                    else:
                        sel.unregister(key.fileobj)
                if exited and len(sel.get_map()) == 0:
                    break
        self.p.wait()
        return False

    def cancel(self) -> None:
        """Never release it: the command does not run. Never raises."""
        self._close_gate()
        with contextlib.suppress(Exception):
            kill_group(self.p)
        self._close_sinks()

    def _close_sinks(self) -> None:
        if self._pidfd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._pidfd)
            self._pidfd = -1
        while self.sinks:
            fd, _ = self.sinks.popitem()
            with contextlib.suppress(OSError):
                os.close(fd)


PIPE_ATOMIC = 4096  # PIPE_BUF: written at once into an empty pipe


def _feed_fd(fd: int, data: bytes) -> None:
    try:
        with contextlib.suppress(OSError):
            os.write(fd, data)  # blocks until the command has read it all
    finally:
        os.close(fd)


def run_streaming(
    argv: Sequence[str],
    *,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Cwd = "/",
    on_stdout_line: Callable[[str], None] | None = None,
    on_stderr_line: Callable[[str], None] | None = None,
    keep_lines: int = KEPT_LINES,
    grace: float = 0.0,
    stop_signal: int = signal.SIGTERM,
    pdeathsig: int | None = signal.SIGKILL,
) -> Completed:
    """Run ``argv`` to completion or ``timeout``, handing each line of its output to the
    callbacks as it comes (live progress); a stream without a callback is kept whole,
    one with a callback only its last ``keep_lines`` lines. On a timeout or an interrupt
    the group gets ``stop_signal``, then SIGKILL after ``grace`` (a backup tool cleans
    up: its lock, its cache). Raises OSError."""
    return _run(
        argv, out=LineOutput(on_stdout_line, keep_lines),
        err=LineOutput(on_stderr_line, keep_lines), input=None, timeout=timeout, env=env,
        cwd=cwd, grace=grace, interrupt_grace=grace, stop_signal=stop_signal,
        pdeathsig=pdeathsig,
    )  # fmt: skip


def run_tool(
    *cmd: str,
    timeout: float = 120,
    pdeathsig: int | None = signal.SIGKILL,
    pass_fds: Sequence[int] = (),
) -> subprocess.CompletedProcess[str]:
    """An admin tool outside the window (mount, losetup, lvs, zfs): text output captured,
    stdin closed; the caller judges the exit status. ToolTimedOut after ``timeout``.
    ``pass_fds``: fds it inherits (a checked mount point as ``/proc/self/fd/N``)."""
    done = run_bounded(
        cmd, timeout=timeout, limit=TOOL_OUTPUT_LIMIT, pdeathsig=pdeathsig, pass_fds=pass_fds
    )
    if done.timed_out:
        raise ToolTimedOut(f"{' '.join(cmd)} did not finish in {timeout:g} s and was killed")
    return subprocess.CompletedProcess(
        list(cmd), done.returncode, _text(done.stdout), _text(done.stderr)
    )


def _text(data: bytes) -> str:
    """As ``subprocess.run(text=True)`` decodes: universal newlines."""
    return data.decode(errors="replace").replace("\r\n", "\n").replace("\r", "\n")


def check_tool(
    *cmd: str, timeout: float = 120, hint: str | None = None, package: str | None = None
) -> str:
    """:func:`run_tool` that must succeed: its stdout, else a QuiesceError with stderr."""
    try:
        p = run_tool(*cmd, timeout=timeout)
    except FileNotFoundError:
        how = f"apt-get install {package}" if package else "run scripts/install.sh"
        raise UsageError(f"{cmd[0]} is not installed", how) from None
    if p.returncode != 0:
        raise QuiesceError(
            f"{' '.join(cmd)} failed: {p.stderr.strip() or f'exit {p.returncode}'}", hint
        )
    return p.stdout


def try_tool(*cmd: str, timeout: float = 60) -> bool:
    """A best-effort tool on a cleanup path (umount, losetup -d): True if it succeeded;
    never raises, so the rest of the cleanup still runs."""
    try:
        return run_tool(*cmd, timeout=timeout).returncode == 0
    except (ToolTimedOut, OSError):
        return False


# -- a pipeline: producer | ... | consumer ------------------------------------------------


@dataclass
class Stage:
    """One process of a pipeline. ``tap`` sees every chunk of its output on the way to the
    next stage (to count it, to hash it): the chunks then pass through Python; without a
    tap the two stages share a plain pipe. ``ok``: the exit codes that are success."""

    argv: Sequence[str]
    ok: Collection[int] = (0,)
    tap: Callable[[bytes], None] | None = None

    @property
    def name(self) -> str:
        return self.argv[0]


@dataclass
class StageResult:
    name: str
    returncode: int
    stderr: bytes  # bounded
    ok: bool


@dataclass
class PipelineResult:
    stages: list[StageResult]
    errors: list[str] = field(default_factory=list)  # a broken link: "feeding zstd: ..."
    timed_out: bool = False
    duration_s: float = 0.0

    @property
    def failures(self) -> list[str]:
        """Each stage that failed with the tail of its stderr, then each broken link."""
        bad = [s for s in self.stages if not s.ok]
        return [
            f"{s.name} exit {s.returncode}: {s.stderr.decode(errors='replace').strip()[-300:]}"
            for s in bad
        ] + self.errors


def run_pipeline(
    stages: Sequence[Stage],
    *,
    source: IO[bytes] | None = None,
    sink: IO[bytes] | None = None,
    timeout: float | None = None,
    on_tick: Callable[[], None] | None = None,
    tick: float = 0.5,
    env: Mapping[str, str] | None = None,
    cwd: Cwd = "/",
    grace: float = 0.0,
    pdeathsig: int | None = signal.SIGKILL,
    limit: int = OUTPUT_LIMIT,
) -> PipelineResult:
    """``source | stage 1 | ... | stage n > sink`` (no source: /dev/null; no sink: the last
    stage's output is discarded). ``on_tick`` is called every ``tick`` seconds while it
    runs and once at the end (progress). When a link breaks (a stage died, the sink is
    full) or the deadline passes, every stage is killed. The caller judges the result
    (``failures``); the sink stays open. Raises OSError if a stage cannot start."""
    run = _Pipeline(stages, source, sink, env, cwd, pdeathsig, limit)
    try:
        run.start()
        run.watch(None if timeout is None else run.t0 + timeout, on_tick, tick)
        if run.timed_out or run.errors:
            run.kill(grace)
        run.settle()
    except BaseException:
        run.kill(grace)
        raise
    finally:
        run.close()
    if on_tick is not None and not (run.timed_out or run.errors):
        on_tick()
    return run.result()


class _Pipeline:
    """The state of one :func:`run_pipeline`: its processes, the pumps between them, and
    each stage's stderr (read by the calling thread, which also keeps the time)."""

    def __init__(
        self,
        stages: Sequence[Stage],
        source: IO[bytes] | None,
        sink: IO[bytes] | None,
        env: Mapping[str, str] | None,
        cwd: Cwd,
        pdeathsig: int | None,
        limit: int,
    ) -> None:
        if not stages:
            raise ValueError("a pipeline needs a stage")
        self.stages, self.source, self.sink = list(stages), source, sink
        self.popen_args: dict[str, Any] = {"env": env, "cwd": cwd, "pdeathsig": pdeathsig}
        self.procs: list[subprocess.Popen[bytes]] = []
        self.stderr = [BoundedOutput(limit) for _ in stages]
        self.pumps: list[threading.Thread] = []
        self.errors: list[str] = []
        self.timed_out = False
        self.sel = selectors.DefaultSelector()
        self.t0 = time.monotonic()

    def start(self) -> None:
        for i, stage in enumerate(self.stages):
            stdin, stdout = self._stdin(i), self._stdout(i)
            with signals_deferred():  # every started stage is in self.procs: killed on error
                p = _popen(stage.argv, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE,
                           **self.popen_args)  # fmt: skip
                self.procs.append(p)
            if i > 0 and self.stages[i - 1].tap is None:
                self._close(self.procs[i - 1].stdout)  # the plain pipe is theirs now
            stderr = self.procs[i].stderr
            assert stderr is not None
            self.sel.register(stderr, selectors.EVENT_READ, self.stderr[i])
        for i, stage in enumerate(self.stages):
            if stage.tap is not None and (i + 1 < len(self.stages) or self.sink is not None):
                self._start_pump(i, stage.tap)

    def _stdin(self, i: int) -> Stdio:
        if i == 0:
            return self.source if self.source is not None else subprocess.DEVNULL
        return subprocess.PIPE if self.stages[i - 1].tap else self.procs[i - 1].stdout

    def _stdout(self, i: int) -> Stdio:
        if i + 1 < len(self.stages):
            return subprocess.PIPE
        if self.sink is None:
            return subprocess.DEVNULL
        return subprocess.PIPE if self.stages[i].tap else self.sink

    def _start_pump(self, i: int, tap: Callable[[bytes], None]) -> None:
        src = self.procs[i].stdout
        last = i + 1 == len(self.stages)
        dest = self.sink if last else self.procs[i + 1].stdin
        what = "writing the stream" if last else f"feeding {self.stages[i + 1].name}"
        assert src is not None and dest is not None
        t = threading.Thread(target=self._pump, args=(src, tap, dest, not last, what))
        t.daemon = True
        t.start()
        self.pumps.append(t)

    def _pump(
        self,
        src: IO[bytes],
        tap: Callable[[bytes], None],
        dest: IO[bytes],
        close_dest: bool,
        what: str,
    ) -> None:
        try:
            while chunk := src.read(CHUNK):
                tap(chunk)
                dest.write(chunk)
        except (OSError, ValueError) as e:  # the next stage died, the disk is full
            self.errors.append(f"{what}: {e}")
        finally:
            if close_dest:  # EOF for the next stage
                self._close(dest)

    def _running(self) -> bool:
        return any(t.is_alive() for t in self.pumps) or any(p.poll() is None for p in self.procs)

    def watch(
        self, deadline: float | None, on_tick: Callable[[], None] | None, tick: float
    ) -> None:
        """Read the stages' stderr until all have exited, a link breaks or the deadline."""
        next_tick = time.monotonic() + tick
        while self._running() and not self.errors:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                self.timed_out = True
                return
            wait = min(max(next_tick - now, 0.0), tick)
            self._read_stderr(wait if deadline is None else min(wait, deadline - now))
            if on_tick is not None and time.monotonic() >= next_tick:
                on_tick()
                next_tick = time.monotonic() + tick

    def _read_stderr(self, wait: float) -> bool:
        if not self.sel.get_map():
            time.sleep(wait)
            return False
        events = self.sel.select(timeout=wait)
        for key, _ in events:
            data = os.read(key.fd, 65536)
            if data:
                key.data.add(data)
            else:
                self.sel.unregister(key.fileobj)
        return bool(events)

    def kill(self, grace: float) -> None:
        for p in self.procs:
            if p.poll() is None:
                kill_group(p, grace)

    def settle(self) -> None:
        """After the end or the kill: the pumps stop, the last stderr is read, all reaped."""
        for t in self.pumps:
            t.join(timeout=30)
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=30)
        until = time.monotonic() + 2  # a background child may hold a stderr open
        while self.sel.get_map() and time.monotonic() < until and self._read_stderr(0.2):
            pass

    def close(self) -> None:
        self.sel.close()
        for p in self.procs:
            for pipe in (p.stdin, p.stdout, p.stderr):
                self._close(pipe)

    @staticmethod
    def _close(pipe: IO[bytes] | None) -> None:
        if pipe is not None:
            with contextlib.suppress(OSError, ValueError):
                pipe.close()

    def result(self) -> PipelineResult:
        out = []
        for stage, p, err in zip(self.stages, self.procs, self.stderr, strict=True):
            rc = p.returncode if p.returncode is not None else -signal.SIGKILL
            out.append(StageResult(stage.name, rc, err.bytes(), rc in stage.ok))
        return PipelineResult(out, list(self.errors), self.timed_out, time.monotonic() - self.t0)
