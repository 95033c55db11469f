"""Quiescers: what quiesces applications before the window and releases them after it.

The one definition of the protocol and of the release loop: the create engine drives a
:class:`QuiescerStack` around its window, and :func:`held` gives library users the same
for a snapshot they take themselves. Hooks and writers (layer apps) implement it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Protocol, runtime_checkable

from quiesce.snapshot.consistency import Claim, Consistency


@runtime_checkable
class Quiescer(Protocol):
    """``before_freeze`` in order before the window, ``after_thaw`` in reverse order on
    every path out (``ok`` says whether the window succeeded)."""

    def before_freeze(self) -> None: ...

    def after_thaw(self, ok: bool) -> None: ...


def quiesces(q: Quiescer) -> bool:
    """Whether ``q`` quiesces anything before the window (a post-thaw hook does not):
    only such steps make a snapshot application-consistent."""
    return bool(getattr(q, "quiesces", True))


def quiescing_steps(q: Quiescer) -> list[str]:
    """What ``q`` quiesced before the window, for the consistency reason: its optional
    ``steps`` (e.g. ``["pre-freeze hook 'flush'"]``), else its ``name``, else its type;
    nothing for a quiescer that does not quiesce (a post-thaw hook)."""
    if not quiesces(q):
        return []
    steps = getattr(q, "steps", None)
    if steps is not None:
        return [str(s) for s in steps]
    name = getattr(q, "name", None)
    return [f"hook {name!r}" if name else type(q).__name__]


def files_of(q: Quiescer) -> list[tuple[str, str]]:
    """The files ``q`` depends on, ``[(path, what)]``: its optional ``depends_on()``
    (a writer asks its application), else none declared."""
    fn = getattr(q, "depends_on", None)
    return [(str(p), str(w)) for p, w in fn()] if callable(fn) else []


def claim_of(q: Quiescer, frozen_ns: int | None) -> list[Claim]:
    """What ``q`` did, for the level and its reason: its optional ``claims(frozen_ns)``
    (``frozen_ns``: CLOCK_MONOTONIC of the first freeze, or None), else, for a step that
    quiesces, an ATOMIC claim (a hook cannot prove a recovery-free state)."""
    fn = getattr(q, "claims", None)
    if callable(fn):
        return list(fn(frozen_ns))
    return [
        Claim(step, Consistency.ATOMIC, "ran before the freeze (a hook proves no flushed state)")
        for step in quiescing_steps(q)
    ]


class QuiescerStack:
    """The quiescers started so far; released in reverse, each exactly once."""

    def __init__(self) -> None:
        self.started: list[Quiescer] = []

    def quiesce(self, quiescers: Sequence[Quiescer]) -> None:
        """``before_freeze`` each in order; one that raises is still released later."""
        for q in quiescers:
            self.started.append(q)
            q.before_freeze()

    def release(self, ok: bool) -> list[tuple[Quiescer, Exception]]:
        """``after_thaw`` each in reverse; every one is released whatever the others do.
        Returns the quiescers whose release raised, with what they raised."""
        failed: list[tuple[Quiescer, Exception]] = []
        started, self.started = self.started, []
        for q in reversed(started):
            try:
                q.after_thaw(ok)
            except Exception as e:
                failed.append((q, e))
        return failed


@contextlib.contextmanager
def held(quiescers: Sequence[Quiescer]) -> Iterator[None]:
    """Quiesce around the body: ``before_freeze`` in order, ``after_thaw`` in reverse on
    every way out. The first release failure is raised only when the body succeeded."""
    stack = QuiescerStack()
    ok = False
    try:
        stack.quiesce(quiescers)
        yield
        ok = True
    finally:
        failed = stack.release(ok)
        if failed and ok:
            raise failed[0][1]


__all__ = [
    "Quiescer",
    "QuiescerStack",
    "claim_of",
    "files_of",
    "held",
    "quiesces",
    "quiescing_steps",
]
