"""Freeze a group in plan order, roll back on partial failure, thaw in reverse.

The ioctls go through the guardian (see guardian/) unless ``guardian=False``. Inside
the window this module writes nothing to any filesystem: no logging, no bytecode
(``sys.dont_write_bytecode``), no temp files; everything it learns goes into the
:class:`Window` that the caller reads after the thaw.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from quiesce.errors import (
    AlreadyFrozen,
    FreezeBroken,
    FreezeExpired,
    GuardianError,
    QuiesceError,
    ThawFailed,
)
from quiesce.freezing.guardian import (
    DEFAULT_LEASE,
    DEFAULT_TIMEOUT,
    GuardedVolume,
    GuardianHandle,
    check_seconds,
    expedite,
    holder_of,
    records,
)
from quiesce.freezing.guardian.core import GuardianCore, VolState
from quiesce.freezing.guardian.crew import Crew
from quiesce.freezing.guardian.expedite import Expedite
from quiesce.freezing.plan import GroupMember, Plan, make_plan, waves
from quiesce.host import kernel
from quiesce.host.mounts import MountTable
from quiesce.host.signals import signals_deferred

FAULT_ENV = "QUIESCE_FAULT"
"""Fault injection for tests: ``QUIESCE_FAULT=<phase>`` makes the controller SIGSTOP
itself at that phase so a test can SIGKILL it there, deterministically. Phases:
``prepare`` (guardian started, nothing frozen), ``freeze:N`` (after the N-th freeze),
``window`` (all frozen), ``thaw:N`` (after the N-th thaw), ``fail`` (a freeze failed, before
the rollback). ``guardian:raise`` makes the guardian raise on its next client request.
Several, comma-separated: ``freeze:1,guardian:raise``."""


@dataclass
class VolumeResult:
    """What happened to one volume of the group."""

    mount_point: str
    paths: list[str]
    dev: str
    fstype: str
    state: str = "pending"
    # pending frozen thawed skipped foreign failed not-attempted rolled-back thaw-failed
    thawed_by: str | None = None  # "controller" | "guardian" | "someone-else"
    syncfs_s: float | None = None
    freeze_s: float | None = None
    thaw_s: float | None = None
    frozen_for_s: float | None = None
    error: str | None = None
    _frozen_ns: int | None = field(default=None, repr=False)


@dataclass
class Window:
    """The freeze window of one group: per-volume results and the stall writers felt."""

    volumes: list[VolumeResult]
    start_ns: int | None = None  # first FIFREEZE issued
    end_ns: int | None = None  # last FITHAW returned
    thawed_by: str | None = None
    expired_reason: str | None = None
    guardian_pid: int | None = None
    warnings: list[str] = field(default_factory=list)
    # expedited RCU grace periods while freezing: on, off (not asked), already-on (the
    # admin's setting), unavailable (read-only /sys, rcu_normal=1); None: nothing frozen
    expedite: str | None = None
    syncfs: str | None = None  # done, off, or "skipped: N MiB dirty machine-wide"
    waves: list[list[str]] = field(default_factory=list)  # mount points frozen together

    @property
    def duration(self) -> float | None:
        """Seconds from the first freeze to the last thaw (so far, while open)."""
        if self.start_ns is None:
            return None
        end = self.end_ns if self.end_ns is not None else time.monotonic_ns()
        return (end - self.start_ns) / 1e9

    @property
    def frozen(self) -> list[VolumeResult]:
        return [v for v in self.volumes if v.state == "frozen"]

    def to_dict(self) -> dict[str, Any]:
        vols = []
        for v in self.volumes:
            d = asdict(v)
            d.pop("_frozen_ns", None)
            vols.append(d)
        return {
            "window_s": self.duration,
            "thawed_by": self.thawed_by,
            "expired_reason": self.expired_reason,
            "guardian_pid": self.guardian_pid,
            "expedite": self.expedite,
            "syncfs": self.syncfs,
            "waves": self.waves,
            "volumes": vols,
            "warnings": self.warnings,
        }


class _InProcess:
    """The executor without a guardian: the same core's rules (ownership, checked thaws),
    no watchdog (no deadline, no lease)."""

    pid = None
    expired = None

    def __init__(self, vols: Sequence[GuardedVolume]) -> None:
        self.vols = vols
        self.core = GuardianCore(
            inners=[v.inners for v in vols], timeout_ns=1 << 62, now_ns=time.monotonic_ns()
        )
        self.lock = threading.Lock()
        self.rcu = Expedite(os.getpid())
        self.crew = Crew(len(vols), lambda i, e: None, name="quiesce-ioctl")

    def freeze(self, idx: int) -> dict[str, Any]:
        with self.lock:
            go = self.core.freeze_called(idx, time.monotonic_ns())
        if not go:
            return {"ok": False, "errno": errno.EBUSY, "error": "already frozen by this run"}
        t0 = time.monotonic_ns()
        code = kernel.freeze_errno(self.vols[idx].fd)
        t1 = time.monotonic_ns()
        with self.lock:
            self.core.freeze_returned(idx, code, t1)
        return {"ok": code == 0, "errno": code, "start": t0, "end": t1}

    def thaw(self, idx: int) -> dict[str, Any]:
        with self.lock:
            go = self.core.thaw_called(idx)
            v = self.core.vols[idx]
        if not go:
            return {"ok": False, "errno": errno.EINVAL, "lost": v.lost_why or "not frozen by us"}
        t0 = time.monotonic_ns()
        probe, code = kernel.checked_thaw_errno(self.vols[idx].fd)
        t1 = time.monotonic_ns()
        with self.lock:
            self.core.thaw_returned(idx, probe, code, t1)
        res: dict[str, Any] = {
            "ok": v.state == VolState.THAWED,
            "errno": code,
            "start": t0,
            "end": t1,
        }
        if v.state == VolState.LOST:
            res["lost"] = v.lost_why
        return res

    def poll_lost(self) -> list[dict[str, Any]]:
        return []

    def freeze_wave(self, idxs: Sequence[int], expedite: str = "") -> dict[str, Any]:
        return _run_wave(self.crew, self.freeze, idxs, expedite, self.rcu)

    def thaw_wave(self, idxs: Sequence[int]) -> dict[str, Any]:
        return _run_wave(self.crew, self.thaw, idxs, "", None)

    def poll_expired(self) -> None:
        return None

    def detach(self) -> None:
        raise QuiesceError("a held freeze needs the guardian", "use guardian=True")

    def close(self) -> None:
        self.rcu.release()
        self.crew.close()
        self.crew.join(CREW_JOIN_S)


CREW_JOIN_S = 1.0  # at close: threads still in an ioctl after this are left (daemon threads)


def _run_wave(
    crew: Crew,
    one: Callable[[int], dict[str, Any]],
    idxs: Sequence[int],
    expedite: str,
    rcu: Expedite | None,
) -> dict[str, Any]:
    """The guardian's wave, in this process: each volume on its parked thread."""
    results: dict[str, dict[str, Any]] = {}
    ok = False
    left = [len(idxs)]
    count = threading.Lock()
    done = threading.Event()

    def run(i: int) -> None:
        try:
            results[str(i)] = one(i)
        except Exception as e:
            code = e.errno if isinstance(e, OSError) and e.errno else errno.EIO
            results[str(i)] = {"ok": False, "errno": code, "error": str(e)}
        finally:
            with count:
                left[0] -= 1
                if not left[0]:
                    done.set()

    try:
        if rcu is not None and expedite in ("set", "set-restore"):
            rcu.acquire()
        for i in idxs:
            crew.submit(i, functools.partial(run, i))
        done.wait()
        ok = len(results) == len(idxs) and all(r.get("ok") for r in results.values())
    finally:
        if rcu is not None and (expedite in ("restore", "set-restore") or not ok):
            rcu.release()
    state = rcu.state if rcu is not None else None
    reason = rcu.reason if rcu is not None else None
    return {"ok": ok, "results": results, "expedite": state, "expedite_reason": reason}


SYNCFS_SKIP_BELOW = 4 << 20  # bytes dirty machine-wide (see Freezer._presync)


def dirty_bytes() -> int | None:
    """Dirty + Writeback pages machine-wide (/proc/meminfo): an upper bound of what any
    one volume has to flush, read in microseconds."""
    try:
        with open("/proc/meminfo", "rb") as f:
            data = f.read()
    except OSError:
        return None
    total = 0
    for line in data.splitlines():
        if line.startswith((b"Dirty:", b"Writeback:")):
            total += int(line.split()[1]) * 1024
    return total


# (first wave, last wave) -> what the guardian does with rcu_expedited around the wave
_EXPEDITE_STEP = {(True, True): "set-restore", (True, False): "set", (False, True): "restore"}


def _volume_result(reply: dict[str, Any], k: int) -> dict[str, Any]:
    """Volume ``k``'s part of a wave's reply (a refused wave: its expiry or error)."""
    res = (reply.get("results") or {}).get(str(k))
    if isinstance(res, dict):
        return res
    if reply.get("expired"):
        return {"ok": False, "expired": reply["expired"]}
    return {"ok": False, "errno": errno.EIO, "error": reply.get("error")}


def _fault_point(phase: str, wanted: str | None) -> None:
    if wanted is not None and phase in wanted.split(","):
        os.kill(os.getpid(), signal.SIGSTOP)


def _second_run(m: GroupMember, ours: int | None) -> AlreadyFrozen | None:
    """An EBUSY from another quiesce run's freeze, told as such (whose, for how long)."""
    st = holder_of(m.volume.dev, exclude=ours)
    if st is None:
        return None
    who = "held by `quiesce freeze`" if st["detached"] else f"run pid {st['controller_pid']}"
    left = st.get("deadline_remaining_s")
    until = f"; its guardian thaws it within {max(left, 0):.0f} s" if left is not None else ""
    return AlreadyFrozen(
        f"{m.name} ({m.volume.fstype}) is already frozen by another quiesce run "
        f"(guardian {st['pid']}, {who}){until}",
        f"wait for that run to finish, or end it now with `quiesce thaw {m.name}`",
    )


class Freezer:
    """Freezes and thaws one plan's group. Use :func:`freeze` unless you need the parts."""

    def __init__(
        self,
        plan: Plan,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        lease: float = DEFAULT_LEASE,
        syncfs: bool = True,
        guardian: bool = True,
        expedite: bool = True,
        concurrent: bool = True,
        trace: bool = True,
    ) -> None:
        """``trace``: the guardian watches everyone's FIFREEZE/FITHAW calls besides probing
        its freezes (docs/kernel.md §11). ``expedite``: expedited RCU grace
        periods while the group freezes (machine-wide,
        restored at once; see guardian/expedite.py). ``concurrent``: freeze volumes with
        no order between them at once (False: one after another, in plan order)."""
        plan.check()
        self.plan = plan
        self.timeout = check_seconds("timeout", timeout)
        self.lease = check_seconds("lease", lease, zero_ok=True)
        self.syncfs = syncfs
        self.use_guardian = guardian
        self.expedite = expedite
        self.concurrent = concurrent
        self.trace = trace
        self.members: list[GroupMember] = [m for m in plan.members if not m.skip]
        self.results = [
            VolumeResult(m.name, m.paths, m.volume.dev, m.volume.fstype) for m in self.members
        ]
        self.window = Window(
            volumes=[*self.results],
            warnings=[*plan.warnings],
        )
        for m in plan.members:
            if m.skip:
                self.window.volumes.append(
                    VolumeResult(m.name, m.paths, m.volume.dev, m.volume.fstype, state="skipped",
                                 error=m.skip)
                )  # fmt: skip
        self.waves = (
            waves(plan, self.members) if concurrent else [[k] for k in range(len(self.members))]
        )
        self.window.waves = [[self.members[k].name for k in w] for w in self.waves]
        self._exec: GuardianHandle | _InProcess | None = None
        self.gate_released_ns: int | None = None  # the guardian released freeze()'s gate
        self._fault = os.environ.get(FAULT_ENV) or None
        self._saved_bytecode = sys.dont_write_bytecode

    def _specs(self) -> list[GuardedVolume]:
        index = {m.volume.dev: i for i, m in enumerate(self.members)}
        return [
            GuardedVolume(
                fd=m.fd,
                name=m.name,
                fstype=m.volume.fstype,
                dev=m.volume.dev,
                inners=frozenset(index[d] for d in self.plan.inners(m.volume.dev) if d in index),
            )
            for m in self.members
        ]

    # -- freeze --------------------------------------------------------------------------
    def arm(self) -> None:
        """Everything before the first FIFREEZE: start the guardian, pre-flush (syncfs).

        ``freeze()`` arms first if this was not called; calling it ahead lets the freeze
        itself be only the ioctls, at a chosen instant (a fleet group's hosts freeze at an
        agreed time). The guardian's deadline runs from its start."""
        if self._exec is not None or not self.members:
            return
        sys.dont_write_bytecode = True  # no .pyc may land on a frozen volume
        specs = self._specs()
        if self.use_guardian:
            self._exec = GuardianHandle.start(
                specs, timeout=self.timeout, lease=self.lease, trace=self.trace
            )
            self.window.guardian_pid = self._exec.pid
        else:
            self._exec = _InProcess(specs)
        _fault_point("prepare", self._fault)
        self._check_run_dir()
        self._presync()

    def disarm(self) -> None:
        """Give up after ``arm`` and before ``freeze``: the guardian ends, nothing was frozen."""
        if any(r.state not in ("pending", "skipped") for r in self.results):
            raise QuiesceError("disarm after a freeze", "thaw the group instead")
        self._finish()
        self._exec = None

    def freeze(self, gate_fd: int | None = None, exit_fd: int | None = None) -> Window:
        """Arm (guardian, syncfs) unless armed, then freeze the group wave by wave (plan
        order).

        ``gate_fd``: the write end of a waiting command's gate (proc.Gated). The guardian
        writes one byte to it the moment the last FIFREEZE of the group has returned and
        every volume is frozen, with no hop through this process; ``gate_released_ns``
        then says when (None: not released, e.g. without a guardian: release it yourself).
        ``exit_fd``: that command's pidfd: once released, its exit makes the guardian thaw
        the last wave at once (the checked thaw :meth:`thaw` would ask for; ``thaw`` then
        gets its answer), with no hop through this process.

        On failure, the volumes frozen so far are thawed at once and the typed error of
        the failing volume is raised, naming every volume's outcome.
        """
        if not self.members:  # every volume skipped (read-only): nothing to guard
            self.window.thawed_by = None
            return self.window
        self.arm()
        with signals_deferred(), self._abort_on_surprise():
            n = len(self.waves)
            for w, wave in enumerate(self.waves):
                first, last = w == 0, w == n - 1
                how = _EXPEDITE_STEP.get((first, last), "") if self.expedite else ""
                assert self._exec is not None  # armed above
                if last and gate_fd is not None and isinstance(self._exec, GuardianHandle):
                    reply = self._exec.freeze_wave(wave, how, gate_fd=gate_fd, exit_fd=exit_fd)
                    gate = reply.get("gate_ns")
                    self.gate_released_ns = gate if isinstance(gate, int) else None
                else:
                    reply = self._exec.freeze_wave(wave, how)
                self._note_expedite(reply)
                failures = []
                for k in wave:
                    res = _volume_result(reply, k)
                    r = self.results[k]
                    if res.get("ok"):
                        r.state = "frozen"
                        r.freeze_s = (res["end"] - res["start"]) / 1e9
                        r._frozen_ns = res["end"]
                        if self.window.start_ns is None or res["start"] < self.window.start_ns:
                            self.window.start_ns = res["start"]
                    else:
                        failures.append((k, res))
                if failures:
                    self._fail(failures)
                _fault_point(f"freeze:{w + 1}", self._fault)
        _fault_point("window", self._fault)
        return self.window

    def _check_run_dir(self) -> None:
        """The expediting record lives in the guardians' run directory, written when the
        last FIFREEZE returns: if that directory is on a volume of the group (allowed with
        allow_self), the write would hang. Then do not expedite."""
        if not self.expedite:
            return
        where = expedite.record_dir()
        vol = MountTable.read().volume_of_path(where)
        if vol is not None and any(m.volume.dev == vol.dev for m in self.members):
            self.expedite = False
            self.window.expedite = "unavailable"
            self.window.warnings.append(
                f"expedited RCU grace periods unavailable ({where} is on a volume "
                "of the group): froze with normal grace periods (a longer window)"
            )

    def _presync(self) -> None:
        """syncfs every volume at once, so that FIFREEZE only flushes the remainder.

        Skipped when expediting and the whole machine has less than SYNCFS_SKIP_BELOW
        dirty: then the freeze's own flush is short, and a syncfs would only stall an
        fsync'ing writer (a journal commit and a device flush) outside the window."""
        if not self.syncfs:
            self.window.syncfs = "off"
            return
        dirty = dirty_bytes()
        if self.expedite and dirty is not None and dirty < SYNCFS_SKIP_BELOW:
            self.window.syncfs = f"skipped: {dirty / 2**20:.1f} MiB dirty machine-wide"
            return
        self.window.syncfs = "done"

        def one(m: GroupMember, r: VolumeResult) -> None:
            t0 = time.monotonic_ns()
            try:
                kernel.syncfs(m.fd)
            except OSError as e:
                self.window.warnings.append(f"syncfs {m.name} failed: {e.strerror}")
            r.syncfs_s = (time.monotonic_ns() - t0) / 1e9

        pairs = list(zip(self.members, self.results, strict=True))
        threads = [threading.Thread(target=one, args=p, daemon=True) for p in pairs[1:]]
        for t in threads:
            t.start()
        one(*pairs[0])
        for t in threads:
            t.join()

    def _note_expedite(self, reply: dict[str, Any]) -> None:
        if not self.expedite:
            self.window.expedite = self.window.expedite or "off"
            return
        state = reply.get("expedite")
        if state not in ("on", "already-on", "unavailable", "off"):
            return
        if state == "unavailable" and self.window.expedite != "unavailable":
            self.window.warnings.append(
                f"expedited RCU grace periods unavailable ({reply.get('expedite_reason')}): "
                "froze with normal grace periods (a longer window)"
            )
        if self.window.expedite in (None, "off"):
            self.window.expedite = state

    @contextlib.contextmanager
    def _abort_on_surprise(self) -> Iterator[None]:
        """An unexpected error mid-group (lost guardian, a bug) must not leave anything
        frozen: thaw what we know we froze, then let the guardian undo the rest."""
        try:
            yield
        except QuiesceError as e:
            if e.outcomes is None:  # not already rolled back by _fail
                self._emergency_unwind()
            raise
        except BaseException:
            self._emergency_unwind()
            raise

    def _emergency_unwind(self) -> None:
        assert self._exec is not None
        for k in range(len(self.results) - 1, -1, -1):
            r = self.results[k]
            if r.state == "frozen":
                with contextlib.suppress(Exception):
                    res = self._thaw_member(k)
                    if res.get("ok") or res.get("expired"):
                        r.state = "rolled-back"
        self._finish()

    def _thaw_member(self, k: int) -> dict[str, Any]:
        """Thaw volume ``k`` through the guardian; if the guardian is lost (dead, stopped,
        not answering), with our own FITHAW on the fd we hold. Only for a volume we froze
        (state "frozen": never one that answered EBUSY), and never after the guardian
        said it thawed on its own (someone else may have frozen it since)."""
        assert self._exec is not None
        try:
            return self._exec.thaw(k)
        except GuardianError as e:
            if self.results[k].state != "frozen":
                raise
            expired = self._exec.poll_expired()
            if expired:
                return {"ok": False, "expired": expired}
            m = self.members[k]
            t0 = time.monotonic_ns()
            probe, code = kernel.checked_thaw_errno(m.fd)
            note = f"the guardian was lost ({e.message}): {m.name} thawed with quiesce's own FITHAW"
            if note not in self.window.warnings:
                self.window.warnings.append(note)
            res: dict[str, Any] = {"ok": probe == errno.EBUSY and code == 0, "errno": code}
            if self.window.guardian_pid is not None:  # its watchdog must leave it alone now
                with contextlib.suppress(Exception):
                    records.mark_thawed(self.window.guardian_pid, [m.volume.dev])
            if probe != errno.EBUSY:
                res["lost"] = "thawed by someone else before quiesce's thaw"
            return res | {"start": t0, "end": time.monotonic_ns()}

    def _fail(self, failures: list[tuple[int, dict[str, Any]]]) -> None:
        """Some volumes of a wave did not freeze: thaw every volume frozen so far (reverse
        waves), raise the first failure's typed error (plan order)."""
        assert self._exec is not None
        cause: QuiesceError | None = None
        cause_k = failures[0][0]
        for k, res in failures:
            m, r = self.members[k], self.results[k]
            if res.get("expired"):
                why = str(res["expired"].get("reason"))
                err: QuiesceError = (GuardianError if why.startswith("guardian-error") else
                                     FreezeExpired)(
                    f"the guardian thawed the group while {m.name} was being frozen ({why})"
                )  # fmt: skip
            else:
                code = res.get("errno", errno.EIO)
                err = kernel.error_for(code, "freeze", m.name, m.volume.fstype)
                r.state = "foreign" if code == errno.EBUSY else "failed"
            r.error = err.message
            if cause is None:
                cause = err
        assert cause is not None
        tried = {k for k, _ in failures}
        for j, r in enumerate(self.results):
            if r.state == "pending" and j not in tried:
                r.state = "not-attempted"
        rolled = []
        _fault_point("fail", self._fault)
        for wave in reversed(self.waves):
            ks = [j for j in wave if self.results[j].state == "frozen"]
            for j, back in self._thaw_wave(ks).items():
                rj = self.results[j]
                if back.get("ok") or back.get("expired"):
                    rj.state = "rolled-back"
                    rj.thawed_by = "guardian" if back.get("expired") else "controller"
                    rolled.append(f"{rj.mount_point} thawed")
                else:
                    rj.state = "thaw-failed"
                    rj.error = kernel.error_for(
                        back.get("errno", errno.EIO), "thaw", rj.mount_point
                    ).message
                    rolled.append(f"{rj.mount_point} STILL FROZEN ({rj.error})")
        self.window.end_ns = time.monotonic_ns()
        ours = self.window.guardian_pid
        self._finish()
        m, r = self.members[cause_k], self.results[cause_k]
        if r.state == "foreign":  # after the rollback: asking costs no window time
            cause = _second_run(m, ours) or cause
            r.error = cause.message
        if rolled:
            cause.add_context("rolled back: " + ", ".join(rolled))
        cause.window = self.window
        cause.outcomes = {v.mount_point: v.state for v in self.results}
        raise cause

    def _thaw_wave(self, ks: Sequence[int]) -> dict[int, dict[str, Any]]:
        """Thaw volumes ``ks`` (one wave) at once; a lost guardian: one by one, by us."""
        assert self._exec is not None
        if not ks:
            return {}
        try:
            reply = self._exec.thaw_wave(ks)
        except GuardianError:
            return {k: self._thaw_member(k) for k in sorted(ks, reverse=True)}
        return {k: _volume_result(reply, k) for k in sorted(ks, reverse=True)}

    # -- thaw ----------------------------------------------------------------------------
    def expired(self) -> dict[str, Any] | None:
        """The guardian's story if it has thawed on its own (deadline, lease), else None."""
        return self._exec.poll_expired() if self._exec is not None else None

    def thaw(self, *, raise_errors: bool = True) -> Window:
        """Thaw in reverse order. Raises FreezeExpired if the guardian got there first,
        ThawFailed if a volume could not be thawed."""
        if self._exec is None:  # nothing was frozen
            return self.window
        failed: list[VolumeResult] = []
        broken: list[VolumeResult] = []
        with signals_deferred():
            for n, wave in enumerate(reversed(self.waves), start=1):
                ks = [k for k in wave if self.results[k].state == "frozen"]
                if not ks:
                    continue
                for k, res in self._thaw_wave(ks).items():
                    r = self.results[k]
                    if res.get("expired"):
                        continue  # filled in below from the guardian's account
                    code = res.get("errno", errno.EIO)
                    if res.get("ok"):
                        r.state, r.thawed_by = "thawed", "controller"
                    elif res.get("lost") or code == errno.EINVAL:
                        r.state, r.thawed_by = "thawed", "someone-else"
                        broken.append(r)
                        if "end" not in res:
                            continue  # refused: quiesce issued no FITHAW
                    else:
                        r.state = "thaw-failed"
                        r.error = kernel.error_for(code, "thaw", r.mount_point, r.fstype).message
                        failed.append(r)
                        continue
                    r.thaw_s = (res["end"] - res["start"]) / 1e9
                    if r._frozen_ns is not None:
                        r.frozen_for_s = (res["start"] - r._frozen_ns) / 1e9
                    if self.window.end_ns is None or res["end"] > self.window.end_ns:
                        self.window.end_ns = res["end"]
                _fault_point(f"thaw:{n}", self._fault)
        expired = self._exec.expired
        seen = {e["dev"]: e for e in self._exec.poll_lost()}
        self._finish()
        if expired:
            self._apply_expiry(expired)
        else:
            self.window.thawed_by = "controller"
        for r in self.results:
            if r.dev in seen and r.thawed_by != "someone-else":
                r.state, r.thawed_by = "thawed", "someone-else"
                broken.append(r)
        for r in broken:
            at = seen.get(r.dev, {}).get("at")
            when = time.strftime("%H:%M:%S", time.localtime(at)) if at else "before the thaw"
            r.error = f"thawed by someone else during the window (seen {when})"
            self.window.warnings.append(
                f"{r.mount_point} was thawed by someone else during the window (seen {when}): "
                "the snapshot is not consistent, and quiesce did not thaw that freeze again"
            )
        if not raise_errors:
            return self.window
        if broken:
            raise FreezeBroken(
                "; ".join(f"{r.mount_point} {r.error}" for r in broken)
                + ": whatever was snapshotted is not consistent",
                window=self.window,
            )
        if failed:
            raise ThawFailed(
                "; ".join(f"{r.mount_point}: {r.error}" for r in failed), window=self.window
            )
        if expired:
            raise FreezeExpired(
                f"the guardian thawed {', '.join(r.mount_point for r in self.results)} before "
                f"quiesce did ({expired.get('reason')}; timeout {self.timeout:g}s, "
                f"lease {self.lease:g}s)",
                window=self.window,
            )
        return self.window

    def _apply_expiry(self, expired: dict[str, Any]) -> None:
        self.window.thawed_by = "guardian"
        self.window.expired_reason = expired.get("reason")
        by_dev = {t.get("dev"): t for t in expired.get("thawed", [])}
        for r in self.results:
            if r.state != "frozen":
                continue
            r.state, r.thawed_by = "thawed", "guardian"
            t = by_dev.get(r.dev)
            if t:
                r.frozen_for_s = t.get("held_s")
                end = t.get("end")
                if end and (self.window.end_ns is None or end > self.window.end_ns):
                    self.window.end_ns = end
        if self.window.end_ns is None:
            self.window.end_ns = time.monotonic_ns()

    def hold(self) -> Window:
        """Leave the group frozen under the guardian (for `quiesce freeze`)."""
        if self._exec is None:  # nothing was frozen
            return self.window
        self._exec.detach()
        self._exec = None
        sys.dont_write_bytecode = self._saved_bytecode
        return self.window

    def __enter__(self) -> Window:
        """``with Freezer(plan) as window:`` freezes; leaving the block thaws."""
        return self.freeze()

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is None:
            self.thaw()  # ThawFailed, FreezeExpired, FreezeBroken propagate
            return
        try:
            self.thaw(raise_errors=False)
        finally:
            if any(r.state == "thaw-failed" for r in self.window.volumes):
                exc.add_note("quiesce: some volumes could not be thawed; see quiesce status")

    def _finish(self) -> None:
        if self._exec is not None:
            self._exec.close()
        sys.dont_write_bytecode = self._saved_bytecode


@contextlib.contextmanager
def freeze(
    paths: str | Sequence[str],
    timeout: float = DEFAULT_TIMEOUT,
    *,
    lease: float = DEFAULT_LEASE,
    allow_self: bool = False,
    syncfs: bool = True,
    guardian: bool = True,
    expedite: bool = True,
    concurrent: bool = True,
    trace: bool = True,
) -> Iterator[Window]:
    """Freeze the filesystems mounted at ``paths`` as one group; thaw on exit.

    The guardian thaws the group if ``timeout`` seconds pass after the first freeze, if
    this process stops renewing its ``lease``, or if it dies. Leaving the block after
    such a thaw raises :class:`FreezeExpired`: whatever was snapshotted after it is not
    consistent. Thaws on exceptions and KeyboardInterrupt too. ``expedite``,
    ``concurrent`` and ``trace``: see :class:`Freezer`.
    """
    if isinstance(paths, str | os.PathLike):
        paths = [os.fspath(paths)]
    with (
        make_plan([os.fspath(p) for p in paths], allow_self=allow_self) as plan,
        Freezer(
            plan,
            timeout=timeout,
            lease=lease,
            syncfs=syncfs,
            guardian=guardian,
            expedite=expedite,
            concurrent=concurrent,
            trace=trace,
        ) as window,
    ):
        yield window
