"""A guest agent without a guest: the QGA wire protocol on a unix socket, freezing
filesystems mounted on this host (loop images a test made) the way qemu-ga freezes its
guest's: FIFREEZE on ``guest-fsfreeze-freeze``, FITHAW on ``guest-fsfreeze-thaw``.

For the job path of the ``qemu`` provider outside the VM tier (the disk images are
mounted here, not in a guest); what a real agent and guest do is the VM tier's
(tests/vm/test_vm_qga.py). A stand-in, not Debian's qemu-ga, because a real agent cannot
run safely on a host: its ``guest-fsfreeze-thaw`` thaws every frozen filesystem of its
mount namespace, other users' freezes included, and its freeze without a list freezes
``/``. The guest's watchdog record does not exist (``guest-file-open``
answers an error, as an agent without quiesce's hook does).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
from pathlib import Path
from typing import Any

from quiesce.host import kernel


class FakeAgent:
    def __init__(self, path: Path, mounts: list[Path]) -> None:
        self.path, self.mounts = path, mounts
        self.frozen: list[int] = []  # fds of the filesystems frozen now
        self.calls: list[str] = []
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.srv.bind(str(path))
        self.srv.listen(4)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return  # closed
            with conn:
                self._session(conn)

    def _session(self, conn: socket.socket) -> None:
        buf, dec = "", json.JSONDecoder()
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                return
            buf += data.decode("latin-1")
            while True:
                buf = buf.lstrip("\xff \r\n\t")
                try:
                    msg, end = dec.raw_decode(buf)
                except ValueError:
                    break
                buf = buf[end:]
                conn.sendall(self._answer(msg))

    def _answer(self, msg: dict[str, Any]) -> bytes:
        cmd, args = msg.get("execute", ""), msg.get("arguments", {})
        self.calls.append(cmd)
        if cmd == "guest-sync-delimited":
            return b"\xff" + json.dumps({"return": args["id"]}).encode()
        if cmd == "guest-fsfreeze-freeze":
            for m in self.mounts:
                fd = os.open(m, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                kernel.fifreeze(fd)
                self.frozen.append(fd)
            return json.dumps({"return": len(self.frozen)}).encode()
        if cmd == "guest-fsfreeze-thaw":
            n = 0
            while self.frozen:
                fd = self.frozen.pop()
                kernel.fithaw(fd)
                os.close(fd)
                n += 1
            return json.dumps({"return": n}).encode()
        if cmd == "guest-fsfreeze-status":
            return json.dumps({"return": "frozen" if self.frozen else "thawed"}).encode()
        err = {"class": "GenericError", "desc": f"{cmd}: not here"}
        return json.dumps({"error": err}).encode()

    def close(self) -> None:
        while self.frozen:  # never leave a test's filesystem frozen
            fd = self.frozen.pop()
            with contextlib.suppress(Exception):
                kernel.fithaw(fd)
            os.close(fd)
        with contextlib.suppress(OSError):
            self.srv.shutdown(socket.SHUT_RDWR)  # wakes the accept()
        self.srv.close()
        self.thread.join(5)
