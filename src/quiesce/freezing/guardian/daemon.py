"""The guardian: a watchdog process that guarantees every freeze ends.

The kernel never got the freeze timeout proposed in 2008, so quiesce builds it in user
space. Before the first FIFREEZE the controller forks a guardian (fully imported, so it
never reads or writes a frozen filesystem), detached from the controller's session and
deaf to SIGINT/SIGTERM/SIGHUP. **The guardian performs every FIFREEZE and FITHAW**, on
the controller's request: it then knows exactly what "we" froze, even if the controller
dies in the middle of an ioctl. It thaws, in safe reverse order, everything it froze when

* the deadline passes (counted from the first freeze),
* the lease is not renewed in time (a stopped or stuck controller), or
* the controller dies (socket EOF or pidfd), including SIGKILL.

It keeps what it has to say in memory, answers ``status`` and ``thaw`` over an abstract
unix socket (no file on any filesystem, root peers only), and writes one line to the
kernel log (/dev/kmsg) when it had to thaw on its own.

Threads: the main thread runs the event loop and the emergency thaw; one worker thread
runs the requested ioctls serially, so that a FIFREEZE stuck in the kernel (a writer in
the middle of a huge write, an unknown stacking dependency) cannot stop the deadline.
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import selectors
import signal
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from quiesce.freezing.guardian.protocol import peer_uid, recv, send, socket_name
from quiesce.sys import kernel

LINGER_AFTER_EXPIRY = 600.0  # a detached guardian keeps its story for `status`/`thaw`


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


@dataclass
class _Job:
    op: str  # "freeze" | "thaw"
    idx: int
    reply: Any  # socket to answer on
    req_id: Any
    result: dict[str, Any] = field(default_factory=dict)


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


class _Guardian:
    """Runs in the forked child. Never returns: the caller ``os._exit``s."""

    def __init__(
        self,
        ctl: socket.socket,
        vols: Sequence[GuardedVolume],
        timeout: float,
        lease: float,
        controller_pid: int,
    ) -> None:
        self.ctl: socket.socket | None = ctl
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
        self.jobs: queue.Queue[_Job | None] = queue.Queue()
        self.finished: queue.Queue[_Job] = queue.Queue()
        self.busy: int | None = None  # index of the in-flight job
        self.pending = 0
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.sel = selectors.DefaultSelector()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.bind(socket_name(os.getpid()))
        self.listener.listen(8)
        self.listener.setblocking(False)

    # -- bookkeeping -------------------------------------------------------------------
    def _event(self, what: str, **kw: Any) -> None:
        self.events.append({"t": time.time(), "event": what, **kw})

    def _frozen_count(self) -> int:
        return sum(1 for v in self.vols if v.state in ("frozen", "freezing", "thawing"))

    # -- worker thread -----------------------------------------------------------------
    def _worker(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            v = self.vols[job.idx]
            with self.lock:
                refused = self.expired is not None
                if not refused:
                    self.busy = job.idx
                    v.state = "freezing" if job.op == "freeze" else "thawing"
            if refused:
                job.result = {"ok": False, "expired": self.expired}
            else:
                t0 = _now()
                if job.op == "freeze":
                    code = kernel.freeze_errno(v.spec.fd)
                else:
                    code = kernel.thaw_errno(v.spec.fd)
                job.result = {"ok": code == 0, "errno": code, "start": t0, "end": _now()}
            self.finished.put(job)
            os.write(self.wake_w, b"x")

    def _complete(self, job: _Job) -> None:
        """Main thread: apply a finished ioctl to the state, answer the requester."""
        v = self.vols[job.idx]
        res = job.result
        thaw_after: list[int] = []
        with self.lock:
            self.busy = None
            self.pending -= 1
            if "errno" in res:
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
                    # The expiry came while this ioctl was in flight: finish the thaw now.
                    res = res | {"ok": False, "expired": self.expired}
                    thaw_after = [i for i, w in enumerate(self.vols) if w.deferred_thaw]
                    if v.state == "frozen":
                        thaw_after.append(job.idx)
        if thaw_after:
            self._thaw_indices(sorted(set(thaw_after), reverse=True), self.expired or {})
        if job.reply is not None:
            send(job.reply, {"id": job.req_id, **res})

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
            if v.state != "frozen":
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
            _kmsg(
                f"thawed {v.spec.name} ({why.get('reason')}) after {held:.3f}s frozen"
                + ("" if code in (0, errno.EINVAL) else f"; FITHAW failed: errno {code}")
            )

    def _expire(self, reason: str) -> None:
        with self.lock:
            if self.expired is not None:
                return
            self.expired = {"reason": reason, "at": time.time(), "thawed": []}
            busy = self.busy
            # Volumes that must stay frozen until the in-flight ioctl returns: thawing a
            # loop-backed fs while its backing fs is still frozen blocks in the kernel.
            defer = set(self.vols[busy].spec.inners) if busy is not None else set()
            now_ids = []
            for i in range(len(self.vols) - 1, -1, -1):
                if self.vols[i].state != "frozen":
                    continue
                if i in defer:
                    self.vols[i].deferred_thaw = True
                else:
                    now_ids.append(i)
        self._event("expired", reason=reason)
        self._thaw_indices(now_ids, self.expired)
        if self.ctl is not None:
            send(self.ctl, {"event": "expired", **self.expired})
        self.linger_until = _now() + int(LINGER_AFTER_EXPIRY * 1e9)

    # -- requests ----------------------------------------------------------------------
    def _submit(self, op: str, idx: int, reply: Any, req_id: Any) -> None:
        if not 0 <= idx < len(self.vols):
            send(reply, {"id": req_id, "ok": False, "error": f"no volume {idx}"})
            return
        if self.expired is not None:
            send(reply, {"id": req_id, "ok": False, "expired": self.expired})
            return
        self.pending += 1
        self.jobs.put(_Job(op, idx, reply, req_id))

    def _on_controller(self) -> None:
        assert self.ctl is not None
        try:
            msg = recv(self.ctl)
        except (OSError, ValueError):
            msg = None
        if msg is None:
            self._controller_died("controller-died")
            return
        if self.lease_ns:
            self.lease_until = _now() + self.lease_ns
        op = msg.get("op")
        if op in ("freeze", "thaw"):
            self._submit(op, int(msg["vol"]), self.ctl, msg.get("id"))
        elif op == "detach":
            self.detached = True
            self.lease_until = None
            send(self.ctl, {"id": msg.get("id"), "ok": True})
        elif op == "done":
            self.done = True
            send(self.ctl, {"id": msg.get("id"), "ok": True})
        elif op == "status":
            send(self.ctl, {"id": msg.get("id"), **self.status()})
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

    def _on_client(self, conn: socket.socket) -> None:
        try:
            msg = recv(conn)
        except (OSError, ValueError):
            msg = None
        if msg is None:
            self.sel.unregister(conn)
            conn.close()
            return
        op = msg.get("op")
        if op == "status":
            send(conn, {"id": msg.get("id"), **self.status()})
        elif op == "thaw":
            devs = set(msg.get("devs", []))
            idxs = [
                i for i in range(len(self.vols) - 1, -1, -1)
                if self.vols[i].spec.dev in devs and self.vols[i].state == "frozen"
            ]  # fmt: skip
            if self.expired is not None or not idxs:
                send(
                    conn,
                    {
                        "id": msg.get("id"),
                        "ok": False,
                        "expired": self.expired,
                        "error": None if self.expired else "not frozen by this guardian",
                    },
                )
                return
            for n, i in enumerate(idxs):
                self._submit("thaw", i, conn if n == len(idxs) - 1 else None, msg.get("id"))
        else:
            send(conn, {"id": msg.get("id"), "ok": False, "error": f"unknown op {op!r}"})

    def status(self) -> dict[str, Any]:
        now = _now()
        return {
            "pid": os.getpid(),
            "controller_pid": self.controller_pid,
            "controller_alive": not self.controller_gone,
            "detached": self.detached,
            "started": self.started_wall,
            "deadline_remaining_s": (self.deadline - now) / 1e9 if self.deadline else None,
            "timeout_s": self.timeout_ns / 1e9,
            "lease_remaining_s": (self.lease_until - now) / 1e9 if self.lease_until else None,
            "volumes": [
                {
                    "mount_point": v.spec.name,
                    "dev": v.spec.dev,
                    "fstype": v.spec.fstype,
                    "state": v.state,
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
    def _next_timeout(self) -> float | None:
        """Sleep until the next timer that can still do something (never spin)."""
        if self.expired is not None:
            t = [self.linger_until]
        elif self._frozen_count() or self.pending:
            t = [self.deadline, self.lease_until]
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
            return over or (self.ctl is None and not self.detached)
        if self.controller_gone and not self.detached:
            return True
        # A held freeze that was thawed through `quiesce thaw`: nothing left to guard.
        return self.detached and any(v.state == "thawed" for v in self.vols)

    def run(self) -> None:
        threading.Thread(target=self._worker, name="ioctl", daemon=True).start()
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
                    with contextlib.suppress(OSError):
                        conn, _ = self.listener.accept()
                        if peer_uid(conn) != 0:
                            conn.close()
                        else:
                            self.sel.register(conn, selectors.EVENT_READ, "client")
                elif tag == "client":
                    self._on_client(key.fileobj)  # type: ignore[arg-type]
                elif tag == "wake":
                    with contextlib.suppress(BlockingIOError):
                        os.read(self.wake_r, 4096)
                    while not self.finished.empty():
                        self._complete(self.finished.get())
            now = _now()
            if self.expired is None and self._frozen_count():
                if self.deadline is not None and now >= self.deadline:
                    self._expire("deadline")
                elif self.lease_until is not None and now >= self.lease_until:
                    self._expire("lease")
            lease_over = self.lease_until is not None and now >= self.lease_until
            idle = not self._frozen_count() and not self.pending
            if self.expired is None and lease_over and idle:
                return  # a stuck controller that froze nothing: nothing to guard
            if self.done and self._frozen_count() and self.expired is None and not self.pending:
                self._expire("controller-finished-while-frozen")
            if self._should_exit():
                return


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
) -> None:
    """The forked child's whole life: detach, guard, ``_exit``. Never returns."""
    code = 0
    try:
        _detach_child({ctl.fileno(), *(v.fd for v in vols)})
        _Guardian(ctl, vols, timeout, lease, controller_pid).run()
    except BaseException:
        code = 70
    finally:
        os._exit(code)
