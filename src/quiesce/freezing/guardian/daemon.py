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

from quiesce.freezing.guardian.core import (
    HELD,
    Action,
    GuardianCore,
    Lost,
    Probe,
    Reason,
    Thaw,
    VolState,
)
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
from quiesce.freezing.guardian.second import SecondLine
from quiesce.host import freezetrace, kernel

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
class _Job:
    op: str  # "freeze" | "thaw" | "freeze_wave" | "thaw_wave"
    idx: int  # the volume (a wave: its first)
    reply: Any  # socket to answer on
    req_id: Any
    result: dict[str, Any] = field(default_factory=dict)
    idxs: tuple[int, ...] = ()  # a wave's volumes
    expedite: str = ""  # a freeze wave: "set", "restore", "set-restore" or ""
    answered: bool = False  # its last thread answered the controller itself
    subs: list[_Job] = field(default_factory=list)  # one per volume (a single op: one)
    left: int = 0  # volumes whose ioctl has not returned yet
    chain: bool = False  # its volumes one after another, in order (a client's thaw)
    gate_fd: int = -1  # a freeze wave: a command's gate, released once the group is frozen
    gate_ns: int | None = None  # when that byte was written
    exit_fd: int = -1  # with the gate: the command's pidfd; its exit starts the thaw


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


def checked_thaw(fd: int) -> tuple[int, int]:
    """A checked thaw whose probe, if it froze, is surely undone (a few tries)."""
    probe, code = kernel.checked_thaw_errno(fd)
    if probe == 0 and code not in (0, errno.EINVAL):
        code = _undo_probe(fd)
    return probe, code


def _undo_probe(fd: int) -> int:
    """Thaw the freeze a probe just made (ours, seconds old at most); a few tries."""
    code = kernel.thaw_errno(fd)
    for _ in range(3):
        if code in (0, errno.EINVAL):
            break
        time.sleep(0.01)
        code = kernel.thaw_errno(fd)
    return code


class _Guardian:
    """Runs in the forked child: the shell around :class:`GuardianCore`. Never returns:
    the caller ``os._exit``s."""

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
        # The threads answer waves on their own copy: the main thread may close self.ctl
        # (controller gone) at any moment, and its fd number be reused.
        self.ctl_at_start = ctl
        self.ctl_w = ctl.dup()
        self.specs = list(vols)
        self.core = GuardianCore(
            inners=[v.inners for v in vols],
            timeout_ns=int(timeout * 1e9),
            lease_ns=int(lease * 1e9) if lease > 0 else 0,
            now_ns=_now(),
        )
        self.controller_pid = controller_pid
        self.started_wall = time.time()
        self.frozen_wall: dict[int, float] = {}
        self.expired: dict[str, Any] | None = None
        self.expiry_told = False
        self.linger_until: int | None = None
        self.events: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.finished: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self.pending = 0  # requests not yet answered
        self.crash: str | None = None  # an ioctl thread's exception, for the main thread
        self.crashed: set[int] = set()  # volumes whose thread raised
        self.in_kernel: set[int] = set()  # volumes whose ioctl of ours is in the kernel now
        self.trace: freezetrace.FreezeTrace | None = None  # everyone's FIFREEZE/FITHAW calls
        self.use_trace = True  # False: probes alone (the portable fallback; benches, tests)
        self.dev_index = {v.dev: i for i, v in enumerate(self.specs)}
        self.second: SecondLine | None = None  # the watchdog that outlives a SIGKILL of us
        self.noted: list[str] = ["idle"] * len(self.specs)  # states the watchdog knows
        self.final = False  # the last line of defence took over: threads start nothing new
        self.retry_at: int | None = None  # next FITHAW retry of a volume whose thaw failed
        self.retry_delay = 1.0
        self.rcu = Expedite(os.getpid())
        faults = os.environ.get(FAULT_ENV, "").split(",")
        self.fault = "guardian:raise" in faults
        self.fault_worker = "guardian:worker-raise" in faults
        # "guardian:probe-parks=PATH": the first ownership probe writes PATH.parked and
        # waits for PATH to exist (a probe in flight, for as long as a test needs)
        parks = [f.split("=", 1)[1] for f in faults if f.startswith("guardian:probe-parks=")]
        self.fault_probe_parks = parks[0] if parks else None
        self.syslog = _Syslog()
        self.clients: dict[socket.socket, int] = {}  # connection -> accepted at
        # exec: a released command's pidfd and the wave its exit thaws; that thaw's job,
        # its result and the controller's request id waiting for it
        self.exit_watch: tuple[int, tuple[int, ...]] | None = None
        self.exit_job: _Job | None = None
        self.exit_result: dict[str, Any] | None = None
        self.exit_asked: Any = None
        self.thaws_asked: set[tuple[int, ...]] = set()  # waves the controller asked to thaw
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

    def _sooner(self, before: int | None, now: int) -> bool:
        """Under the lock, after a core call on a crew thread: did it bring the main
        thread's next timer forward? Then the main thread, maybe asleep without it, must be
        woken: nothing else is sure to (the trace leaves out our own calls)."""
        after = self.core.next_timer(now)
        return after is not None and (before is None or after < before)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self.wake_w, b"x")

    def _note_expiry(self) -> bool:
        """Under the lock, after any core call: the expiry's story, once. True if new."""
        ex = self.core.expiry
        if ex is None or self.expired is not None:
            return False
        self.expired = {"reason": ex.reason, "at": time.time(), "thawed": []}
        self._event("expired", reason=ex.reason)
        self.linger_until = _now() + int(LINGER_AFTER_EXPIRY * 1e9)
        return True

    # -- actions -------------------------------------------------------------------------
    def _note_changes(self) -> None:
        """Tell the second line every state that changed (a few bytes to a pipe each)."""
        if self.second is None:
            return
        for i, v in enumerate(self.core.vols):
            state = str(v.state)
            if state != self.noted[i] and state != "idle":
                self.noted[i] = state
                self.second.note(i, state, call_ns=v.called_ns)

    def _do(self, acts: Sequence[Action], new_expiry: bool = False) -> None:
        """Carry out the core's actions: each volume's ioctl on its own thread."""
        with self.lock:
            self._note_changes()  # before any thaw starts: the watchdog must know it
        if new_expiry:
            self.rcu.release()  # whatever is in flight, stop costing the others now
        for a in acts:
            if isinstance(a, Thaw):
                self.crew.submit(a.idx, functools.partial(self._expiry_thaw, a.idx))
            elif isinstance(a, Probe):
                self.crew.submit(a.idx, functools.partial(self._probe, a.idx))
            elif isinstance(a, Lost):
                self._lost(a)
        if new_expiry or acts:
            self._wake()

    def _lost(self, a: Lost) -> None:
        v = self.specs[a.idx]
        self._event("lost", volume=v.name, dev=v.dev, why=a.why)
        self._record(
            f"{v.name}: {a.why}; this freeze is no longer quiesce's: it will never thaw it"
        )
        msg = {"event": "lost", "volume": v.name, "dev": v.dev, "why": a.why, "at": time.time()}
        with contextlib.suppress(OSError):
            send(self.ctl_w, msg, wait=False)

    def _expiry_thaw(self, i: int) -> None:
        """An expiry's checked thaw of volume ``i`` (marked busy by the core already)."""
        v = self.specs[i]
        with self.lock:
            if self.final:
                return  # the main thread thaws it
            if not self.core.thaw_go(i):  # someone else's thaw since it was decided
                acts = self.core.thaw_skipped(i)
                skipped = True
            else:
                skipped = False
                self.in_kernel.add(i)
        if skipped:
            self._do(acts)
            return
        try:
            probe, code = checked_thaw(v.fd)
        finally:
            with self.lock:
                self.in_kernel.discard(i)
        with self.lock:
            acts = self.core.thaw_returned(i, probe, code, _now())
            vol = self.core.vols[i]
            held = (_now() - vol.frozen_ns) / 1e9 if vol.frozen_ns else 0.0
            entry = {
                "volume": v.name,
                "dev": v.dev,
                "errno": code,
                "held_s": round(held, 6),
                "end": _now(),
            }
            if vol.state == VolState.LOST:
                entry["lost"] = vol.lost_why
            elif vol.state == VolState.THAWED:
                self._release(v)
            if self.expired is not None:
                self.expired["thawed"].append(entry)
            self._event("guardian-thaw", **entry)
        ok = vol.state != VolState.FROZEN
        self._record(
            f"thawed {v.name} ({self.expired and self.expired.get('reason')}) after "
            f"{held:.3f}s frozen"
            + ("" if ok else f"; FITHAW failed: errno {code}")
            + (f"; {vol.lost_why}" if vol.state == VolState.LOST else "")
        )
        self._do(acts)
        self._wake()  # the main thread decides whether anything is left to guard

    def _probe(self, i: int) -> None:
        """Is our freeze of ``i`` still the kernel's? (FIFREEZE: EBUSY = yes)."""
        with self.lock:
            if self.final or not self.core.probe_started(i):
                return
            self.in_kernel.add(i)
        if self.fault_probe_parks is not None:
            _park(self.fault_probe_parks)
            self.fault_probe_parks = None
        started = _now()
        try:
            code = kernel.freeze_errno(self.specs[i].fd)
            if code == 0:
                _undo_probe(self.specs[i].fd)
        finally:
            with self.lock:
                self.in_kernel.discard(i)
        with self.lock:
            acts = self.core.probe_returned(i, code, _now(), started)
            verdict_due = self.core.vols[i].clear_at_ns is not None
        self._do(acts)
        if verdict_due:
            self._wake()  # the main thread reads the trace up to now, then judges

    def _read_trace(self) -> None:
        """Main thread: feed everyone else's FIFREEZE/FITHAW calls to the core, then let
        it judge the probes that are waiting for the trace to catch up."""
        if self.trace is None:
            return
        now = _now()  # every call before this instant is in the buffer once read
        try:
            calls = self.trace.read()
        except OSError:
            calls = []
        acts: list[Action] = []
        with self.lock:
            for c in calls:
                if c.op == "ebusy":
                    acts += self.core.outside_call("ebusy", None, c.ts_ns, "", now, c.tid)
                    continue
                if c.dev is not None and c.dev not in self.dev_index:
                    continue  # another filesystem's
                idx = self.dev_index.get(c.dev) if c.dev is not None else None
                who = f"{c.comm}[{c.tid}]"
                self._event(
                    "outside-" + c.op,
                    volume=self.specs[idx].name if idx is not None else None,
                    who=who,
                )
                acts += self.core.outside_call(c.op, idx, c.ts_ns, who, now, c.tid)
            acts += self.core.trace_caught_up(now)
        self._do(acts)

    @staticmethod
    def _release(v: GuardedVolume) -> None:
        """Close a thawed volume's fd: a lingering guardian must not keep it busy (umount)."""
        v.fd = _closed(v.fd)

    # -- the requests' ioctls --------------------------------------------------------------
    def _crashed(self, i: int, exc: BaseException) -> None:
        """A crew thread raised: tell the main thread (it thaws and leaves: the last line
        of defence). A FIFREEZE that returned 0 is already in the core: ours to thaw."""
        self.crashed.add(i)  # out of the kernel: whatever it marked busy is not in flight
        self.crash = f"ioctl thread {i}: {type(exc).__name__}: {exc}"
        self._wake()

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
        """One volume's ioctl, on its thread; its result goes into the core at once (an
        expiry thaws it from there, whatever its wave-mates do). The last answers."""
        i = sub.idx
        spec = self.specs[i]
        with self.lock:
            now = _now()
            freeze = sub.op == "freeze"
            timer = self.core.next_timer(now)
            go = not self.final and (
                self.core.freeze_called(i, now) if freeze else self.core.thaw_called(i)
            )
            sooner = self._sooner(timer, now)  # the group's first call starts the deadline
        if not go and not freeze:  # a verdict on someone else's thaw may be due: wait a bit
            for _ in range(200):
                with self.lock:
                    v = self.core.vols[i]
                    if v.suspect_ns is None or v.state != VolState.FROZEN or self.final:
                        break
                    probe_here = v.clear_at_ns is None and not v.busy
                if probe_here:  # its probe would queue behind us on this very thread
                    self._probe(i)
                self._wake()
                time.sleep(0.001)
        with self.lock:
            if not go and not freeze:
                go = not self.final and self.core.thaw_called(i)
            if go:
                self.in_kernel.add(i)
                self._note_changes()  # "freezing"/"thawing" before the ioctl, not after
            else:
                sub.result = self._refusal(i, sub.op)
        if sooner:
            self._wake()  # before the ioctl: a FIFREEZE may never return
        if go:
            t0 = _now()
            try:
                if sub.op == "freeze":
                    probe, code = None, kernel.freeze_errno(spec.fd)
                else:
                    probe, code = checked_thaw(spec.fd)
            finally:
                with self.lock:
                    self.in_kernel.discard(i)
            t1 = _now()
            if self.fault_worker and sub.op == "freeze":
                with self.lock:
                    acts = self.core.freeze_returned(i, code, t1)
                self._do(acts)
                raise _InjectedFault("injected by QUIESCE_FAULT=guardian:worker-raise")
            with self.lock:
                timer = self.core.next_timer(t1)
                if sub.op == "freeze":
                    acts = self.core.freeze_returned(i, code, t1)
                else:
                    acts = self.core.thaw_returned(i, probe, code, t1)
                new = self._note_expiry()
                if job.gate_fd >= 0:
                    self._open_gate(job)  # first thing: the command runs while we note
                vol = self.core.vols[i]
                ok = code == 0 and probe in (None, errno.EBUSY) and vol.state != VolState.LOST
                sub.result = {"ok": ok, "errno": code, "start": t0, "end": t1}
                if vol.state == VolState.LOST:
                    sub.result["lost"] = vol.lost_why
                if sub.op == "freeze" and code == 0:
                    self.frozen_wall[i] = time.time()
                if vol.state == VolState.THAWED:
                    self._release(spec)
                if self.expired is not None:
                    sub.result |= {"ok": False, "expired": self.expired}
                self._event(sub.op, volume=spec.name, errno=code)
                final = self.final
                self._note_changes()
                sooner = self._sooner(timer, t1)  # the first FIFREEZE back starts the probes
            if not final:
                self._do(acts, new)
                if sooner and not acts and not new:
                    self._wake()  # (_do woke it already otherwise)
        with self.lock:
            job.left -= 1
            last = job.left == 0
            nxt = job.subs[len(job.subs) - job.left] if job.chain and not last else None
        if nxt is not None:
            self.crew.submit(nxt.idx, functools.partial(self._run_sub, job, nxt))
        if last:
            self._finish(job)

    def _open_gate(self, job: _Job) -> None:
        """Under the lock, as a FIFREEZE of a gated wave is recorded: release the command
        (one byte on its gate) if, and only if, every volume of the group is frozen by us
        now and nothing has expired; then let go of the gate either way. The controller
        learns of it from the wave's answer (``gate_ns``); a gate never released is closed
        (the command sees EOF and does not run)."""
        if self.expired is not None or self.core.expiry is not None or self.final:
            self._close_gate(job)
            return
        if any(v.state != VolState.FROZEN for v in self.core.vols):
            return  # a wave-mate is still in the kernel: its thread decides
        try:
            os.write(job.gate_fd, b"\n")
            job.gate_ns = _now()
        except OSError:
            pass  # the command is gone already: the controller's wait says how
        self._close_gate(job)

    @staticmethod
    def _close_gate(job: _Job) -> None:
        job.gate_fd = _closed(job.gate_fd)

    def _refusal(self, i: int, op: str) -> dict[str, Any]:
        """Why the core would not let this ioctl happen (call under the lock)."""
        if self.expired is not None or self.core.expiry is not None or self.final:
            self._note_expiry()
            return {"ok": False, "expired": self.expired, "error": "the guardian is ending"}
        vol = self.core.vols[i]
        if vol.state == VolState.LOST:
            return {"ok": False, "errno": errno.EINVAL, "lost": vol.lost_why}
        if op == "thaw":
            return {"ok": False, "errno": errno.EINVAL, "error": f"not frozen by us: {vol.state}"}
        return {"ok": False, "errno": errno.EBUSY, "error": f"volume is {vol.state}"}

    def _finish(self, job: _Job) -> None:
        """The last volume's thread: restore grace periods after a group's last FIFREEZE
        (or a failed one), answer the controller itself (no hop through the main thread
        inside the window), then let the main thread do its bookkeeping."""
        subs = job.subs
        wave = job.op in ("freeze_wave", "thaw_wave")
        ok = all(s.result.get("ok") for s in subs)
        with self.lock:
            if job.gate_ns is None:  # no command runs: nothing to watch
                job.exit_fd = _closed(job.exit_fd)
            self._close_gate(job)  # not released by now: never
            if wave:
                job.result = {
                    "ok": ok,
                    "results": {str(s.idx): s.result for s in subs},
                    "expedite": self.rcu.state,
                    "expedite_reason": self.rcu.reason,
                }
                if job.gate_ns is not None:
                    job.result["gate_ns"] = job.gate_ns
            else:  # a single op, or a client's thaw: its last volume's (as always)
                job.result = dict(subs[-1].result)
                lost = [s.result["lost"] for s in subs if s.result.get("lost")]
                if lost and "lost" not in job.result:
                    job.result |= {"ok": False, "lost": lost[0]}
            if self.expired is not None:
                job.result["ok"] = False
                job.result["expired"] = self.expired
        if job.op == "freeze_wave" and (job.expedite in ("restore", "set-restore") or not ok):
            self.rcu.release()  # before the answer: nothing may be left set once it is out
        if wave and job.reply is not None and job.reply is self.ctl_at_start:
            job.answered = send(self.ctl_w, {"id": job.req_id, **job.result}, wait=False)
        self.finished.put(job)
        self._wake()

    def _complete(self, job: _Job) -> None:
        """Main thread: a finished request (answer it unless its last thread did)."""
        with self.lock:
            self.pending -= 1
        if job.idxs in self.thaws_asked:  # thawed as asked already: nothing to watch
            job.exit_fd = _closed(job.exit_fd)
        if job.exit_fd >= 0:  # a gated wave that released its command: watch it
            self.exit_watch = (job.exit_fd, job.idxs)
            job.exit_fd = -1
            self.sel.register(self.exit_watch[0], selectors.EVENT_READ, "exit")
        if job is self.exit_job:  # the thaw its command's exit started
            self.exit_result = job.result
            if self.exit_asked is not None and self.ctl is not None:
                self._answer(self.ctl, {"id": self.exit_asked, **job.result})
                self.exit_asked, self.exit_job = None, None
        if job.reply is not None and not job.answered:
            self._answer(job.reply, {"id": job.req_id, **job.result})

    # -- the thaw at the command's exit (exec) ---------------------------------------------
    def _end_exit_watch(self) -> tuple[int, ...]:
        """Stop watching the command (it exited, or the controller asks first)."""
        if self.exit_watch is None:
            return ()
        fd, idxs = self.exit_watch
        self.exit_watch = None
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(fd)
        os.close(fd)
        return idxs

    def _command_exited(self) -> None:
        """Main thread: the gated command exited. Thaw the wave it was released by (the
        controller's next request, made in advance: the same checked thaw, on the crew);
        its answer waits for that request."""
        assert self.exit_watch is not None
        idxs = self.exit_watch[1]
        self.exit_result, self.exit_asked = None, None
        self.exit_job = self._submit("thaw_wave", idxs[0], None, None, idxs)
        self._end_exit_watch()  # after: its syscalls let the woken thread run

    def _thaw_request(self, req: Request) -> bool:
        """The controller's thaw of the wave a command's exit thaws: answered with that
        thaw (now, or when it returns). False: not that wave, or its command still runs
        (then the watch ends and the thaw is the controller's, as asked)."""
        watched = self.exit_watch[1] if self.exit_watch is not None else None
        if watched is not None and tuple(req.vols) == watched:
            self._end_exit_watch()  # still running (killed, Ctrl-C): thaw as asked
            return False
        job = self.exit_job
        if job is None or tuple(req.vols) != job.idxs:
            return False
        if self.exit_result is not None:
            self._answer(self.ctl, {"id": req.id, **self.exit_result})  # type: ignore[arg-type]
            self.exit_job, self.exit_result = None, None
        else:
            self.exit_asked = req.id
        return True

    # -- the last line of defence --------------------------------------------------------
    def last_resort(self, exc: BaseException) -> None:
        """Something unexpected broke the guardian: thaw everything it froze, now.

        Kept to the bare minimum (no event loop, no replies but one to the controller),
        so that the bug that brought us here is unlikely to be met again; the thaws are
        checked ones (never a freeze that is not ours)."""
        with contextlib.suppress(BaseException):
            self.rcu.release()
        with contextlib.suppress(BaseException):
            self._record(f"internal error: {type(exc).__name__}: {exc}"[:400])
        with contextlib.suppress(BaseException), self.lock:
            self.final = True  # the threads start nothing new; this thread thaws
            self.core.expire(f"guardian-error ({type(exc).__name__})", _now())
            self._note_expiry()
        end = time.monotonic() + self.core.timeout_ns / 1e9 + 60
        while time.monotonic() < end:
            with self.lock:
                busy = set(self.in_kernel)
                blocked = {j for b in busy for j in self.core.vols[b].inners}
                todo = [
                    i for i in range(len(self.core.vols) - 1, -1, -1)
                    if self.core.vols[i].state in (VolState.FROZEN, VolState.THAWING)
                    and i not in busy and i not in blocked
                ]  # fmt: skip
                for i in todo:
                    self.core.vols[i].state, self.core.vols[i].busy = VolState.FROZEN, False
            for i in todo:
                with contextlib.suppress(BaseException):
                    probe, code = checked_thaw(self.specs[i].fd)
                    with self.lock:
                        self.core.thaw_called(i)
                        self.core.thaw_returned(i, probe, code, _now())
                        self._note_changes()
                    vol = self.core.vols[i]
                    held = (_now() - vol.frozen_ns) / 1e9 if vol.frozen_ns else 0.0
                    why = self.expired.get("reason") if self.expired else "guardian-error"
                    self._record(
                        f"thawed {self.specs[i].name} ({why}) after {held:.3f}s frozen"
                        + ("" if code in (0, errno.EINVAL) else f"; FITHAW failed: errno {code}")
                    )
            with self.lock:
                # An ioctl still in the kernel decides the rest (its result lands in the
                # core); a FIFREEZE whose thread broke before recording it is unknown:
                # never thawed blindly (it may have been someone else's EBUSY).
                waiting = bool(self.in_kernel) or any(
                    v.state in (VolState.FROZEN, VolState.THAWING) for v in self.core.vols
                )
            if not waiting:
                break
            time.sleep(0.01)
        if self.expired is not None and not self.expiry_told and self.ctl is not None:
            with contextlib.suppress(BaseException):
                send(self.ctl, {"event": "expired", **self.expired}, wait=False)

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
        gate_fd: int = -1,
        exit_fd: int = -1,
    ) -> _Job | None:
        bad = [i for i in (idxs or [idx]) if not 0 <= i < len(self.specs)]
        if bad or self.expired is not None:
            _closed(gate_fd)
            _closed(exit_fd)
            no = {"error": f"no volume {bad[0]}"} if bad else {"expired": self.expired}
            if reply is not None:
                self._answer(reply, {"id": req_id, "ok": False, **no})
            else:  # a command's exit: whoever asks for this thaw is told
                self.exit_result = {"ok": False, **no}
            return None
        job = _Job(op, idx, reply, req_id, idxs=tuple(idxs) or (idx,), expedite=expedite)
        job.chain = chain
        job.gate_fd, job.exit_fd = gate_fd, exit_fd
        base = op.removesuffix("_wave")
        job.subs = [_Job(base, i, None, None) for i in job.idxs]
        job.left = len(job.subs)
        with self.lock:
            self.pending += 1
        self._dispatch(job)
        return job

    def _on_controller(self) -> None:
        assert self.ctl is not None
        try:
            # A gated freeze wave carries the command's gate and, optionally, its pidfd
            # (SCM_RIGHTS); any other fd is closed.
            data, fds, _, _ = socket.recv_fds(self.ctl, MAX_MSG, 2)
        except OSError:
            data, fds = b"", []
        if not data:
            for fd in fds:
                _closed(fd)
            self._controller_died()
            return
        with self.lock:  # any message is a sign of life
            self.core.renew(_now())
        try:
            req = parse_request(data, CONTROLLER_OPS)
            if req.gate != bool(fds) or (fds and not _is_pipe(fds[0])):
                raise ProtocolError("gate: true comes with a pipe's fd, and only then")
            if len(fds) > 1 and not _is_pidfd(fds[1]):
                raise ProtocolError("a gate's second fd must be the command's pidfd")
        except ProtocolError as e:
            for fd in fds:
                _closed(fd)
            self._answer(self.ctl, error_reply(e))
            return
        if req.op in ("freeze", "thaw"):
            assert req.vol is not None
            self._submit(req.op, req.vol, self.ctl, req.id)
        elif req.op == "thaw_wave" and self._thaw_request(req):
            pass  # the command's exit thaws (or thawed) this wave: answered from there
        elif req.op in ("freeze_wave", "thaw_wave"):
            # A thaw asked before the gated wave's answer was completed here: that
            # wave's command is not watched (its thaw is under way as asked).
            if req.op == "thaw_wave":
                self.thaws_asked.add(tuple(req.vols))
            else:
                self.thaws_asked.discard(tuple(req.vols))
            gate_fd, exit_fd = [*fds, -1, -1][:2]
            self._submit(
                req.op,
                req.vols[0],
                self.ctl,
                req.id,
                req.vols,
                req.expedite,
                gate_fd=gate_fd,
                exit_fd=exit_fd,
            )
        elif req.op == "detach":
            with self.lock:
                self.core.detach()
            self._answer(self.ctl, {"id": req.id, "ok": True})
        elif req.op == "done":
            with self.lock:
                acts = self.core.finish(_now())
                new = self._note_expiry()
            self._do(acts, new)
            self._answer(self.ctl, {"id": req.id, "ok": True})
        elif req.op == "status":
            self._answer(self.ctl, {"id": req.id, **self.status()})
        # "renew" needs no answer: receiving it renewed the lease

    def _controller_died(self) -> None:
        if self.ctl is not None:
            self.sel.unregister(self.ctl)
            self.ctl.close()
            self.ctl = None
        # A request may still be queued or in flight: expiring now makes the threads
        # refuse what is queued and thaw what completes.
        with self.lock:
            acts = self.core.controller_died(_now())
            if not self.core.detached and self.pending and self.core.expiry is None:
                acts += self.core.expire(Reason.CONTROLLER_DIED, _now())
            new = self._note_expiry()
        self._do(acts, new)

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
        with self.lock:
            mine = [i for i, v in enumerate(self.specs) if v.dev in devs]
            idxs = self.core.thawable(mine) if self.expired is None else []
            pending = [i for i in mine if self.core.vols[i].state == VolState.FREEZING]
            for i in pending:  # an expiry thaws it on return anyway
                self.core.thaw_when_frozen(i)
        with self.lock:  # frozen by us, but a probe or the trace's verdict is in flight
            checking = [i for i in mine if self.core.vols[i].state == VolState.FROZEN]
            checking = [i for i in checking if i not in idxs]
        if checking and self.expired is None:
            # Not refused: the ownership check takes milliseconds (a probe) or until the
            # trace catches up; the client asks again (client.thaw). Nothing is thawed
            # meanwhile, so a group's volumes are thawed together or not at all.
            self._answer(
                conn,
                {
                    "id": req.id,
                    "ok": False,
                    "checking": True,
                    "error": f"{self.specs[checking[0]].name}: its ownership is being "
                    "checked (a probe or the kernel's trace is in flight); ask again",
                },
            )
            return
        if pending and not idxs:
            v = self.core.vols[pending[0]]
            self._answer(
                conn,
                {
                    "id": req.id,
                    "ok": False,
                    "pending": True,
                    "freezing_for_s": (_now() - (v.called_ns or _now())) / 1e9,
                    "error": "the freeze is still being set up by the kernel (writes in "
                    "flight); the guardian thaws it the moment it completes",
                },
            )
            return
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
        with self.lock:
            on_duty = self.expired is None and any(
                v.state in HELD for i, v in enumerate(self.core.vols)
                if self.specs[i].dev in req.devs
            )  # fmt: skip
            if on_duty:
                self._answer(conn, {"id": req.id, "ok": False, "error": "still guarding"})
                return
            n = 0
            for i, v in enumerate(self.core.vols):
                if self.specs[i].dev in req.devs and not v.superseded:
                    v.superseded, n = True, n + 1
        self._answer(conn, {"id": req.id, "ok": True, "forgotten": n})

    def status(self) -> dict[str, Any]:
        now = _now()
        core = self.core
        with self.lock:
            # On duty while a freeze of ours may still land (a FIFREEZE in the kernel).
            finished = self.expired is not None and not core.held()
        vols = []
        for i, (spec, v) in enumerate(zip(self.specs, core.vols, strict=True)):
            vols.append(
                {
                    "mount_point": spec.name,
                    "dev": spec.dev,
                    "fstype": spec.fstype,
                    "state": str(v.state),
                    "superseded": v.superseded,
                    "frozen_since": self.frozen_wall.get(i),
                    "frozen_for_s": (now - v.frozen_ns) / 1e9
                    if v.frozen_ns and v.state == VolState.FROZEN
                    else None,
                    "freezing_for_s": (now - v.called_ns) / 1e9
                    if v.called_ns and v.state == VolState.FREEZING
                    else None,
                    "checked_s_ago": (now - v.checked_ns) / 1e9
                    if v.checked_ns and v.state == VolState.FROZEN
                    else None,
                    "lost": v.lost_why,
                }
            )
        return {
            "pid": os.getpid(),
            "controller_pid": self.controller_pid,
            "controller_alive": not core.controller_gone,
            "detached": core.detached,
            "finished": finished,
            "started": self.started_wall,
            "deadline_remaining_s": (core.deadline_ns - now) / 1e9
            if core.deadline_ns and not finished
            else None,
            "timeout_s": core.timeout_ns / 1e9,
            "lease_remaining_s": (core.lease_until_ns - now) / 1e9
            if core.lease_until_ns and not finished
            else None,
            "volumes": vols,
            "expired": self.expired,
            "ownership": "trace+probe" if self.trace is not None else "probe",
            "events": self.events[-50:],
        }

    # -- loop ----------------------------------------------------------------------------
    def _timers(self) -> None:
        """Deadline, lease, probes and thaw retries: what the core asks for now."""
        now = _now()
        with self.lock:
            acts = self.core.tick(now)
            if self.core.expiry is not None and self._frozen_again() and not self.core.busy():
                if self.retry_at is None:
                    self.retry_at = now + int(self.retry_delay * 1e9)
                elif now >= self.retry_at:
                    acts += self.core.retry_thaws()
                    self.retry_delay = min(self.retry_delay * 2, 60.0)
                    self.retry_at = now + int(self.retry_delay * 1e9)
            new = self._note_expiry()
        self._do(acts, new)

    def _frozen_again(self) -> bool:
        """After an expiry, a volume whose FITHAW failed (still ours, still frozen)."""
        return any(v.state == VolState.FROZEN for v in self.core.vols)

    def _tell_expiry(self) -> None:
        """Once every thaw the expiry owes has returned: tell the controller the story."""
        if self.expired is None or self.expiry_told or self.ctl is None:
            return
        with self.lock:
            settling = any(
                v.state == VolState.THAWING or (v.deferred_thaw and v.state == VolState.FROZEN)
                for v in self.core.vols
            )
        if not settling:
            self.expiry_told = True
            send(self.ctl, {"event": "expired", **self.expired}, wait=False)

    def _next_timeout(self) -> float | None:
        """Sleep until the next timer that can still do something (never spin)."""
        now = _now()
        with self.lock:
            t = [self.core.next_timer(now)]
        if self.expired is not None:
            over = self.linger_until is not None and now >= self.linger_until
            t += [None if over else self.linger_until, self.retry_at]
        t2 = [x for x in t if x is not None]
        if not t2:
            return None
        return max(0.0, (min(t2) - now) / 1e9)

    def _should_exit(self) -> bool:
        with self.lock:
            held = bool(self.core.held()) or bool(self.core.busy())
            states = [v.state for v in self.core.vols]
        if self.pending or held:
            return False
        if self.core.done:
            return True
        ended = [s for s in states if s in (VolState.THAWED, VolState.LOST)]
        if self.expired is not None:
            over = self.linger_until is not None and _now() >= self.linger_until
            told = [v for v, s in zip(self.core.vols, states, strict=True) if s == VolState.THAWED]
            stale = self.ctl is None and all(v.superseded for v in told)
            return over or stale or (self.ctl is None and not self.core.detached)
        if self.core.controller_gone and not self.core.detached:
            return True
        # A held freeze that was thawed (by `quiesce thaw`, or lost to someone else's
        # thaw): nothing left to guard.
        return self.core.detached and bool(ended)

    def run(self) -> None:
        # Before anything is frozen and before any thread of ours exists (it forks): the
        # second line, which thaws by the deadline what we froze if we are killed.
        try:
            self.second = SecondLine.start(
                guardian_pid=os.getpid(),
                fds=[v.fd for v in self.specs],
                devs=[v.dev for v in self.specs],
                names=[v.name for v in self.specs],
                timeout_s=self.core.timeout_ns / 1e9,
                dir_fd=self.dir_fd,
            )
        except OSError as e:
            self._record(f"no second line (the watchdog did not start: {e.strerror})")
        # Before anything is frozen: one parked thread per volume (crew.py).
        self.crew = Crew(len(self.specs), self._crashed)
        assert self.ctl is not None
        self.sel.register(self.ctl, selectors.EVENT_READ, "ctl")
        self.sel.register(self.listener, selectors.EVENT_READ, "listen")
        self.sel.register(self.wake_r, selectors.EVENT_READ, "wake")
        try:
            pidfd = os.pidfd_open(self.controller_pid)
            self.sel.register(pidfd, selectors.EVENT_READ, "pidfd")
        except (OSError, AttributeError):
            pidfd = None
        # Before anything is frozen: everyone else's freeze and thaw calls, as the kernel
        # sees them (docs/kernel.md §11); None where the kernel has none.
        own = {threading.get_native_id()} | {t.native_id or 0 for t in self.crew.threads}
        with contextlib.suppress(Exception):
            freezetrace.sweep_stale(set())
        if self.use_trace:
            self.trace = freezetrace.open_trace(f"quiesce-own-{os.getpid()}", own)
        if self.trace is not None:
            self.sel.register(self.trace.fileno(), selectors.EVENT_READ, "trace")
        send(self.ctl, {"ready": True, "pid": os.getpid()})
        while True:
            for key, _ in self.sel.select(self._next_timeout()):
                tag = key.data
                if tag == "ctl" and self.ctl is not None:
                    self._on_controller()
                elif tag == "pidfd":
                    self.sel.unregister(key.fileobj)
                    self._controller_died()
                elif tag == "listen":
                    self._accept()
                elif tag == "client" and key.fileobj in self.clients:
                    self._on_client(key.fileobj)
                elif tag == "trace":
                    self._read_trace()
                elif tag == "exit" and self.exit_watch is not None:
                    self._command_exited()
                elif tag == "wake":
                    with contextlib.suppress(BlockingIOError):
                        os.read(self.wake_r, 4096)
                    self._read_trace()
                    if self.crash is not None:
                        raise RuntimeError(self.crash)
                    while not self.finished.empty():
                        self._complete(self.finished.get())
            self._timers()
            self._tell_expiry()
            with self.lock:
                idle_over = self.core.idle_lease_over(_now()) and not self.pending
            if idle_over:
                self.crew.close()
                return  # a stuck controller that froze nothing: nothing to guard
            if self._should_exit():
                self._tell_expiry()
                self.crew.close()
                return

    def end_second_line(self) -> None:
        """Leaving: the watchdog ends too, unless something of ours may still be frozen
        (a FIFREEZE whose thread broke): then it stays, and thaws it by the deadline."""
        if self.second is None:
            return
        with self.lock:
            self._note_changes()
            at_stake = any(
                v.state in (VolState.FREEZING, VolState.FROZEN, VolState.THAWING)
                for v in self.core.vols
            )
        if not at_stake:
            self.second.stop()

    def remove_socket(self) -> None:
        """Last thing before exit (after every thaw: /run may be on a frozen volume)."""
        with contextlib.suppress(OSError):
            os.unlink(socket_file(os.getpid()), dir_fd=self.dir_fd)


def _closed(fd: int) -> int:
    """Close ``fd`` if it is one (errors ignored: it is ours to drop); -1, to store."""
    if fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)
    return -1


def _park(path: str) -> None:
    """Fault injection only (QUIESCE_FAULT=guardian:probe-parks=PATH): say so, then wait
    for PATH (bounded: a test that never releases it still ends)."""
    with open(path + ".parked", "w"):
        pass
    end = time.monotonic() + 60
    while not os.path.exists(path) and time.monotonic() < end:
        time.sleep(0.01)


def _is_pipe(fd: int) -> bool:
    try:
        return stat.S_ISFIFO(os.fstat(fd).st_mode)
    except OSError:
        return False


def _is_pidfd(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[pidfd]"
    except OSError:
        return False


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
    trace: bool = True,
) -> None:
    """The forked child's whole life: detach, guard, ``_exit``. Never returns.

    Any exception once the guardian exists ends in :meth:`_Guardian.last_resort`: the
    emergency thaw of what it froze, recorded, then exit 70."""
    code = 0
    guardian: _Guardian | None = None
    try:
        _detach_child({ctl.fileno(), dir_fd, *(v.fd for v in vols)})
        guardian = _Guardian(ctl, vols, timeout, lease, controller_pid, dir_fd)
        guardian.use_trace = trace
        guardian.run()
    except BaseException as e:
        code = 70
        if guardian is not None:
            with contextlib.suppress(BaseException):
                guardian.last_resort(e)
    finally:
        if guardian is not None:
            with contextlib.suppress(BaseException):
                guardian.end_second_line()
            with contextlib.suppress(BaseException):
                guardian.rcu.release()
            with contextlib.suppress(BaseException):
                if guardian.trace is not None:
                    guardian.trace.close()
            with contextlib.suppress(BaseException):
                guardian.remove_socket()
        os._exit(code)
