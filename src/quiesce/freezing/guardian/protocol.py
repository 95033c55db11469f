"""The guardian's wire format: one JSON object per SOCK_SEQPACKET message.

Shared by the daemon, the controller's handle and the clients, so that the three agree
on framing, limits and the socket's name without importing each other.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

SOCKET_PREFIX = "quiesce-guardian-"
DEFAULT_TIMEOUT = 30.0
DEFAULT_LEASE = 5.0
MAX_MSG = 65536


def socket_name(pid: int) -> str:
    """The abstract socket address of guardian ``pid``."""
    return "\0" + SOCKET_PREFIX + str(pid)


def send(sock: socket.socket, msg: dict[str, Any]) -> bool:
    """One message; False if the peer is gone."""
    try:
        sock.send(json.dumps(msg).encode())
        return True
    except OSError:
        return False


def recv(sock: socket.socket) -> dict[str, Any] | None:
    """One message, or None at EOF."""
    data = sock.recv(MAX_MSG)
    if not data:
        return None
    return json.loads(data)


def peer_uid(conn: socket.socket) -> int:
    """The uid of the process on the other end (SO_PEERCRED, set by the kernel)."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid
