"""A client of qemu-guest-agent (QGA) on the host end of its virtio-serial channel.

QEMU exposes the guest's ``org.qemu.guest_agent.0`` port as a unix socket on the host
(``-chardev socket,path=...,server=on``; libvirt names it
``/var/lib/libvirt/qemu/channel/target/<domain>/org.qemu.guest_agent.0``). The protocol is
JSON, one object per command; the channel keeps bytes a previous client left unread (an
answer to a command whose client died), so every connection starts with
``guest-sync-delimited``: the agent answers with a 0xFF byte and then the id we sent, and
everything before them is stale and dropped.

Every call has a deadline: a stopped or hung agent never answers, and the host's run must
fail cleanly rather than wait (the guest's own watchdog thaws it, integrations/qga).
"""

from __future__ import annotations

import base64
import json
import random
import socket
import time
from typing import Any

from quiesce.errors import AgentError, AgentTimeout

_SYNC = 0xFF


class GuestAgent:
    """One connection to one guest's agent. Use as a context manager."""

    def __init__(self, path: str, *, timeout: float = 10.0, name: str = "") -> None:
        self.path, self.timeout, self.name = path, timeout, name or path
        self.sock: socket.socket | None = None
        self._buf = b""

    def __enter__(self) -> GuestAgent:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        s.settimeout(self.timeout)
        try:
            s.connect(self.path)
        except OSError as e:
            s.close()
            raise AgentError(
                f"cannot connect to the guest agent of {self.name} at {self.path}: {e.strerror}"
            ) from None
        self.sock = s
        self.sync()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    # -- wire ------------------------------------------------------------------------------

    def _send(self, obj: dict[str, Any], *, prefix: bytes = b"") -> None:
        assert self.sock is not None
        try:
            self.sock.sendall(prefix + json.dumps(obj).encode())
        except OSError as e:
            raise AgentError(f"guest agent of {self.name}: send failed: {e}") from None

    def _recv_more(self, deadline: float, what: str) -> None:
        assert self.sock is not None
        left = deadline - time.monotonic()
        if left <= 0:
            raise AgentTimeout(f"guest agent of {self.name} did not answer {what} in time")
        self.sock.settimeout(left)
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            raise AgentTimeout(
                f"guest agent of {self.name} did not answer {what} within "
                f"{self.timeout:g}s (hung, stopped, or not running)"
            ) from None
        except OSError as e:
            raise AgentError(f"guest agent of {self.name}: {e}") from None
        if not chunk:
            raise AgentError(f"guest agent of {self.name}: the channel closed")
        self._buf += chunk

    def _next_object(self) -> dict[str, Any] | None:
        """Take one JSON object off the front of the buffer (None: not all there yet).
        Offsets are found on a latin-1 view (one char per byte, so a 0xFF delimiter after
        the object survives), the object itself is decoded as UTF-8."""
        raw = self._buf.lstrip(b"\xff \r\n\t")
        self._buf = raw
        if not raw:
            return None
        if not raw.startswith(b"{"):
            raise ValueError("not a JSON object")
        try:
            _, end = json.JSONDecoder().raw_decode(raw.decode("latin-1"))
        except json.JSONDecodeError:
            if b"\xff" in raw:
                raise ValueError("a broken object before a delimiter") from None
            return None
        obj = json.loads(raw[:end].decode("utf-8", errors="replace"))
        self._buf = raw[end:]
        if not isinstance(obj, dict):
            raise ValueError("not a JSON object")
        return obj

    def _read_object(self, deadline: float, what: str) -> dict[str, Any]:
        """The next JSON object on the channel (objects are not newline-delimited)."""
        while True:
            try:
                obj = self._next_object()
            except ValueError as e:
                raise AgentError(f"guest agent of {self.name}: unreadable answer: {e}") from None
            if obj is not None:
                return obj
            self._recv_more(deadline, what)

    def sync(self) -> None:
        """guest-sync-delimited: drop whatever a former client left on the channel (stale
        answers, half an answer); our answer follows a 0xFF byte and carries our id."""
        ident = random.randrange(1, 2**31)
        deadline = time.monotonic() + self.timeout
        self._buf = b""
        self._send({"execute": "guest-sync-delimited", "arguments": {"id": ident}}, prefix=b"\xff")
        while True:
            pos = self._buf.find(bytes([_SYNC]))
            if pos < 0:
                self._buf = b""
                self._recv_more(deadline, "guest-sync-delimited")
                continue
            self._buf = self._buf[pos + 1 :]
            while True:  # the objects after this delimiter, up to the next one
                try:
                    obj = self._next_object()
                except ValueError:
                    break  # garbage: look for the next delimiter
                if obj is None:
                    if b"\xff" in self._buf:
                        break
                    self._recv_more(deadline, "guest-sync-delimited")
                    continue
                if obj.get("return") == ident:
                    return

    def call(self, command: str, timeout: float | None = None, **arguments: Any) -> Any:
        """Run one command; its ``return`` value, or AgentError with the agent's message."""
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        self._send(msg)
        obj = self._read_object(deadline, command)
        if "error" in obj:
            err = obj["error"]
            desc = err.get("desc", err) if isinstance(err, dict) else err
            raise AgentError(f"guest agent of {self.name}: {command} failed: {desc}")
        return obj.get("return")

    # -- commands --------------------------------------------------------------------------

    def freeze(self, mountpoints: list[str] | None = None, timeout: float | None = None) -> int:
        if mountpoints:
            return int(self.call("guest-fsfreeze-freeze-list", timeout, mountpoints=mountpoints))
        return int(self.call("guest-fsfreeze-freeze", timeout))

    def thaw(self, timeout: float | None = None) -> int:
        return int(self.call("guest-fsfreeze-thaw", timeout))

    def status(self, timeout: float | None = None) -> str:
        return str(self.call("guest-fsfreeze-status", timeout))

    def read_file(self, path: str, limit: int = 1 << 20) -> bytes | None:
        """A small guest file's bytes (None if it does not exist)."""
        try:
            handle = self.call("guest-file-open", path=path, mode="r")
        except AgentError:
            return None
        try:
            res = self.call("guest-file-read", handle=handle, count=limit)
            return base64.b64decode(res.get("buf-b64", ""))
        finally:
            self.call("guest-file-close", handle=handle)


__all__ = ["AgentError", "AgentTimeout", "GuestAgent"]
