"""Signal deferral: a step that must not be cut in half (a wave of ioctls, starting a
child that must be tracked) holds SIGINT/SIGTERM and takes them right after."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator


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
        for number in got:
            os.kill(os.getpid(), number)


__all__ = ["signals_deferred"]
