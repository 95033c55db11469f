"""Finding and asking *other* guardians: `quiesce status`, `quiesce thaw`, EBUSY stories."""

from __future__ import annotations

import contextlib
import json
import os
import socket
from typing import Any

from quiesce.errors import GuardianError
from quiesce.freezing.guardian.protocol import SOCKET_PREFIX, recv, socket_name


def list_guardians() -> list[int]:
    """Pids of live guardians, found by their abstract socket names in /proc/net/unix."""
    pids: set[int] = set()
    try:
        with open("/proc/net/unix") as f:
            for line in f:
                name = line.split()[-1] if line.strip() else ""
                if name.startswith("@" + SOCKET_PREFIX):
                    with contextlib.suppress(ValueError):
                        pids.add(int(name[len(SOCKET_PREFIX) + 1 :]))
    except OSError:
        pass
    return sorted(pids)


def holder_of(dev: str, *, exclude: int | None = None) -> dict[str, Any] | None:
    """The status of another live guardian holding the volume ``dev`` frozen, if any:
    an EBUSY that is a second quiesce run, not a stranger's freeze."""
    for pid in list_guardians():
        if pid in (exclude, os.getpid()):
            continue
        try:
            st = ask(pid, {"op": "status"}, timeout=1.0)
        except GuardianError:
            continue
        if any(v.get("dev") == dev and v.get("state") == "frozen" for v in st["volumes"]):
            return st
    return None


def ask(pid: int, msg: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """One request to the guardian ``pid`` over its abstract socket."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(timeout)
    try:
        s.connect(socket_name(pid))
        s.send(json.dumps({"id": 1, **msg}).encode())
        reply = recv(s)
    except (OSError, ValueError) as e:
        raise GuardianError(
            f"guardian {pid} did not answer: {e}", "it may have just exited"
        ) from None
    finally:
        s.close()
    if reply is None:
        raise GuardianError(f"guardian {pid} closed the connection", "run as root")
    return reply
