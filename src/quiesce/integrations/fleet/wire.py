"""The agent channel's wire format: one JSON object per line, both ways."""

from __future__ import annotations

import json
import os
import select
import time
from typing import Any

MAX_LINE = 1 << 20


class LineReader:
    """Buffered line reading from a raw fd, with a timeout (select), for one process."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = b""
        self.eof = False

    def _pop(self) -> dict[str, Any] | None:
        line, sep, rest = self.buf.partition(b"\n")
        if not sep:
            return None
        self.buf = rest
        msg = json.loads(line)
        if not isinstance(msg, dict):
            raise ValueError("a message must be a JSON object")
        return msg

    def read(self, timeout: float | None) -> dict[str, Any] | None:
        """The next message; None on timeout or EOF (see ``eof``)."""
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            msg = self._pop()
            if msg is not None or self.eof:
                return msg
            left = None if end is None else max(end - time.monotonic(), 0.0)
            ready, _, _ = select.select([self.fd], [], [], left)
            if not ready:
                return None
            data = os.read(self.fd, 65536)
            if not data:
                self.eof = True
                continue
            self.buf += data
            if len(self.buf) > MAX_LINE:
                raise ValueError("a line longer than 1 MiB")


def write(fd: int, msg: dict[str, Any]) -> bool:
    """Send one message; False if the other side is gone."""
    data = json.dumps(msg, separators=(",", ":")).encode() + b"\n"
    try:
        while data:
            n = os.write(fd, data)
            data = data[n:]
    except (BrokenPipeError, OSError):
        return False
    return True
