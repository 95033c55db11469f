"""The controller's side of a guardian: start it, ask it to freeze and thaw, renew its lease."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

from quiesce.errors import GuardianError
from quiesce.freezing.guardian.daemon import GuardedVolume, serve
from quiesce.freezing.guardian.protocol import (
    DEFAULT_LEASE,
    DEFAULT_TIMEOUT,
    MAX_MSG,
    recv,
    send,
)


class GuardianHandle:
    """The controller's end of a guardian: ask it to freeze and thaw, renew its lease."""

    def __init__(self, pid: int, sock: socket.socket, lease: float) -> None:
        self.pid = pid
        self.sock = sock
        self.lease = lease
        self.expired: dict[str, Any] | None = None
        self._ids = 0
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        if lease > 0:
            self._renewer = threading.Thread(target=self._renew, name="quiesce-lease", daemon=True)
            self._renewer.start()

    @classmethod
    def start(
        cls,
        vols: Sequence[GuardedVolume],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        lease: float = DEFAULT_LEASE,
    ) -> GuardianHandle:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        controller = os.getpid()
        pid = os.fork()
        if pid == 0:  # the guardian
            parent.close()
            serve(child, vols, timeout, lease, controller)
        child.close()
        parent.settimeout(10.0)
        try:
            hello = recv(parent)
        except (OSError, ValueError) as e:
            hello = None
            why = str(e)
        else:
            why = "it exited"
        parent.settimeout(None)
        if not hello or not hello.get("ready"):
            parent.close()
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            raise GuardianError(f"the guardian process did not start: {why}")
        return cls(pid, parent, lease)

    def _renew(self) -> None:
        interval = max(self.lease / 4, 0.05)
        while not self._stop.wait(interval):
            if not send(self.sock, {"op": "renew"}):
                return

    def request(self, op: str, **kw: Any) -> dict[str, Any]:
        self._ids += 1
        rid = self._ids
        if not send(self.sock, {"id": rid, "op": op, **kw}):
            raise GuardianError("the guardian is gone (socket closed)", "check `dmesg`")
        while True:
            try:
                msg = recv(self.sock)
            except (OSError, ValueError) as e:
                raise GuardianError(f"lost the guardian: {e}", "check `dmesg`") from None
            if msg is None:
                raise GuardianError("the guardian exited unexpectedly", "check `dmesg`")
            if msg.get("event") == "expired":
                self.expired = msg
                continue
            if msg.get("id") == rid:
                if msg.get("expired"):
                    self.expired = msg["expired"]
                return msg

    def poll_expired(self) -> dict[str, Any] | None:
        """Non-blocking: has the guardian thawed on its own?"""
        # MSG_DONTWAIT, not setblocking(False): the lease thread sends on this socket.
        while self.expired is None:
            try:
                data = self.sock.recv(MAX_MSG, socket.MSG_DONTWAIT)
            except OSError:
                break
            if not data:
                break
            with contextlib.suppress(ValueError):
                msg = json.loads(data)
                if msg.get("event") == "expired":
                    self.expired = msg
        return self.expired

    def freeze(self, idx: int) -> dict[str, Any]:
        return self.request("freeze", vol=idx)

    def thaw(self, idx: int) -> dict[str, Any]:
        return self.request("thaw", vol=idx)

    def detach(self) -> None:
        """Hand the freeze over: the guardian keeps it until `quiesce thaw` or the deadline."""
        self._stop.set()
        self.request("detach")
        self.sock.close()

    def close(self) -> None:
        """Tell the guardian we are done (it exits) and reap it."""
        self._stop.set()
        with contextlib.suppress(OSError, GuardianError):
            self.request("done")
        self.sock.close()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                return
            if pid:
                return
            time.sleep(0.002)
