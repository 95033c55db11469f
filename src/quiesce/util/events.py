"""Typed progress events: how the job, snapshot and backup layers tell the CLI what they
are doing while they do it, without printing anything themselves.

An :class:`Event` is a phase starting or ending, a progress sample (bytes of a backup or
a verification), or a note. The layers call an :data:`EventFn` they were given (or
nothing); the CLI renders. :class:`HeldEvents` keeps the events raised while volumes are
frozen in memory and delivers them after the thaw: a renderer writing to a log on a
frozen volume would block until the guardian's deadline.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

Kind = Literal["start", "end", "progress", "note"]


@dataclass(frozen=True)
class Event:
    kind: Kind
    phase: str  # "pre-freeze hooks", "freeze window", "backup", "verify", ...
    at: float = field(default_factory=time.time)  # when it happened (not when delivered)
    ok: bool | None = None  # "end": did the phase succeed
    duration_s: float | None = None  # "end"
    detail: str | None = None
    done: int | None = None  # "progress": bytes so far
    total: int | None = None  # "progress": bytes expected, if known
    files: int | None = None
    total_files: int | None = None


EventFn = Callable[[Event], None]


def emit(events: EventFn | None, kind: Kind, phase: str, **kw: object) -> None:
    if events is not None:
        events(Event(kind, phase, **kw))  # type: ignore[arg-type]


@contextlib.contextmanager
def phase_events(events: EventFn | None, phase: str, detail: str | None = None) -> Iterator[None]:
    """``start`` now, ``end`` (with ok and the duration) when the block is left."""
    emit(events, "start", phase, detail=detail)
    t0 = time.monotonic()
    ok = False
    try:
        yield
        ok = True
    finally:
        emit(events, "end", phase, ok=ok, duration_s=time.monotonic() - t0)


class HeldEvents:
    """An EventFn that passes events on, except inside :meth:`hold`: those are kept in
    memory and delivered, in order, when the block is left (after the thaw)."""

    def __init__(self, deliver: EventFn | None) -> None:
        self.deliver = deliver
        self.held: list[Event] = []
        self.holding = False

    def __call__(self, event: Event) -> None:
        if self.deliver is None:
            return
        if self.holding:
            self.held.append(event)
        else:
            self.deliver(event)

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        self.holding = True
        try:
            yield
        finally:
            self.holding = False
            held, self.held = self.held, []
            if self.deliver is not None:
                for e in held:
                    self.deliver(e)


__all__ = ["Event", "EventFn", "HeldEvents", "emit", "phase_events"]
