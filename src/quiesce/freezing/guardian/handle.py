"""The controller's side of a guardian: start it, ask it to freeze and thaw, renew its lease."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

from quiesce.errors import GuardianError
from quiesce.freezing.guardian import expedite
from quiesce.freezing.guardian.client import supersede
from quiesce.freezing.guardian.daemon import GuardedVolume, serve
from quiesce.freezing.guardian.protocol import (
    DEFAULT_LEASE,
    DEFAULT_TIMEOUT,
    MAX_MSG,
    ProtocolError,
    check_seconds,
    decode,
    open_run_dir,
    recv,
    send,
)

THAW_REPLY_S = 5.0  # a thaw is sub-millisecond; a guardian this late is stopped or stuck


class GuardianHandle:
    """The controller's end of a guardian: ask it to freeze and thaw, renew its lease."""

    def __init__(self, pid: int, sock: socket.socket, lease: float) -> None:
        self.pid = pid
        self.sock = sock
        self.lease = lease
        self.expired: dict[str, Any] | None = None
        self.lost: str | None = None  # why the guardian can no longer be believed
        self.lost_volumes: list[dict[str, Any]] = []  # freezes someone else thawed
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
        trace: bool = True,
    ) -> GuardianHandle:
        """Fork the guardian. ``trace``: watch everyone's FIFREEZE/FITHAW calls (where the
        kernel allows) besides probing; False leaves the probes alone."""
        timeout = check_seconds("timeout", timeout)
        lease = check_seconds("lease", lease, zero_ok=True)
        dir_fd = open_run_dir(create=True)
        assert dir_fd is not None
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        controller = os.getpid()
        try:
            pid = os.fork()
            if pid == 0:  # the guardian
                parent.close()
                serve(child, vols, timeout, lease, controller, dir_fd, trace)
        finally:
            os.close(dir_fd)
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
        # Before anything is frozen: finished guardians must not answer for this freeze.
        supersede(sorted({v.dev for v in vols}), exclude=pid)
        return cls(pid, parent, lease)

    def _renew(self) -> None:
        interval = max(self.lease / 4, 0.05)
        while not self._stop.wait(interval):
            if not send(self.sock, {"op": "renew"}):
                return

    def _take(self, msg: dict[str, Any]) -> None:
        if msg.get("event") == "expired":
            self.expired = msg
        elif msg.get("event") == "lost" and isinstance(msg.get("dev"), str):
            self.lost_volumes.append(msg)

    def request(
        self, op: str, *, within: float | None = None, fds: Sequence[int] = (), **kw: Any
    ) -> dict[str, Any]:
        """One request and its reply; ``within`` seconds at most (None: as long as it takes,
        for a FIFREEZE that must flush). ``fds`` go with it (SCM_RIGHTS). GuardianError if
        the guardian is lost."""
        if self.lost is not None:
            raise GuardianError(f"the guardian is lost: {self.lost}", "check `dmesg`")
        self._ids += 1
        rid = self._ids
        if not send(self.sock, {"id": rid, "op": op, **kw}, fds=fds):
            self.lost = "its socket is closed"
            raise GuardianError("the guardian is gone (socket closed)", "check `dmesg`")
        end = None if within is None else time.monotonic() + within
        while True:
            if end is not None:
                left = end - time.monotonic()
                ready, _, _ = select.select([self.sock], [], [], max(left, 0))
                if not ready:
                    self.lost = f"no answer to {op} within {within:g}s"
                    raise GuardianError(f"the guardian did not answer {op} in time")
            try:
                msg = recv(self.sock)
            except (OSError, ValueError) as e:
                self.lost = str(e)
                raise GuardianError(f"lost the guardian: {e}", "check `dmesg`") from None
            if msg is None:
                self.lost = "it exited"
                raise GuardianError("the guardian exited unexpectedly", "check `dmesg`")
            if "event" in msg:
                self._take(msg)
                if op == "freeze_wave" and msg.get("event") == "expired":
                    # The deadline passed while a FIFREEZE waits in the kernel (writes in
                    # flight): fail now; the guardian thaws it the moment it returns.
                    return {"id": rid, "ok": False, "expired": msg}
                continue
            if msg.get("id") == rid:
                if msg.get("expired"):
                    self.expired = msg["expired"]
                return msg

    def poll_expired(self) -> dict[str, Any] | None:
        """Non-blocking: has the guardian thawed on its own?"""
        # MSG_DONTWAIT, not setblocking(False): the lease thread sends on this socket.
        while True:
            try:
                data = self.sock.recv(MAX_MSG, socket.MSG_DONTWAIT)
            except OSError:
                break
            if not data:
                break
            with contextlib.suppress(ProtocolError):
                self._take(decode(data))
        return self.expired

    def poll_lost(self) -> list[dict[str, Any]]:
        """Freezes of ours the guardian saw thawed by someone else (so far)."""
        self.poll_expired()
        return self.lost_volumes

    def freeze(self, idx: int) -> dict[str, Any]:
        return self.request("freeze", vol=idx)

    def thaw(self, idx: int) -> dict[str, Any]:
        return self.request("thaw", within=THAW_REPLY_S, vol=idx)

    def freeze_wave(
        self,
        idxs: Sequence[int],
        expedite: str = "",
        gate_fd: int | None = None,
        exit_fd: int | None = None,
    ) -> dict[str, Any]:
        """Freeze volumes with no order between them at once; ``expedite`` ("set",
        "restore", "set-restore") brackets the group with expedited RCU grace periods.
        ``gate_fd`` (the last wave): the guardian writes one byte to it the moment every
        volume of the group is frozen (the reply's ``gate_ns`` says when), never else.
        ``exit_fd`` (with it): the released command's pidfd; when it exits, the guardian
        thaws this wave at once, and the next ``thaw_wave`` of these volumes is answered
        with that thaw (asked before the command exited: the watch ends, thawed as asked)."""
        if gate_fd is None:
            return self.request("freeze_wave", vols=list(idxs), expedite=expedite)
        fds = [gate_fd] if exit_fd is None else [gate_fd, exit_fd]
        return self.request("freeze_wave", vols=list(idxs), expedite=expedite, gate=True, fds=fds)

    def thaw_wave(self, idxs: Sequence[int]) -> dict[str, Any]:
        return self.request("thaw_wave", within=THAW_REPLY_S, vols=list(idxs))

    def detach(self) -> None:
        """Hand the freeze over: the guardian keeps it until `quiesce thaw` or the deadline."""
        self._stop.set()
        self.request("detach", within=THAW_REPLY_S)
        self.sock.close()

    def close(self) -> None:
        """Tell the guardian we are done (it exits) and reap it. A guardian we gave up on
        is killed: it is our child, and it must not thaw later what it no longer holds."""
        self._stop.set()
        if self.lost is None:
            with contextlib.suppress(OSError, GuardianError):
                self.request("done", within=THAW_REPLY_S)
        if self.lost is not None:
            with contextlib.suppress(OSError):
                os.kill(self.pid, signal.SIGKILL)  # not reaped yet: the pid is still ours
        self.sock.close()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                return
            if pid:
                if self.lost is not None:
                    # Killed between setting rcu_expedited and restoring it? Its record
                    # names it: restore now rather than wait for `quiesce cleanup`.
                    with contextlib.suppress(Exception):
                        expedite.restore_stale()
                return
            time.sleep(0.002)
