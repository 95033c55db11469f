"""The guardian's wire format and where its sockets live.

One JSON object per SOCK_SEQPACKET message (the kernel keeps message boundaries, so
there is no framing to get wrong). Every message is checked against its schema before
any field is read: a request that does not fit is answered with an error, a reply that
does not fit is not believed.

Sockets live in a directory only root can enter (/run/quiesce, root-owned, 0700): no
other user can connect to a guardian, put a socket where clients look, or squat on a
guardian's name. Abstract names would not do: anyone may bind any free abstract name.
The directory is opened one component at a time with O_NOFOLLOW and refused unless it
and every parent belong to root; sockets are then bound and reached through that open
fd (/proc/self/fd/N/NAME), so a path swapped after the check changes nothing. Clients
also check the server's SO_PEERCRED: uid 0 and the pid the socket's name claims.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import socket
import stat
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from quiesce.errors import GuardianError, PermissionDenied, UsageError

DEFAULT_TIMEOUT = 30.0
DEFAULT_LEASE = 5.0
MAX_SECONDS = 86400.0  # a day: no sane freeze is longer, and ns stay in range
MAX_MSG = 65536
RUN_DIR = "/run/quiesce"
RUN_DIR_ENV = "QUIESCE_RUN_DIR"  # another root-only directory (tests); checked the same way
SOCKET_PREFIX = "guardian-"
SOCKET_SUFFIX = ".sock"
FAULT_ENV = "QUIESCE_FAULT"  # "guardian:raise": the guardian raises on its next request
_NAME = re.compile(r"guardian-([1-9][0-9]{0,9})\.sock")

# The volume states a guardian reports (core.VolState's values).
STATES = frozenset({"idle", "freezing", "frozen", "thawing", "thawed", "foreign", "failed", "lost"})


class ProtocolError(ValueError):
    """A message that does not fit its schema."""


# -- durations -------------------------------------------------------------------------------


def check_seconds(name: str, value: float, *, zero_ok: bool = False) -> float:
    """A finite, positive (or zero, for a lease) number of seconds up to a day."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    low = 0.0 if zero_ok else 0.1
    if not ok or not low <= value <= MAX_SECONDS:
        raise UsageError(
            f"{name} must be a number of seconds from {low:g} to {MAX_SECONDS:g}, not {value!r}",
            "a freeze stalls every writer: give the shortest deadline that fits the snapshot",
        )
    return float(value)


# -- the socket directory ----------------------------------------------------------------------


def run_dir_path() -> str:
    path = os.environ.get(RUN_DIR_ENV) or RUN_DIR
    if not os.path.isabs(path):
        raise UsageError(f"{RUN_DIR_ENV}={path!r} is not an absolute path", f"unset {RUN_DIR_ENV}")
    return os.path.normpath(path)


def _unsafe(path: str, why: str) -> GuardianError:
    return GuardianError(
        f"refusing the guardian socket directory {path}: {why}",
        "it must be a directory owned by root with mode 0700, under root-owned parents; "
        "remove it (quiesce recreates it) or fix its owner and mode",
    )


def open_run_dir(*, create: bool, path: str | None = None) -> int | None:
    """An fd of the verified socket directory (or of ``path``, checked the same way); None
    if it does not exist and ``create`` is false (then no guardian runs). Raises
    PermissionDenied for non-root callers and GuardianError if the directory or a parent
    could be controlled by another user."""
    path = path or run_dir_path()
    parts = [p for p in path.split("/") if p]
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open("/", flags)
    try:
        walked = ""
        for i, part in enumerate(parts):
            walked += "/" + part
            last = i == len(parts) - 1
            try:
                nxt = os.open(part, flags, dir_fd=fd)
            except FileNotFoundError:
                if not (last and create):
                    if last:
                        return None
                    raise _unsafe(path, f"{walked} does not exist") from None
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o700, dir_fd=fd)
                nxt = os.open(part, flags, dir_fd=fd)
            except PermissionError:
                raise PermissionDenied(
                    f"cannot reach the guardians in {path}: permission denied",
                    "only root can ask quiesce's guardians; run as root",
                ) from None
            except OSError as e:  # ELOOP/ENOTDIR: a symlink or a file where a directory belongs
                os.close(fd)
                fd = -1
                raise _unsafe(path, f"{walked}: {e.strerror}") from None
            os.close(fd)
            fd = nxt
            st = os.fstat(fd)
            if st.st_uid != 0:
                raise _unsafe(path, f"{walked} is owned by uid {st.st_uid}, not root")
            if last and st.st_mode & 0o077:
                raise _unsafe(path, f"mode {stat.S_IMODE(st.st_mode):04o}, not 0700")
            if not last and st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
                raise _unsafe(path, f"{walked} is writable by others")
        if os.geteuid() != 0:
            raise PermissionDenied(
                f"cannot reach the guardians in {path}: not root",
                "only root can ask quiesce's guardians; run as root",
            )
        done, fd = fd, -1
        return done
    finally:
        if fd >= 0:
            os.close(fd)


def socket_file(pid: int) -> str:
    return f"{SOCKET_PREFIX}{pid}{SOCKET_SUFFIX}"


def socket_address(dir_fd: int, pid: int) -> str:
    """The path to bind or connect, through the verified directory's fd."""
    return f"/proc/self/fd/{dir_fd}/{socket_file(pid)}"


def socket_path(pid: int) -> str:
    """Where guardian ``pid``'s socket is, for messages and tests."""
    return os.path.join(run_dir_path(), socket_file(pid))


def pid_of(name: str) -> int | None:
    m = _NAME.fullmatch(name)
    return int(m.group(1)) if m else None


# -- framing -----------------------------------------------------------------------------------


def encode(msg: dict[str, Any]) -> bytes:
    return json.dumps(msg, allow_nan=False).encode()


def decode(data: bytes) -> dict[str, Any]:
    """A JSON object, or ProtocolError (bad UTF-8, bad JSON, nesting too deep, not an object)."""
    try:
        msg = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise ProtocolError(f"not JSON ({type(e).__name__})") from None
    if not isinstance(msg, dict):
        raise ProtocolError(f"not a JSON object but {type(msg).__name__}")
    return msg


def send(
    sock: socket.socket, msg: dict[str, Any], *, wait: bool = True, fds: Sequence[int] = ()
) -> bool:
    """One message (with ``fds``, SCM_RIGHTS); False if the peer is gone (or, with
    ``wait=False``, not reading)."""
    try:
        if fds:
            socket.send_fds(sock, [encode(msg)], list(fds), 0 if wait else socket.MSG_DONTWAIT)
            return True
        sock.send(encode(msg), 0 if wait else socket.MSG_DONTWAIT)
        return True
    except (OSError, ValueError):
        return False


def recv(sock: socket.socket) -> dict[str, Any] | None:
    """One message, or None at EOF. Raises OSError or ProtocolError."""
    data = sock.recv(MAX_MSG)
    if not data:
        return None
    return decode(data)


def peer_creds(conn: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process on the other end, as the kernel recorded them."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return pid, uid, gid


def peer_uid(conn: socket.socket) -> int:
    return peer_creds(conn)[1]


# -- requests ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """A checked request: only these fields, with these types, reach the guardian."""

    op: str
    id: int | str | None = None
    vol: int | None = None
    devs: tuple[str, ...] = ()
    vols: tuple[int, ...] = ()  # freeze_wave: volumes with no order between them
    expedite: str = ""  # freeze_wave: "", "set", "restore" or "set-restore"
    gate: bool = False  # freeze_wave: the message carries a gate fd (SCM_RIGHTS) to release


# op -> the fields it takes besides "id" and "op"
CONTROLLER_OPS: dict[str, frozenset[str]] = {
    "freeze": frozenset({"vol"}),
    "thaw": frozenset({"vol"}),
    # volumes frozen concurrently; "expedite" (optional) brackets the group's freezes;
    # "gate" (optional, true): the message carries one fd (SCM_RIGHTS), the write end of
    # a command's gate: one byte is written to it the moment every volume of the group is
    # frozen (never before), then it is closed
    "freeze_wave": frozenset({"vols", "expedite", "gate"}),
    "thaw_wave": frozenset({"vols"}),
    "detach": frozenset(),
    "done": frozenset(),
    "status": frozenset(),
    "renew": frozenset(),
}
CLIENT_OPS: dict[str, frozenset[str]] = {
    "status": frozenset(),
    "thaw": frozenset({"devs"}),
    "forget": frozenset({"devs"}),  # a newer freeze of these volumes began: drop their history
}
_MAX_DEVS = 256
EXPEDITE_VALUES = frozenset({"", "set", "restore", "set-restore"})


def request_id(msg: dict[str, Any]) -> int | str | None:
    rid = msg.get("id")
    if rid is None or (isinstance(rid, str) and len(rid) <= 64):
        return rid
    if isinstance(rid, int) and not isinstance(rid, bool) and abs(rid) < 2**53:
        return rid
    raise ProtocolError("id must be an integer, a short string or null")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_request(data: bytes, ops: dict[str, frozenset[str]]) -> Request:
    """Decode and check one request; ProtocolError says what does not fit (and carries
    the request's id in ``.id`` when that much was valid)."""
    msg = decode(data)
    rid = request_id(msg)
    try:
        op = msg.get("op")
        if not isinstance(op, str) or op not in ops:
            shown = op if isinstance(op, str) and len(op) <= 32 else type(op).__name__
            raise ProtocolError(f"unknown op {shown!r}")
        extra = set(msg) - {"id", "op"} - ops[op]
        if extra:
            raise ProtocolError(f"unexpected field(s) for {op}: {', '.join(sorted(extra)[:5])}")
        vol, devs = None, ()
        if "vol" in ops[op]:
            vol = msg.get("vol")
            if not isinstance(vol, int) or isinstance(vol, bool) or not 0 <= vol < 4096:
                raise ProtocolError("vol must be a volume index")
        if "devs" in ops[op]:
            raw = msg.get("devs")
            if (
                not isinstance(raw, list)
                or not 0 < len(raw) <= _MAX_DEVS
                or not all(isinstance(d, str) and 0 < len(d) <= 32 for d in raw)
            ):
                raise ProtocolError("devs must be a list of device numbers (major:minor)")
            devs = tuple(raw)
        vols: tuple[int, ...] = ()
        if "vols" in ops[op]:
            raw = msg.get("vols")
            if (
                not isinstance(raw, list)
                or not 0 < len(raw) <= 4096
                or not all(_is_int(v) and 0 <= v < 4096 for v in raw)
                or len(set(raw)) != len(raw)
            ):
                raise ProtocolError("vols must be a list of distinct volume indices")
            vols = tuple(raw)
        expedite = msg.get("expedite", "") if "expedite" in ops[op] else ""
        if not isinstance(expedite, str) or expedite not in EXPEDITE_VALUES:
            raise ProtocolError("expedite must be one of set, restore, set-restore")
        gate = msg.get("gate", False) if "gate" in ops[op] else False
        if not isinstance(gate, bool):
            raise ProtocolError("gate must be true or false")
    except ProtocolError as e:
        e.id = rid  # type: ignore[attr-defined]
        raise
    return Request(op=op, id=rid, vol=vol, devs=devs, vols=vols, expedite=expedite, gate=gate)


def error_reply(e: ProtocolError) -> dict[str, Any]:
    return {"id": getattr(e, "id", None), "ok": False, "error": f"bad request: {e}"}


# -- replies (checked by the clients) ----------------------------------------------------------


def _num_or_none(v: Any) -> bool:
    return v is None or (isinstance(v, int | float) and not isinstance(v, bool))


def check_status(reply: dict[str, Any], pid: int) -> dict[str, Any]:
    """A status reply that a client may act on: the fields it reads, with their types."""
    fields = {
        "pid": _is_int,
        "controller_pid": _is_int,
        "controller_alive": lambda v: isinstance(v, bool),
        "detached": lambda v: isinstance(v, bool),
        "finished": lambda v: isinstance(v, bool),
        "deadline_remaining_s": _num_or_none,
        "lease_remaining_s": _num_or_none,
        "timeout_s": _num_or_none,
        "volumes": lambda v: isinstance(v, list),
        "expired": lambda v: v is None or isinstance(v, dict),
    }
    for key, ok in fields.items():
        if key not in reply or not ok(reply[key]):
            raise ProtocolError(f"status without a valid {key!r}")
    if reply["pid"] != pid:
        raise ProtocolError(f"status of pid {reply['pid']}, not {pid}")
    for v in reply["volumes"]:
        if not (
            isinstance(v, dict)
            and all(isinstance(v.get(k), str) for k in ("mount_point", "dev", "fstype"))
            and v.get("state") in STATES
            and _num_or_none(v.get("frozen_for_s"))
            and isinstance(v.get("superseded", False), bool)
        ):
            raise ProtocolError("status with a malformed volume")
    ex = reply["expired"]
    if ex is not None and not (
        isinstance(ex.get("reason"), str)
        and _num_or_none(ex.get("at"))
        and isinstance(ex.get("thawed", []), list)
    ):
        raise ProtocolError("status with a malformed expiry")
    return reply


def check_thaw(reply: dict[str, Any]) -> dict[str, Any]:
    """A thaw reply: ok, and either an errno, an expiry or an error."""
    if not isinstance(reply.get("ok"), bool):
        raise ProtocolError("thaw reply without ok")
    if "errno" in reply and not _is_int(reply["errno"]):
        raise ProtocolError("thaw reply with a bad errno")
    ex = reply.get("expired")
    if ex is not None and not (isinstance(ex, dict) and isinstance(ex.get("reason"), str)):
        raise ProtocolError("thaw reply with a malformed expiry")
    if "checking" in reply and not isinstance(reply["checking"], bool):
        raise ProtocolError("thaw reply with a bad checking flag")
    return reply
