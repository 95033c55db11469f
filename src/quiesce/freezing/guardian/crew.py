"""Parked ioctl threads, one per volume, started before the window and woken together.

Starting a thread costs tens of microseconds and a GIL hand-off per volume; on a 2-core
machine four threads started at the moment of a group freeze stretched the window of a
4-volume group to 3-6x one volume's. A crew's threads are started when the guardian
starts (before anything is frozen) and block on their own queue; handing one its task
is one lock release, and its FIFREEZE begins as soon as it is scheduled.

Each volume's thread runs its tasks in order (a freeze before the thaw of the same
volume), so a FIFREEZE stuck in the kernel holds back only its own volume's later tasks.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

Task = Callable[[], None]


class Crew:
    """``n`` daemon threads; ``submit(i, task)`` runs ``task`` on thread ``i``.

    A task that raises is reported to ``on_crash(i, exc)`` on that thread (it must not
    raise); the thread then waits for its next task, so nothing submitted later is lost.
    ``close()`` tells every thread to exit once its queue is empty; ``join()`` waits for
    the ones not stuck in the kernel.
    """

    def __init__(
        self, n: int, on_crash: Callable[[int, BaseException], None], name: str = "ioctl"
    ) -> None:
        self._queues: list[queue.SimpleQueue[Task | None]] = [queue.SimpleQueue() for _ in range(n)]
        self._on_crash = on_crash
        self.threads = [
            threading.Thread(target=self._run, args=(i,), name=f"{name}-{i}", daemon=True)
            for i in range(n)
        ]
        for t in self.threads:
            t.start()

    def _run(self, i: int) -> None:
        q = self._queues[i]
        while True:
            task = q.get()
            if task is None:
                return
            try:
                task()
            except Exception as e:  # the owner decides (the guardian: thaw and leave)
                self._on_crash(i, e)

    def submit(self, i: int, task: Task) -> None:
        self._queues[i].put(task)

    def alive(self, i: int) -> bool:
        return self.threads[i].is_alive()

    def close(self) -> None:
        for q in self._queues:
            q.put(None)

    def join(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds in all; True if every thread has exited."""
        end = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, end - time.monotonic()))
        return not any(t.is_alive() for t in self.threads)
