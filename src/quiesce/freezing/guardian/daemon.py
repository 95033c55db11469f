"""The guardian: a watchdog process that guarantees every freeze ends.

The kernel never got the freeze timeout proposed in 2008, so quiesce builds it in user
space. Before the first FIFREEZE the controller forks a guardian (fully imported, so it
never reads or writes a frozen filesystem), detached from the controller's session and
deaf to SIGINT/SIGTERM/SIGHUP. **The guardian performs every FIFREEZE and FITHAW**, on
the controller's request: it then knows exactly what "we" froze, even if the controller
dies in the middle of an ioctl. It thaws, in safe reverse order, everything it froze when

* the deadline passes (counted from the first freeze),
* the lease is not renewed in time (a stopped or stuck controller),
* the controller dies (socket EOF or pidfd), including SIGKILL, or
* anything goes wrong inside the guardian itself (an exception anywhere: the last line
  of defence in :func:`serve`).

It keeps what it has to say in memory, answers ``status``, ``thaw`` and ``forget`` over
a unix socket in a root-only directory (see protocol.py; root peers only, every request
checked before use), and writes one line to the kernel log (/dev/kmsg) and to syslog
(/dev/log, which reaches the journal even where a unit hides /dev/kmsg) when it had to
thaw on its own.

Threads: the main thread runs the event loop and the emergency thaw; the requested
ioctls run on a crew (crew.py) of one thread per volume, started with the guardian and
parked until needed, so that a FIFREEZE stuck in the kernel (a writer in the middle of a
huge write, an unknown stacking dependency) cannot stop the deadline nor the thaw of the
others. A *wave* (volumes with no order between them: none stores another's loop image)
wakes its volumes' threads together; each puts its result into the volume's state as its
ioctl returns, and the last one answers the controller (no hop through the main thread
inside the window). While a group freezes RCU grace periods are expedited (expedite.py):
restored when the last FIFREEZE returns, on expiry, on any error and at exit.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import queue
import selectors
import signal
import socket
import stat
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from quiesce.freezing.guardian.crew import Crew
from quiesce.freezing.guardian.expedite import Expedite
from quiesce.freezing.guardian.protocol import (
    CLIENT_OPS,
    CONTROLLER_OPS,
    FAULT_ENV,
    MAX_MSG,
    ProtocolError,
    Request,
    error_reply,
    parse_request,
    peer_uid,
    pid_of,
    send,
    socket_address,
    socket_file,
)
from quiesce.sys import kernel

LINGER_AFTER_EXPIRY = 600.0  # a finished guardian keeps its story for `status`/`thaw`
MAX_CLIENTS = 32  # beyond this, the oldest client connection is dropped
SYSLOG_SOCKET = "/dev/log"
SYSLOG_TEST_ENV = "QUIESCE_TEST_SYSLOG"  # honoured only under pytest (PYTEST_CURRENT_TEST)
_SYSLOG_PRI = 3 * 8 + 4  # LOG_DAEMON | LOG_WARNING


def _now() -> int:
    return time.monotonic_ns()


@dataclass
class GuardedVolume:
    """What the guardian needs to freeze and thaw one volume."""

    fd: int
    name: str  # mount point, for messages
    fstype: str
    dev: str
    inners: frozenset[int] = frozenset()  # indices that must thaw after this one


@dataclass
class _VolState:
    spec: GuardedVolume
    state: str = "idle"  # idle freezing frozen thawing thawed foreign failed
    frozen_at: int | None = None
    frozen_wall: float | None = None
    deferred_thaw: bool = False  # expiry came while an ioctl was in flight
    superseded: bool = False  # a newer freeze of this volume began: our story is old


@dataclass
class _Job:
    op: str  # "freeze" | "thaw" | "freeze_wave" | "thaw_wave"
    idx: int  # the volume (a wave: its first)
    reply: Any  # socket to answer on
    req_id: Any
    result: dict[str, Any] = field(default_factory=dict)
    idxs: tuple[int, ...] = ()  # a wave's volumes
    expedite: str = ""  # a freeze wave: "set", "restore", "set-restore" or ""
    applied: bool = False  # its result is in the volume's state
    answered: bool = False  # its last thread answered the controller itself
    subs: list[_Job] = field(default_factory=list)  # one per volume (a single op: one)
    left: int = 0  # volumes whose ioctl has not returned yet
    late: bool = False  # a volume's ioctl that returned after the expiry
    chain: bool = False  # its volumes one after another, in order (a client's thaw)


class _InjectedFault(RuntimeError):
    """QUIESCE_FAULT=guardian:raise: proves the last line of defence in tests."""


def _kmsg(line: str) -> None:
    """Best effort: one line in the kernel log, where an admin looks after a stall."""
    try:
        fd = os.open("/dev/kmsg", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            os.write(fd, f"<4>quiesce-guardian[{os.getpid()}]: {line}\n".encode())
        finally:
            os.close(fd)
    except OSError:
        pass


def _syslog_target() -> str:
    """/dev/log, or a test's own socket: a root-owned socket, and only under pytest."""
    path = os.environ.get(SYSLOG_TEST_ENV)
    if path and os.environ.get("PYTEST_CURRENT_TEST"):
        with contextlib.suppress(OSError):
            st = os.lstat(path)
            if stat.S_ISSOCK(st.st_mode) and st.st_uid == 0:
                return path
    return SYSLOG_SOCKET


class _Syslog:
    """One datagram per line to the syslog socket (journald or a syslog daemon).

    The socket is made at start-up (no fd may be missing at the moment that matters), and
    sends never wait: a syslog daemon stuck on a frozen /var/log must not stall us.
    """

    def __init__(self) -> None:
        self.target = _syslog_target()
        try:
            self.sock: socket.socket | None = socket.socket(
                socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
            )
        except OSError:
            self.sock = None

    def write(self, line: str) -> None:
        if self.sock is None:
            return
        msg = f"<{_SYSLOG_PRI}>quiesce-guardian[{os.getpid()}]: {line}"
        with contextlib.suppress(OSError):
            self.sock.sendto(msg.encode(), socket.MSG_DONTWAIT, self.target)


class _Guardian:
    """Runs in the forked child. Never returns: the caller ``os._exit``s."""

    def __init__(
        self,
        ctl: socket.socket,
        vols: Sequence[GuardedVolume],
        timeout: float,
        lease: float,
        controller_pid: int,
        dir_fd: int,
    ) -> None:
        self.ctl: socket.socket | None = ctl
        # The worker answers waves on its own copy: the main thread may close self.ctl
        # (controller gone) at any moment, and its fd number be reused.
        self.ctl_at_start = ctl
        self.ctl_w = ctl.dup()
        self.vols = [_VolState(v) for v in vols]
        self.timeout_ns = int(timeout * 1e9)
        self.lease_ns = int(lease * 1e9) if lease > 0 else 0
        self.controller_pid = controller_pid
        self.started = _now()
        self.started_wall = time.time()
        self.deadline: int | None = None
        self.lease_until = self.started + self.lease_ns if self.lease_ns else None
        self.detached = False
        self.controller_gone = False
        self.done = False
        self.expired: dict[str, Any] | None = None
        self.linger_until: int | None = None
        self.events: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.finished: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self.busy: set[int] = set()  # indices of the in-flight ioctls
        self.running: dict[int, _Job] = {}  # volume -> its ioctl, until applied
        self.dispatched: int | None = None  # first freeze handed out (deadline not yet set)
        self.rcu = Expedite(os.getpid())
        self.pending = 0
        self.crash: str | None = None  # an ioctl thread's exception, for the main thread
        self.retry_at: int | None = None  # next FITHAW retry of a volume whose thaw failed
        self.retry_delay = 1.0
        faults = os.environ.get(FAULT_ENV, "").split(",")
        self.fault = "guardian:raise" in faults
        self.fault_worker = "guardian:worker-raise" in faults
        self.syslog = _Syslog()
        self.clients: dict[socket.socket, int] = {}  # connection -> accepted at
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.sel = selectors.DefaultSelector()
        self.dir_fd = dir_fd
        _sweep_stale(dir_fd)
        # Bound and listening under a temporary name, then renamed into place: a client
        # that finds the real name and gets ECONNREFUSED knows the socket is stale.
        name = socket_file(os.getpid())
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name + ".new", dir_fd=dir_fd)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.bind(socket_address(dir_fd, os.getpid()) + ".new")
        self.listener.listen(8)
        self.listener.setblocking(False)
        os.rename(name + ".new", name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)

    # -- bookkeeping -------------------------------------------------------------------
    def _event(self, what: str, **kw: Any) -> None:
        self.events.append({"t": time.time(), "event": what, **kw})
        del self.events[:-200]

    def _record(self, line: str) -> None:
        """The one line an admin must be able to find: kernel log and syslog."""
        _kmsg(line)
        self.syslog.write(line)

    def _frozen_count(self) -> int:
        return sum(1 for v in self.vols if v.state in ("frozen", "freezing", "thawing"))

    # -- the ioctl threads -------------------------------------------------------------
    def _crashed(self, i: int, exc: BaseException) -> None:
        """A crew thread raised: keep what its ioctl did, tell the main thread (it thaws
        and leaves: the last line of defence)."""
        with contextlib.suppress(BaseException), self.lock:
            sub = self.running.pop(i, None)
            if sub is not None:
                self._apply(sub)  # a FIFREEZE that returned 0 is ours to thaw
            self.busy.discard(i)  # its thread is out of the kernel
        self.crash = f"ioctl thread {i}: {type(exc).__name__}: {exc}"
        with contextlib.suppress(OSError):
            os.write(self.wake_w, b"x")

    def _dispatch(self, job: _Job) -> None:
        """Hand each volume of ``job`` to its parked thread. A freeze wave that sets
        expedited grace periods does that on its first volume's thread first (the main
        thread never waits on the holders' lock)."""
        if job.expedite in ("set", "set-restore"):
            self.crew.submit(job.idxs[0], lambda: self._expedite_then_run(job))
        elif job.chain:
            sub = job.subs[0]
            self.crew.submit(sub.idx, functools.partial(self._run_sub, job, sub))
        else:
            for sub in job.subs:
                self.crew.submit(sub.idx, functools.partial(self._run_sub, job, sub))

    def _expedite_then_run(self, job: _Job) -> None:
        if self.expired is None:
            self.rcu.acquire()
        for sub in job.subs[1:]:
            self.crew.submit(sub.idx, functools.partial(self._run_sub, job, sub))
        self._run_sub(job, job.subs[0])

    def _run_sub(self, job: _Job, sub: _Job) -> None:
        """One volume's ioctl, on its thread. Its result goes into the volume's state at
        once (an expiry thaws it from there, whatever its wave-mates do); the main thread
        hears of it only if it returned after an expiry. The last of a wave answers."""
        self.running[sub.idx] = sub
        self._ioctl(sub)
        if self.fault_worker and sub.op == "freeze":
            raise _InjectedFault("injected by QUIESCE_FAULT=guardian:worker-raise")
        with self.lock:
            self.running.pop(sub.idx, None)
            self._apply(sub)
            sub.late = self.expired is not None and "errno" in sub.result
            job.left -= 1
            last = job.left == 0
            nxt = job.subs[len(job.subs) - job.left] if job.chain and not last else None
        if sub.late:
            self.finished.put(sub)
            os.write(self.wake_w, b"x")
        if nxt is not None:
            self.crew.submit(nxt.idx, functools.partial(self._run_sub, job, nxt))
        if last:
            self._finish(job)

    def _ioctl(self, job: _Job) -> None:
        """One FIFREEZE or FITHAW; its result is in ``job.result``."""
        v = self.vols[job.idx]
        with self.lock:
            refused = self.expired is not None
            if not refused:
                self.busy.add(job.idx)
                v.state = "freezing" if job.op == "freeze" else "thawing"
        if refused:
            job.result = {"ok": False, "expired": self.expired}
            return
        t0 = _now()
        if job.op == "freeze":
            code = kernel.freeze_errno(v.spec.fd)
        else:
            code = kernel.thaw_errno(v.spec.fd)
        job.result = {"ok": code == 0, "errno": code, "start": t0, "end": _now()}

    def _finish(self, job: _Job) -> None:
        """The last volume's thread: restore grace periods after a group's last FIFREEZE
        (or a failed one), answer the controller itself (no hop through the main thread
        inside the window), then let the main thread do its bookkeeping."""
        subs = job.subs
        wave = job.op in ("freeze_wave", "thaw_wave")
        ok = all(s.result.get("ok") for s in subs)
        with self.lock:
            if wave:
                job.result = {
                    "ok": ok,
                    "results": {str(s.idx): s.result for s in subs},
                    "expedite": self.rcu.state,
                    "expedite_reason": self.rcu.reason,
                }
            else:  # a single op, or a client's thaw: its last volume's (as always)
                job.result = dict(subs[-1].result)
            if self.expired is not None:
                job.result["ok"] = False
                job.result["expired"] = self.expired
        if job.op == "freeze_wave" and (job.expedite in ("restore", "set-restore") or not ok):
            self.rcu.release()  # before the answer: nothing may be left set once it is out
        if wave and job.reply is not None and job.reply is self.ctl_at_start:
            job.answered = send(self.ctl_w, {"id": job.req_id, **job.result}, wait=False)
        self.finished.put(job)
        os.write(self.wake_w, b"x")

    def _apply(self, job: _Job) -> None:
        """Apply a finished ioctl to the state (call under the lock; once per job)."""
        if job.applied or "errno" not in job.result:
            return
        job.applied = True
        v = self.vols[job.idx]
        res = job.result
        self.busy.discard(job.idx)
        code = res["errno"]
        if job.op == "freeze":
            if code == 0:
                v.state, v.frozen_at, v.frozen_wall = "frozen", res["end"], time.time()
                if self.deadline is None:
                    self.deadline = res["start"] + self.timeout_ns
            elif code == errno.EBUSY:
                v.state = "foreign"  # someone else's freeze: never ours to thaw
            else:
                v.state = "failed"
        else:
            if code in (0, errno.EINVAL):
                v.state = "thawed"
                self._release(v)
            else:
                v.state = "frozen"  # still ours; emergency thaw will retry
        self._event(job.op, volume=v.spec.name, errno=code)
        if self.expired is not None:
            job.result = res | {"ok": False, "expired": self.expired}

    def _complete(self, job: _Job) -> None:
        """Main thread: a finished request (answer it unless its last thread did), or an
        ioctl that returned after an expiry (thaw it, and the inner volumes that waited)."""
        if not job.late:
            with self.lock:
                self.pending -= 1
            if job.reply is not None and not job.answered:
                self._answer(job.reply, {"id": job.req_id, **job.result})
            return
        with self.lock:
            waiting = self._deferred()  # inners of ioctls still in flight wait on
            thaw_after = [
                i for i, w in enumerate(self.vols) if w.deferred_thaw and i not in waiting
            ]
            if self.vols[job.idx].state == "frozen":
                thaw_after.append(job.idx)
        if thaw_after:
            self._thaw_indices(sorted(set(thaw_after), reverse=True), self.expired or {})

    @staticmethod
    def _release(v: _VolState) -> None:
        """Close a thawed volume's fd: a lingering guardian must not keep it busy (umount)."""
        if v.spec.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(v.spec.fd)
            v.spec.fd = -1

    # -- the emergency thaw -------------------------------------------------------------
    def _thaw_indices(self, indices: Sequence[int], why: dict[str, Any]) -> None:
        for i in indices:
            v = self.vols[i]
            if v.state not in ("frozen", "thawing"):
                v.deferred_thaw = False
                continue
            code = kernel.thaw_errno(v.spec.fd)
            v.deferred_thaw = False
            v.state = "thawed" if code in (0, errno.EINVAL) else "frozen"
            if v.state == "thawed":
                self._release(v)
            held = (_now() - v.frozen_at) / 1e9 if v.frozen_at else 0.0
            entry = {
                "volume": v.spec.name,
                "dev": v.spec.dev,
                "errno": code,
                "held_s": round(held, 6),
                "end": _now(),
            }
            why.setdefault("thawed", []).append(entry)
            self._event("guardian-thaw", **entry)
            self._record(
                f"thawed {v.spec.name} ({why.get('reason')}) after {held:.3f}s frozen"
                + ("" if code in (0, errno.EINVAL) else f"; FITHAW failed: errno {code}")
            )

    def _deferred(self) -> set[int]:
        """Inner volumes of the volumes whose ioctl is in flight (call under the lock)."""
        return {i for b in self.busy for i in self.vols[b].spec.inners}

    def _expire(self, reason: str) -> None:
        self.rcu.release()  # whatever is in flight, stop costing the others now
        with self.lock:
            if self.expired is not None:
                return
            self.expired = {"reason": reason, "at": time.time(), "thawed": []}
            # Volumes that must stay frozen until the in-flight ioctls return: thawing a
            # loop-backed fs while its backing fs is still frozen blocks in the kernel.
            defer = self._deferred()
            now_ids = []
            for i in range(len(self.vols) - 1, -1, -1):
                if self.vols[i].state not in ("frozen", "thawing"):
                    continue
                if i in defer:
                    self.vols[i].deferred_thaw = True
                else:
                    now_ids.append(i)
        self._event("expired", reason=reason)
        self._thaw_indices(now_ids, self.expired)
        if self.ctl is not None:
            send(self.ctl, {"event": "expired", **self.expired}, wait=False)
        self.linger_until = _now() + int(LINGER_AFTER_EXPIRY * 1e9)

    def last_resort(self, exc: BaseException) -> None:
        """Something unexpected broke the guardian: thaw everything it froze, now.

        Kept to the bare minimum (no event loop, no replies but one to the controller)
        so that the bug that brought us here is unlikely to be met again."""
        reason = f"guardian-error ({type(exc).__name__})"
        with contextlib.suppress(BaseException):
            self.rcu.release()
        with contextlib.suppress(BaseException):
            self._record(f"internal error: {type(exc).__name__}: {exc}"[:400])
        try:
            if self.expired is None:
                self._expire(reason)
            else:
                defer = self._deferred()
                idx = [
                    i for i in range(len(self.vols) - 1, -1, -1)
                    if self.vols[i].state in ("frozen", "thawing") and i not in defer
                ]  # fmt: skip
                self._thaw_indices(idx, self.expired)
        except BaseException:
            # Even the bookkeeping failed: plain FITHAWs of what we know we froze.
            for v in reversed(self.vols):
                if v.state in ("frozen", "thawing") and v.spec.fd >= 0:
                    with contextlib.suppress(BaseException):
                        kernel.thaw_errno(v.spec.fd)
                        v.state = "thawed"
        # An ioctl still in flight decides the rest: wait for it while its thread lives
        # (the thread puts its result into the volume's state itself).
        crew = getattr(self, "crew", None)
        while crew is not None:
            with self.lock:
                waiting = [i for i in self.busy if crew.alive(i)]
            if not waiting:
                break
            time.sleep(0.05)
        # Nothing is in flight any more (or its thread is dead): whatever we know we
        # froze is thawed now, inner volumes included.
        for i in range(len(self.vols) - 1, -1, -1):
            v = self.vols[i]
            if v.state in ("frozen", "thawing"):
                with contextlib.suppress(BaseException):
                    self._thaw_indices([i], self.expired or {"reason": reason})

    # -- requests ----------------------------------------------------------------------
    def _answer(self, conn: socket.socket, msg: dict[str, Any]) -> None:
        """Never wait for a reader: a client that does not read loses its connection."""
        if conn is self.ctl:
            send(conn, msg, wait=False)
        elif conn in self.clients and not send(conn, msg, wait=False):
            self._drop(conn)

    def _drop(self, conn: socket.socket) -> None:
        if self.clients.pop(conn, None) is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(conn)
        conn.close()

    def _submit(
        self,
        op: str,
        idx: int,
        reply: Any,
        req_id: Any,
        idxs: Sequence[int] = (),
        expedite: str = "",
        chain: bool = False,
    ) -> None:
        bad = [i for i in (idxs or [idx]) if not 0 <= i < len(self.vols)]
        if bad:
            self._answer(reply, {"id": req_id, "ok": False, "error": f"no volume {bad[0]}"})
            return
        if self.expired is not None:
            self._answer(reply, {"id": req_id, "ok": False, "expired": self.expired})
            return
        job = _Job(op, idx, reply, req_id, idxs=tuple(idxs) or (idx,), expedite=expedite)
        job.chain = chain
        base = op.removesuffix("_wave")
        job.subs = [_Job(base, i, None, None) for i in job.idxs]
        job.left = len(job.subs)
        with self.lock:
            self.pending += 1
            if base == "freeze" and self.deadline is None and self.dispatched is None:
                self.dispatched = _now()
        self._dispatch(job)

    def _on_controller(self) -> None:
        assert self.ctl is not None
        try:
            data = self.ctl.recv(MAX_MSG)
        except OSError:
            data = b""
        if not data:
            self._controller_died("controller-died")
            return
        if self.lease_ns:  # any message is a sign of life
            self.lease_until = _now() + self.lease_ns
        try:
            req = parse_request(data, CONTROLLER_OPS)
        except ProtocolError as e:
            self._answer(self.ctl, error_reply(e))
            return
        if req.op in ("freeze", "thaw"):
            assert req.vol is not None
            self._submit(req.op, req.vol, self.ctl, req.id)
        elif req.op in ("freeze_wave", "thaw_wave"):
            self._submit(req.op, req.vols[0], self.ctl, req.id, req.vols, req.expedite)
        elif req.op == "detach":
            self.detached = True
            self.lease_until = None
            self._answer(self.ctl, {"id": req.id, "ok": True})
        elif req.op == "done":
            self.done = True
            self._answer(self.ctl, {"id": req.id, "ok": True})
        elif req.op == "status":
            self._answer(self.ctl, {"id": req.id, **self.status()})
        # "renew" needs no answer: receiving it renewed the lease

    def _controller_died(self, reason: str) -> None:
        if self.ctl is not None:
            self.sel.unregister(self.ctl)
            self.ctl.close()
            self.ctl = None
        self.controller_gone = True
        # A request may still be queued or in flight: expiring now makes the worker refuse
        # what is queued and thaw what completes.
        if not self.detached and (self._frozen_count() or self.pending):
            self._expire(reason)

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        try:
            root = peer_uid(conn) == 0
        except OSError:
            root = False
        if not root:
            conn.close()
            return
        if len(self.clients) >= MAX_CLIENTS:
            self._drop(min(self.clients, key=self.clients.__getitem__))
        self.clients[conn] = _now()
        self.sel.register(conn, selectors.EVENT_READ, "client")

    def _on_client(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(MAX_MSG, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(conn)
            return
        if self.fault:
            raise _InjectedFault("injected by QUIESCE_FAULT=guardian:raise")
        try:
            req = parse_request(data, CLIENT_OPS)
        except ProtocolError as e:
            self._answer(conn, error_reply(e))
            return
        if req.op == "status":
            self._answer(conn, {"id": req.id, **self.status()})
        elif req.op == "thaw":
            self._client_thaw(conn, req)
        elif req.op == "forget":
            self._forget(conn, req)

    def _client_thaw(self, conn: socket.socket, req: Request) -> None:
        devs = set(req.devs)
        idxs = [
            i for i in range(len(self.vols) - 1, -1, -1)
            if self.vols[i].spec.dev in devs and self.vols[i].state == "frozen"
        ]  # fmt: skip
        if self.expired is not None or not idxs:
            self._answer(
                conn,
                {
                    "id": req.id,
                    "ok": False,
                    "expired": self.expired,
                    "error": None if self.expired else "not frozen by this guardian",
                },
            )
            return
        # One after another in reverse plan order (the fs holding a loop image before the
        # fs on that image), answered once all returned.
        self._submit("thaw", idxs[0], conn, req.id, idxs, chain=True)

    def _forget(self, conn: socket.socket, req: Request) -> None:
        """A newer freeze of these volumes began: a finished guardian's story is history
        that must not answer for it. A guardian still on duty ignores this."""
        if self.expired is None:
            self._answer(conn, {"id": req.id, "ok": False, "error": "still guarding"})
            return
        n = 0
        for v in self.vols:
            if v.spec.dev in req.devs and not v.superseded:
                v.superseded, n = True, n + 1
        self._answer(conn, {"id": req.id, "ok": True, "forgotten": n})

    def status(self) -> dict[str, Any]:
        now = _now()
        finished = self.expired is not None
        return {
            "pid": os.getpid(),
            "controller_pid": self.controller_pid,
            "controller_alive": not self.controller_gone,
            "detached": self.detached,
            "finished": finished,
            "started": self.started_wall,
            "deadline_remaining_s": (self.deadline - now) / 1e9
            if self.deadline and not finished
            else None,
            "timeout_s": self.timeout_ns / 1e9,
            "lease_remaining_s": (self.lease_until - now) / 1e9
            if self.lease_until and not finished
            else None,
            "volumes": [
                {
                    "mount_point": v.spec.name,
                    "dev": v.spec.dev,
                    "fstype": v.spec.fstype,
                    "state": v.state,
                    "superseded": v.superseded,
                    "frozen_since": v.frozen_wall,
                    "frozen_for_s": (now - v.frozen_at) / 1e9
                    if v.frozen_at and v.state == "frozen"
                    else None,
                }
                for v in self.vols
            ],
            "expired": self.expired,
            "events": self.events[-50:],
        }

    # -- loop ----------------------------------------------------------------------------
    def _retry_failed_thaws(self) -> None:
        """After an expiry, a volume whose FITHAW failed is still ours: retry, backing off."""
        if self.expired is None or self.pending or self.retry_at is None:
            return
        if _now() < self.retry_at:
            return
        stuck = [i for i in range(len(self.vols) - 1, -1, -1) if self.vols[i].state == "frozen"]
        if stuck:
            self._thaw_indices(stuck, self.expired)
        self.retry_delay = min(self.retry_delay * 2, 60.0)
        still = any(v.state == "frozen" for v in self.vols)
        self.retry_at = _now() + int(self.retry_delay * 1e9) if still else None

    def _next_timeout(self) -> float | None:
        """Sleep until the next timer that can still do something (never spin)."""
        if self.expired is not None:
            if self.retry_at is None and any(v.state == "frozen" for v in self.vols):
                self.retry_at = _now() + int(self.retry_delay * 1e9)
            over = self.linger_until is not None and _now() >= self.linger_until
            t = [None if over else self.linger_until, self.retry_at]
        elif self._frozen_count() or self.pending:
            deadline = self.deadline
            if deadline is None and self.dispatched is not None:
                # Its threads set the deadline when the first FIFREEZE returns, without
                # waking us: it is no earlier than this.
                hint = self.dispatched + self.timeout_ns
                deadline = hint if hint > _now() else None
            t = [deadline, self.lease_until]
        else:
            t = [self.lease_until]  # a silent controller with nothing frozen: just leave
        t = [x for x in t if x is not None]
        if not t:
            return None
        return max(0.0, (min(t) - _now()) / 1e9)

    def _should_exit(self) -> bool:
        if self.pending or self._frozen_count():
            return False
        if self.done:
            return True
        if self.expired is not None:
            over = self.linger_until is not None and _now() >= self.linger_until
            told = [v for v in self.vols if v.state == "thawed"]
            stale = self.ctl is None and all(v.superseded for v in told)
            return over or stale or (self.ctl is None and not self.detached)
        if self.controller_gone and not self.detached:
            return True
        # A held freeze that was thawed through `quiesce thaw`: nothing left to guard.
        return self.detached and any(v.state == "thawed" for v in self.vols)

    def run(self) -> None:
        # Before anything is frozen: one parked thread per volume (crew.py).
        self.crew = Crew(len(self.vols), self._crashed)
        assert self.ctl is not None
        self.sel.register(self.ctl, selectors.EVENT_READ, "ctl")
        self.sel.register(self.listener, selectors.EVENT_READ, "listen")
        self.sel.register(self.wake_r, selectors.EVENT_READ, "wake")
        try:
            pidfd = os.pidfd_open(self.controller_pid)
            self.sel.register(pidfd, selectors.EVENT_READ, "pidfd")
        except (OSError, AttributeError):
            pidfd = None
        send(self.ctl, {"ready": True, "pid": os.getpid()})
        while True:
            for key, _ in self.sel.select(self._next_timeout()):
                tag = key.data
                if tag == "ctl" and self.ctl is not None:
                    self._on_controller()
                elif tag == "pidfd":
                    self.sel.unregister(key.fileobj)
                    self._controller_died("controller-died")
                elif tag == "listen":
                    self._accept()
                elif tag == "client" and key.fileobj in self.clients:
                    self._on_client(key.fileobj)  # type: ignore[arg-type]
                elif tag == "wake":
                    with contextlib.suppress(BlockingIOError):
                        os.read(self.wake_r, 4096)
                    if self.crash is not None:
                        raise RuntimeError(self.crash)
                    while not self.finished.empty():
                        self._complete(self.finished.get())
            self._retry_failed_thaws()
            now = _now()
            if self.expired is None and self._frozen_count():
                if self.deadline is not None and now >= self.deadline:
                    self._expire("deadline")
                elif self.lease_until is not None and now >= self.lease_until:
                    self._expire("lease")
            lease_over = self.lease_until is not None and now >= self.lease_until
            idle = not self._frozen_count() and not self.pending
            if self.expired is None and lease_over and idle:
                self.crew.close()
                return  # a stuck controller that froze nothing: nothing to guard
            if self.done and self._frozen_count() and self.expired is None and not self.pending:
                self._expire("controller-finished-while-frozen")
            if self._should_exit():
                self.crew.close()
                return

    def remove_socket(self) -> None:
        """Last thing before exit (after every thaw: /run may be on a frozen volume)."""
        with contextlib.suppress(OSError):
            os.unlink(socket_file(os.getpid()), dir_fd=self.dir_fd)


def _sweep_stale(dir_fd: int) -> None:
    """Remove the sockets of guardians that died without removing them (SIGKILL): a
    socket nobody listens on refuses connections; a half-made one's owner is dead."""
    for name in os.listdir(dir_fd):
        base = name.removesuffix(".new")
        pid = pid_of(base)
        if pid is None:
            continue
        if name != base:
            stale = not os.path.exists(f"/proc/{pid}")
        else:
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK)
            try:
                probe.connect(f"/proc/self/fd/{dir_fd}/{name}")
                stale = False
            except ConnectionRefusedError:
                stale = True
            except OSError:
                stale = False
            finally:
                probe.close()
        if stale:
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=dir_fd)


def _detach_child(keep: set[int]) -> None:
    """Become a daemon that touches no file: new session, no signals, only needed fds."""
    os.setsid()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    devnull = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)
    os.chdir("/")
    # The OOM killer must never pick the process whose death could leave volumes frozen
    # (dirty pages that cannot be written back pile up while a volume is frozen). Needs
    # CAP_SYS_RESOURCE; without it the guardian keeps the score it inherited.
    with contextlib.suppress(OSError):
        fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY)
        try:
            os.write(fd, b"-1000")
        finally:
            os.close(fd)


def serve(
    ctl: socket.socket,
    vols: Sequence[GuardedVolume],
    timeout: float,
    lease: float,
    controller_pid: int,
    dir_fd: int,
) -> None:
    """The forked child's whole life: detach, guard, ``_exit``. Never returns.

    Any exception once the guardian exists ends in :meth:`_Guardian.last_resort`: the
    emergency thaw of what it froze, recorded, then exit 70."""
    code = 0
    guardian: _Guardian | None = None
    try:
        _detach_child({ctl.fileno(), dir_fd, *(v.fd for v in vols)})
        guardian = _Guardian(ctl, vols, timeout, lease, controller_pid, dir_fd)
        guardian.run()
    except BaseException as e:
        code = 70
        if guardian is not None:
            with contextlib.suppress(BaseException):
                guardian.last_resort(e)
    finally:
        if guardian is not None:
            with contextlib.suppress(BaseException):
                guardian.rcu.release()
            with contextlib.suppress(BaseException):
                guardian.remove_socket()
        os._exit(code)
