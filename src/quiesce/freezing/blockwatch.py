"""The opt-in blocker policy around a group's FIFREEZEs (``[timeouts] end_blockers_after``,
``--end-blockers-after``): once a freeze has waited that long, end the unprivileged
processes whose writes keep it waiting (:func:`quiesce.host.blockers.end_blockers`).

Off by default: ending another user's process is the admin's choice. Root's processes
are never ended, nor writers that only wait for the freeze. It runs on the controller's
side while ``Freezer.freeze()`` waits (after ``arm()``: the guardian is up and the
pre-flush done, so the clock starts with the first FIFREEZE), in a thread that only
reads /proc and sends signals: nothing is written while volumes freeze. What it did is
kept in ``ended`` (lines to log after the thaw).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from quiesce.host.blockers import end_blockers

POLL_S = 0.2  # how often a freeze past the bound is looked at again


@dataclass
class BlockerWatch:
    """What the policy ended during one freeze: one line each (pid, uid, command)."""

    after: float | None
    ended: list[str] = field(default_factory=list)


@contextmanager
def ending_blockers(devs: Sequence[str], after: float | None) -> Iterator[BlockerWatch]:
    """While the body freezes ``devs`` (``major:minor``), end the unprivileged processes
    that keep a FIFREEZE waiting longer than ``after`` seconds (None: do nothing)."""
    watch = BlockerWatch(after)
    if after is None or not devs:
        yield watch
        return
    stop = threading.Event()
    t0 = time.monotonic()

    def loop() -> None:
        if stop.wait(after):
            return
        while not stop.is_set():
            for dev in devs:
                end_blockers(dev, older_than=time.monotonic() - t0, log=watch.ended.append)
            stop.wait(POLL_S)

    thread = threading.Thread(target=loop, name="quiesce-blockers", daemon=True)
    thread.start()
    try:
        yield watch
    finally:
        stop.set()
        thread.join(timeout=5)


__all__ = ["POLL_S", "BlockerWatch", "ending_blockers"]
