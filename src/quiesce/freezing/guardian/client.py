"""Finding and asking *other* guardians: `quiesce status`, `quiesce thaw`, EBUSY stories.

Only sockets in the root-only directory are considered (see protocol.py), and only a
server that is root and the pid its socket's name claims is believed. Guardians are
asked all at once with one short deadline: a stopped or stuck one costs at most
``ANSWER_S`` however many there are.
"""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import socket
import stat
import time
from dataclasses import dataclass, field
from typing import Any, Literal, NotRequired, TypedDict

from quiesce.errors import GuardianError
from quiesce.freezing.guardian.protocol import (
    ProtocolError,
    check_status,
    check_thaw,
    decode,
    encode,
    open_run_dir,
    peer_creds,
    pid_of,
    socket_address,
    socket_path,
)
from quiesce.host.pids import pid_alive

VolumeState = Literal[
    "idle", "freezing", "frozen", "thawing", "thawed", "foreign", "failed", "lost"
]


class VolumeStatus(TypedDict):
    """One volume of a guardian's status reply, as ``quiesce status`` renders it.

    ``state`` is what the kernel says (checked by the guardian's ownership probes):
    ``freezing`` = its FIFREEZE has not returned (``freezing_for_s``: since the call, or
    ``freezing_since``: its wall time); ``frozen`` = ours and still frozen; ``lost`` =
    someone else thawed (and maybe refroze) it (``lost``: why): never thawed by quiesce
    again. ``blockers`` is added by the client, not
    the guardian: the processes that keep a pending FIFREEZE waiting
    (:func:`quiesce.host.blockers.find_blockers`, ``Blocker.to_dict()``)."""

    mount_point: str
    dev: str
    fstype: str
    state: VolumeState
    superseded: NotRequired[bool]
    frozen_since: NotRequired[float | None]  # wall time the FIFREEZE returned
    frozen_for_s: float | None
    freezing_for_s: NotRequired[float | None]  # since the FIFREEZE was called
    freezing_since: NotRequired[float | None]  # or: wall time it was called
    lost: NotRequired[str | None]  # why it is lost (who thawed it, when it was seen)
    blockers: NotRequired[list[dict[str, Any]]]


class GuardianStatus(TypedDict):
    """A guardian's status reply (``op: status``), the fields ``quiesce status`` reads.
    ``gone``: the guardian process has died (answered by its second line, which still
    holds what it froze); ``gone_reason``: how (``killed``: a signal, SIGKILL or the OOM
    killer; ``exited``)."""

    pid: int
    controller_pid: int
    controller_alive: bool
    detached: bool
    finished: bool
    deadline_remaining_s: float | None
    lease_remaining_s: float | None
    timeout_s: float | None
    volumes: list[VolumeStatus]
    expired: dict[str, Any] | None
    gone: NotRequired[bool]
    gone_reason: NotRequired[str]


ANSWER_S = 1.0  # what a silent socket may cost a status or a thaw, at most
THAW_S = 2.0  # a guardian that just answered `status` gets this long to thaw


@dataclass
class Survey:
    """What the guardians said: active ones, finished ones (history), silent ones."""

    active: list[dict[str, Any]] = field(default_factory=list)
    finished: list[dict[str, Any]] = field(default_factory=list)
    silent: dict[int, str] = field(default_factory=dict)  # pid -> why no trusted answer


def list_guardians() -> list[int]:
    """Pids of the guardians with a socket in the root-only directory (dead ones' stale
    files excluded). Empty if the directory does not exist; PermissionDenied if not root."""
    dir_fd = open_run_dir(create=False)
    if dir_fd is None:
        return []
    try:
        pids = []
        for name in os.listdir(dir_fd):
            pid = pid_of(name)
            if pid is None or not pid_alive(pid):
                continue
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                    pids.append(pid)
        return sorted(pids)
    finally:
        os.close(dir_fd)


def gone_guardians() -> list[int]:
    """Pids of guardians whose socket is still in the root-only directory but whose
    process is gone (SIGKILL, the OOM killer): what they froze may still be frozen."""
    dir_fd = open_run_dir(create=False)
    if dir_fd is None:
        return []
    try:
        pids = []
        for name in os.listdir(dir_fd):
            pid = pid_of(name)
            if pid is None or pid_alive(pid):
                continue
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                    pids.append(pid)
        return sorted(pids)
    finally:
        os.close(dir_fd)


def _connect(dir_fd: int, pid: int) -> socket.socket:
    """A connected, verified socket to guardian ``pid`` (non-blocking)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        s.setblocking(False)
        s.connect(socket_address(dir_fd, pid))
        ppid, uid, _ = peer_creds(s)
        if uid != 0 or ppid != pid:
            raise GuardianError(
                f"{socket_path(pid)} is served by pid {ppid} uid {uid}, not by root's "
                f"guardian {pid}: not believed"
            )
        return s
    except BaseException:
        s.close()
        raise


def _exchange(
    pids: list[int], msg: dict[str, Any], timeout: float
) -> tuple[dict[int, dict[str, Any]], dict[int, str]]:
    """Send ``msg`` to every guardian at once; collect replies until ``timeout``."""
    replies: dict[int, dict[str, Any]] = {}
    silent: dict[int, str] = {}
    if not pids:
        return replies, silent
    dir_fd = open_run_dir(create=False)
    if dir_fd is None:
        return replies, {p: "its socket is gone" for p in pids}
    sel = selectors.DefaultSelector()
    socks: dict[int, socket.socket] = {}
    try:
        data = encode({"id": 1, **msg})
        for pid in pids:
            try:
                s = _connect(dir_fd, pid)
                s.send(data)
            except BlockingIOError:
                silent[pid] = "its socket is not accepting connections"
                continue
            except GuardianError as e:
                silent[pid] = e.message
                continue
            except OSError as e:
                if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
                    continue  # a dead guardian's socket (names appear only once listening)
                silent[pid] = f"cannot connect: {e.strerror}"
                continue
            socks[pid] = s
            sel.register(s, selectors.EVENT_READ, pid)
        end = time.monotonic() + timeout
        while socks and (left := end - time.monotonic()) > 0:
            for key, _ in sel.select(left):
                pid = key.data
                s = socks.pop(pid)
                sel.unregister(s)
                try:
                    raw = s.recv(65536)
                    if not raw:
                        silent[pid] = "it closed the connection"
                    else:
                        replies[pid] = decode(raw)
                except (OSError, ProtocolError) as e:
                    silent[pid] = f"unusable answer: {e}"
                s.close()
        for pid, s in socks.items():
            silent[pid] = f"no answer within {timeout:g}s"
            s.close()
    finally:
        sel.close()
        os.close(dir_fd)
    return replies, silent


def survey(*, exclude: int | None = None, timeout: float = ANSWER_S) -> Survey:
    """Ask every guardian for its status at once."""
    pids = [p for p in list_guardians() if p not in (exclude, os.getpid())]
    replies, silent = _exchange(pids, {"op": "status"}, timeout)
    out = Survey(silent=silent)
    for pid, reply in sorted(replies.items()):
        try:
            st = check_status(reply, pid)
        except ProtocolError as e:
            out.silent[pid] = f"unusable answer: {e}"
            continue
        (out.finished if st["finished"] else out.active).append(st)
    return out


def holder_of(dev: str, *, exclude: int | None = None) -> dict[str, Any] | None:
    """The status of another guardian on duty holding the volume ``dev`` frozen, if any:
    an EBUSY that is a second quiesce run, not a stranger's freeze."""
    for st in survey(exclude=exclude).active:
        if any(v["dev"] == dev and v["state"] == "frozen" for v in st["volumes"]):
            return st
    return None


def supersede(devs: list[str], *, exclude: int) -> None:
    """A new freeze of ``devs`` begins: finished guardians drop their story about them
    (best effort, bounded: a missed one only makes a later `quiesce thaw` message older)."""
    with contextlib.suppress(GuardianError, OSError):
        pids = [p for p in list_guardians() if p != exclude]
        if pids and devs:
            _exchange(pids, {"op": "forget", "devs": devs}, ANSWER_S / 2)


def thaw(pid: int, devs: list[str], timeout: float = THAW_S) -> dict[str, Any]:
    """Ask guardian ``pid`` to thaw ``devs``. While it is still checking that a freeze is
    its own (a probe, or the kernel's trace after someone else's FITHAW on the machine:
    milliseconds), it answers ``checking`` and thaws nothing; ask again until ``timeout``.
    The last answer is returned (``checking`` still set if the check outlasted it)."""
    end = time.monotonic() + timeout
    while True:
        reply = ask(pid, {"op": "thaw", "devs": devs}, timeout=max(0.1, end - time.monotonic()))
        if not reply.get("checking") or time.monotonic() >= end:
            return reply
        time.sleep(0.005)  # a retry's pace, not a synchronisation: the guardian decides


def ask(pid: int, msg: dict[str, Any], timeout: float = ANSWER_S) -> dict[str, Any]:
    """One request to guardian ``pid``; its reply checked against the request's schema.
    GuardianError if no trustworthy answer came within ``timeout``."""
    replies, silent = _exchange([pid], msg, timeout)
    if pid not in replies:
        why = silent.get(pid, "it has exited")
        raise GuardianError(f"guardian {pid} did not answer: {why}", "it may have just exited")
    reply = replies[pid]
    try:
        if msg.get("op") == "status":
            return check_status(reply, pid)
        if msg.get("op") == "thaw":
            return check_thaw(reply)
    except ProtocolError as e:
        raise GuardianError(f"guardian {pid} gave an unusable answer: {e}") from None
    return reply
