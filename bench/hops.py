"""Timestamps of every hop in a freeze window, for bench/exec_window.py ``--hops``.

Not part of quiesce: it wraps quiesce's functions in the bench process before the
guardian is forked (the fork inherits the wrappers), records ``time.monotonic_ns()``
(one clock for every process) at each hop, and the guardian dumps its marks to a file
just before it removes its socket (after the window). Wrapping costs about a
microsecond per mark: small next to the hops it measures.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import time
from collections.abc import Callable
from typing import Any

MARKS: list[tuple[int, str]] = []
DUMP_DIR = "/tmp"
os.register_at_fork(after_in_child=MARKS.clear)  # the guardian keeps only its own


def mark(what: str) -> None:
    MARKS.append((time.monotonic_ns(), what))


def _wrap(owner: Any, name: str, before: str | None, after: str | None) -> None:
    fn = getattr(owner, name)
    if getattr(fn, "_hops", False):
        return

    @functools.wraps(fn)
    def wrapped(*a: Any, **kw: Any) -> Any:
        if before:
            mark(before)
        try:
            return fn(*a, **kw)
        finally:
            if after:
                mark(after)

    wrapped._hops = True  # type: ignore[attr-defined]
    setattr(owner, name, wrapped)


def install() -> None:
    """Wrap the hops (idempotent)."""
    from quiesce.freezing.guardian import crew, daemon, expedite, handle
    from quiesce.host import kernel, proc

    def freeze_errno(fd: int, _f: Callable[[int], int] = kernel.freeze_errno) -> int:
        mark("FIFREEZE>")
        code = _f(fd)
        mark("FIFREEZE<" if code == 0 else f"FIFREEZE<{code}")
        return code

    if not getattr(kernel.freeze_errno, "_hops", False):
        freeze_errno._hops = True  # type: ignore[attr-defined]
        kernel.freeze_errno = freeze_errno  # checked_thaw_errno calls it through the module
    _wrap(kernel, "thaw_errno", "FITHAW>", "FITHAW<")
    _wrap(expedite.Expedite, "release", "rcu.release>", "rcu.release<")
    _wrap(expedite.Expedite, "acquire", "rcu.acquire>", "rcu.acquire<")
    _wrap(daemon, "send", "g.send>", "g.send<")
    _wrap(daemon._Guardian, "_on_controller", "g.main.recv>", None)
    _wrap(daemon._Guardian, "_read_trace", "g.trace>", "g.trace<")
    _wrap(daemon._Guardian, "_complete", "g.main.complete>", None)
    _wrap(daemon._Guardian, "_finish", "g.finish>", None)
    if hasattr(daemon._Guardian, "_open_gate"):  # the guardian releases the command
        _wrap(daemon._Guardian, "_open_gate", None, "g.gate<")
    if hasattr(daemon._Guardian, "_command_exited"):  # ... and thaws when it exits
        _wrap(daemon._Guardian, "_command_exited", "g.cmd.exited>", None)
    _wrap(handle, "send", "c.send>", "c.send<")
    _wrap(handle, "recv", None, "c.recv<")
    _wrap(proc.Gated, "release", "c.gate.release>", None)
    _wrap(proc.Gated, "wait", None, "c.gate.waited<")
    if not getattr(crew.Crew.submit, "_hops", False):
        submit = crew.Crew.submit

        def submit_marked(self: Any, i: int, task: Any) -> None:
            mark("crew.submit")

            def run() -> None:
                mark("crew.run")
                task()

            submit(self, i, run)

        submit_marked._hops = True  # type: ignore[attr-defined]
        crew.Crew.submit = submit_marked  # type: ignore[method-assign]

    remove = daemon._Guardian.remove_socket
    if not getattr(remove, "_hops", False):

        def remove_and_dump(self: Any) -> None:
            path = os.path.join(DUMP_DIR, f"quiesce-hops-{os.getpid()}.json")
            with open(path, "w") as f:
                json.dump(MARKS, f)
            remove(self)

        remove_and_dump._hops = True  # type: ignore[attr-defined]
        daemon._Guardian.remove_socket = remove_and_dump  # type: ignore[method-assign]


def collect(guardian_pid: int | None, ours: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """This run's marks, ours and the guardian's, in time order."""
    got = list(ours)
    if guardian_pid:
        path = os.path.join(DUMP_DIR, f"quiesce-hops-{guardian_pid}.json")
        for _ in range(500):  # the guardian dumps as it exits
            if os.path.exists(path):
                try:
                    with open(path) as f:
                        got += [tuple(x) for x in json.load(f)]
                    break
                except ValueError:
                    pass
            time.sleep(0.002)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    return sorted(got)


# Each method's path from the first FIFREEZE issued to the last FITHAW returned, as marks
# in the order they must happen (each found after the one before it).
CHAINS = {
    "guardian": [
        "FIFREEZE>", "FIFREEZE<", "rcu.release>", "rcu.release<", "g.send<", "c.recv<",
        "c.send>", "g.main.recv>", "crew.run", "FIFREEZE>", "FIFREEZE<16", "FITHAW>", "FITHAW<",
    ],
    "gated-by-controller": [
        "FIFREEZE>", "FIFREEZE<", "rcu.release>", "rcu.release<", "g.send<", "c.recv<",
        "c.gate.release>", "c.gate.waited<", "c.send>", "g.main.recv>", "crew.run",
        "FIFREEZE>", "FIFREEZE<16", "FITHAW>", "FITHAW<",
    ],
    "gated": [
        "FIFREEZE>", "FIFREEZE<", "g.gate<", "g.cmd.exited>", "crew.run", "FIFREEZE>",
        "FIFREEZE<16", "FITHAW>", "FITHAW<",
    ],
}  # fmt: skip
IOCTLS = {("FIFREEZE>", "FIFREEZE<"), ("FIFREEZE>", "FIFREEZE<16"), ("FITHAW>", "FITHAW<")}


def window_hops(marks: list[tuple[int, str]], chain: list[str]) -> list[tuple[str, float]]:
    """The gaps between consecutive marks of ``chain`` (ms), each named ``a -> b``; a
    mark missing from this run ends the list early (the caller counts the runs)."""
    start = next(i for i, (_, w) in enumerate(marks) if w == chain[0])
    at = [marks[start]]
    j = start
    for want in chain[1:]:
        k = next((k for k in range(j + 1, len(marks)) if marks[k][1] == want), None)
        if k is None:
            break
        at.append(marks[k])
        j = k
    return [(f"{a[1]} -> {b[1]}", (b[0] - a[0]) / 1e6) for a, b in itertools.pairwise(at)]
