"""Run a child process near the freeze window: bounded in time and in output.

One runner for hooks, the command provider and ``quiesce exec``: the child gets its own
process group (killed as one on timeout), no shell, cwd ``/`` (never a directory on a
volume about to freeze), and its output is kept in memory, bounded, never in a file.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from quiesce.errors import QuiesceError, UsageError

OUTPUT_LIMIT = 8192  # bytes kept per stream by default (head and tail)


class ToolTimedOut(QuiesceError):
    """An admin tool outlived its timeout and was killed (a hung device, a stuck pool)."""

    default_hint = "the storage may be hung: check `dmesg` and the device, then retry"


def run_tool(*cmd: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """An admin tool outside the window (mount, losetup, lvs, zfs): text output captured,
    stdin closed; the caller judges the exit status. ToolTimedOut after ``timeout``."""
    try:
        return subprocess.run(
            cmd, text=True, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL,
            check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        raise ToolTimedOut(
            f"{' '.join(cmd)} did not finish in {timeout:g} s and was killed"
        ) from None


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


def kill_group(proc: subprocess.Popen[bytes], grace: float = 0.0) -> None:
    """SIGTERM the child's whole process group, SIGKILL it after ``grace`` (0: at once)."""
    steps = ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)) if grace > 0 else ()
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


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM across a step that must not be cut in half (a group of
    ioctls, starting a child that must be tracked); deliver them right after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    old = {
        sig: signal.signal(sig, lambda s, _f: got.append(s))
        for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        for sig in got:
            os.kill(os.getpid(), sig)


@dataclass
class Completed:
    returncode: int
    stdout: bytes  # b"" when not captured
    stderr: bytes  # b"" when not captured or merged into stdout
    timed_out: bool
    duration_s: float


def run_bounded(
    argv: Sequence[str],
    *,
    timeout: float,
    env: Mapping[str, str] | None = None,
    input: bytes | None = None,
    capture_stdout: bool = True,
    capture_stderr: bool = True,
    merge_stderr: bool = False,
    limit: int = OUTPUT_LIMIT,
    grace: float = 0.0,
    cwd: str = "/",
) -> Completed:
    """Run ``argv`` to completion or ``timeout``; never a shell. Raises OSError if it
    cannot start. An uncaptured stream is inherited from this process."""
    if merge_stderr:
        stderr: int | None = subprocess.STDOUT
    else:
        stderr = subprocess.PIPE if capture_stderr else None
    t0 = time.monotonic()
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE if capture_stdout else None,
        stderr=stderr,
        env=dict(env) if env is not None else None,
        cwd=cwd,
        start_new_session=True,  # its own process group, killed as one
        close_fds=True,
    )
    outs = {"out": BoundedOutput(limit), "err": BoundedOutput(limit)}
    sel = selectors.DefaultSelector()
    if proc.stdout is not None:
        sel.register(proc.stdout, selectors.EVENT_READ, "out")
    if proc.stderr is not None:
        sel.register(proc.stderr, selectors.EVENT_READ, "err")
    if input is not None:
        threading.Thread(target=_feed, args=(proc, input), daemon=True).start()
    deadline = t0 + max(timeout, 0.0)
    timed_out = False
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            if not sel.get_map():  # nothing captured, or every pipe closed: just wait
                try:
                    proc.wait(timeout=left)
                    break
                except subprocess.TimeoutExpired:
                    timed_out = True
                    break
            events = sel.select(timeout=min(left, 0.5))
            for key, _ in events:
                data = os.read(key.fileobj.fileno(), 65536)  # type: ignore[union-attr]
                if data:
                    outs[key.data].add(data)
                else:
                    sel.unregister(key.fileobj)
            if not events and proc.poll() is not None and not sel.select(timeout=0.2):
                break  # exited; a background child still holds a pipe: stop reading
        if timed_out:
            kill_group(proc, grace)
        else:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                timed_out = True
                kill_group(proc, grace)
    except BaseException:  # Ctrl-C while it runs: it must not outlive us
        kill_group(proc)
        raise
    finally:
        sel.close()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    return Completed(
        returncode=proc.returncode,
        stdout=outs["out"].bytes(),
        stderr=outs["err"].bytes(),
        timed_out=timed_out,
        duration_s=time.monotonic() - t0,
    )


def _feed(proc: subprocess.Popen[bytes], data: bytes) -> None:
    assert proc.stdin is not None
    with contextlib.suppress(OSError):
        proc.stdin.write(data)
    with contextlib.suppress(OSError):
        proc.stdin.close()
