"""The guardian's rules, with no I/O: events in, actions out.

Everything the guardian decides lives here: the state of each volume, the deadline
(from the first FIFREEZE *call*, not its return), the lease, what an expiry thaws and in
which order, and **ownership**: the kernel records no owner for a freeze, so a freeze
is believed to be ours only while the kernel keeps confirming it. The shell (daemon.py,
and freezer.py's in-process executor) performs the ioctls this class asks for and feeds
their results back; a hypothesis state machine (tests/test_guardian_core.py) drives it
over every interleaving against a model of the kernel.

Ownership (docs/kernel.md §11):

* FIFREEZE answering ``EBUSY`` is a freeze that is not ours: ``foreign``, never thawed.
* While a volume is ``frozen`` the shell probes it every ``probe_interval``: a FIFREEZE
  that answers ``EBUSY`` means still frozen; one that succeeds means someone thawed our
  freeze (the probe's own freeze is undone at once). Every FITHAW of ours is preceded by
  the same probe (a *checked thaw*).
* Once a thaw by someone else has been seen, or cannot be ruled out, the volume is
  ``lost``: quiesce never issues FITHAW for it again, and says so.

The residual: a thaw *and* a refreeze by someone else between two probes looks like our
own freeze still standing. Measured bounds are in docs/kernel.md §11.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

PROBE_INTERVAL_NS = 10_000_000  # 10 ms: an EBUSY probe costs ~5 µs


class VolState(StrEnum):
    """A volume's state as the guardian knows it (the wire and `status` use the values)."""

    IDLE = "idle"  # nothing asked yet
    FREEZING = "freezing"  # our FIFREEZE is in the kernel
    FROZEN = "frozen"  # our freeze, confirmed by the kernel (probes)
    THAWING = "thawing"  # our FITHAW is in the kernel
    THAWED = "thawed"  # we thawed it
    FOREIGN = "foreign"  # FIFREEZE said EBUSY: someone else's freeze
    FAILED = "failed"  # FIFREEZE failed otherwise
    LOST = "lost"  # ours was thawed by someone else (or we cannot tell): never FITHAW again


HELD = frozenset({VolState.FREEZING, VolState.FROZEN, VolState.THAWING})


class Reason(StrEnum):
    """Why the guardian thawed on its own."""

    DEADLINE = "deadline"
    LEASE = "lease"
    CONTROLLER_DIED = "controller-died"
    CONTROLLER_FINISHED = "controller-finished-while-frozen"
    GUARDIAN_ERROR = "guardian-error"


# -- actions ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Thaw:
    """Checked thaw of volume ``idx``: probe, then FITHAW; report with ``thaw_returned``."""

    idx: int
    why: str


@dataclass(frozen=True)
class Probe:
    """FIFREEZE probe of volume ``idx`` (undone at once if it froze); ``probe_returned``."""

    idx: int


@dataclass(frozen=True)
class Lost:
    """Volume ``idx`` is no longer ours: tell the controller and the logs."""

    idx: int
    why: str
    at_ns: int


Action = Thaw | Probe | Lost


# -- state ----------------------------------------------------------------------------------


@dataclass
class Volume:
    """What the core knows of one volume."""

    inners: frozenset[int] = frozenset()  # volumes that must thaw after this one
    state: VolState = VolState.IDLE
    busy: bool = False  # an ioctl (freeze, thaw, probe) of ours is in the kernel
    busy_op: str = ""
    probe_due: bool = False  # a probe is queued on its thread
    thaw_on_return: bool = False  # `quiesce thaw` came while our FIFREEZE was in the kernel
    suspect_ns: int | None = None  # someone else's FITHAW, maybe of this volume, at this time
    clear_at_ns: int | None = None  # a probe started then found it frozen: decide on catch-up
    called_ns: int | None = None  # our FIFREEZE was called
    frozen_ns: int | None = None  # our FIFREEZE returned 0
    deferred_thaw: bool = False  # expiry came while a volume it waits on was busy
    lost_why: str | None = None
    lost_ns: int | None = None
    checked_ns: int | None = None  # the kernel last confirmed our freeze (EBUSY probe)
    superseded: bool = False  # a newer freeze of it began elsewhere: our story is history


@dataclass
class Expiry:
    reason: str
    at_ns: int


@dataclass
class GuardianCore:
    """The rules of one guardian. Not thread-safe: the shell holds its lock around calls."""

    inners: Sequence[frozenset[int]]
    timeout_ns: int
    lease_ns: int = 0  # 0: no lease
    now_ns: int = 0  # the guardian's start (monotonic)
    probe_interval_ns: int = PROBE_INTERVAL_NS
    vols: list[Volume] = field(init=False)
    deadline_ns: int | None = field(init=False, default=None)
    lease_until_ns: int | None = field(init=False, default=None)
    expiry: Expiry | None = field(init=False, default=None)
    detached: bool = field(init=False, default=False)
    controller_gone: bool = field(init=False, default=False)
    done: bool = field(init=False, default=False)
    next_probe_ns: int | None = field(init=False, default=None)
    # someone else's FIFREEZE calls: (ts, volume or None, who, thread id)
    foreign_freezes: list[tuple[int, int | None, str, int]] = field(
        init=False, default_factory=list
    )

    def __post_init__(self) -> None:
        self.vols = [Volume(inners=frozenset(i)) for i in self.inners]
        if self.lease_ns:
            self.lease_until_ns = self.now_ns + self.lease_ns

    # -- queries ---------------------------------------------------------------------------
    def held(self) -> list[int]:
        """Volumes whose freeze is (or may become) ours."""
        return [i for i, v in enumerate(self.vols) if v.state in HELD]

    def busy(self) -> list[int]:
        return [i for i, v in enumerate(self.vols) if v.busy]

    def may_thaw(self, i: int) -> bool:
        """The invariant: FITHAW only a freeze the kernel confirmed as ours (and none that
        someone else's thaw may have touched, until the trace has ruled that out)."""
        v = self.vols[i]
        return v.state == VolState.FROZEN and not v.busy and v.suspect_ns is None

    def thawable(self, devs_idx: Iterable[int]) -> list[int]:
        """Of these volumes, the ones a client's thaw may touch, in reverse plan order."""
        wanted = set(devs_idx)
        return [i for i in range(len(self.vols) - 1, -1, -1) if i in wanted and self.may_thaw(i)]

    def _blocked(self) -> set[int]:
        """Volumes that must not thaw yet: inners of a volume whose ioctl is in flight
        (thawing a loop-backed fs while its backing fs is frozen blocks in the kernel)."""
        return {j for v in self.vols if v.busy for j in v.inners}

    # -- the controller's requests -------------------------------------------------------
    def freeze_called(self, i: int, now: int) -> bool:
        """Our FIFREEZE of ``i`` is about to be issued. False: refused (expired, or not a
        volume that may be frozen now)."""
        v = self.vols[i]
        if self.expiry is not None or v.busy or v.state not in (VolState.IDLE, VolState.THAWED):
            return False
        v.state, v.busy, v.busy_op, v.called_ns = VolState.FREEZING, True, "freeze", now
        v.lost_why = v.lost_ns = None
        if self.deadline_ns is None:
            self.deadline_ns = now + self.timeout_ns  # from the first call, not its return
        return True

    def freeze_returned(self, i: int, code: int, now: int) -> list[Action]:
        v = self.vols[i]
        v.busy, v.busy_op = False, ""
        if code == 0:
            v.state, v.frozen_ns, v.checked_ns = VolState.FROZEN, now, now
            if self.next_probe_ns is None:
                self.next_probe_ns = now + self.probe_interval_ns
        elif code == errno.EBUSY:
            v.state = VolState.FOREIGN  # someone else's freeze: never ours to thaw
        else:
            v.state = VolState.FAILED
        if self.expiry is None and v.thaw_on_return and code == 0:
            v.thaw_on_return = False
            return [Thaw(i, "thaw asked while freezing")] if self.thaw_called(i) else []
        if self.expiry is None:
            return []
        # Returned after an expiry: thaw it now, with the inners that waited for it.
        if code == 0 and i not in self._blocked():
            v.deferred_thaw = True
        return self._release_deferred()

    def thaw_when_frozen(self, i: int) -> bool:
        """A thaw asked while our FIFREEZE is still in the kernel: thaw it the moment it
        returns (True), or nothing to do (False: not freezing)."""
        v = self.vols[i]
        if v.state != VolState.FREEZING:
            return False
        v.thaw_on_return = True
        return True

    def thaw_called(self, i: int) -> bool:
        """Our checked thaw of ``i`` is about to be issued (False: not ours to thaw)."""
        if not self.may_thaw(i):
            return False
        v = self.vols[i]
        v.state, v.busy, v.busy_op = VolState.THAWING, True, "thaw"
        return True

    def thaw_go(self, i: int) -> bool:
        """Right before a decided thaw's probe: False if someone else's thaw has made the
        volume suspect since it was decided (then call :meth:`thaw_skipped`)."""
        return self.vols[i].suspect_ns is None

    def thaw_skipped(self, i: int) -> list[Action]:
        """A decided thaw was not issued (suspect): back to frozen, probed at once; the
        trace's verdict decides whether it is still ours to thaw."""
        v = self.vols[i]
        v.state, v.busy, v.busy_op = VolState.FROZEN, False, ""
        v.deferred_thaw = v.deferred_thaw or self.expiry is not None
        if v.probe_due:
            return []
        v.probe_due = True
        return [Probe(i)]

    def thaw_returned(self, i: int, probe: int | None, code: int, now: int) -> list[Action]:
        """A checked thaw returned: ``probe`` is its FIFREEZE probe's errno (None: no probe
        was possible), ``code`` the FITHAW's (after a probe that froze: the undo's)."""
        v = self.vols[i]
        v.busy, v.busy_op, v.deferred_thaw = False, "", False
        acts: list[Action] = []
        if probe is not None and probe != errno.EBUSY:
            acts += self._lose(i, "thawed by someone else before quiesce's thaw", now)
        elif code == 0:
            v.state = VolState.THAWED
        elif code == errno.EINVAL:
            acts += self._lose(i, "thawed by someone else during quiesce's thaw", now)
        else:
            v.state = VolState.FROZEN  # still ours: the expiry retries
        return acts + self._release_deferred()

    # -- probes ------------------------------------------------------------------------------
    def probes_due(self, now: int) -> list[Action]:
        """Probe every frozen volume whose thread is free, every ``probe_interval``."""
        if self.next_probe_ns is None or now < self.next_probe_ns:
            return []
        acts: list[Action] = []
        for i, v in enumerate(self.vols):
            if v.state == VolState.FROZEN and not v.busy and not v.probe_due:
                v.probe_due = True  # marked busy only when it runs (probe_started)
                acts.append(Probe(i))
        self.next_probe_ns = now + self.probe_interval_ns if self._any_frozen() else None
        return acts

    def probe_started(self, i: int) -> bool:
        """A probe scheduled by ``probes_due`` is about to run on ``i``'s thread."""
        v = self.vols[i]
        v.probe_due = False
        if v.state != VolState.FROZEN or v.busy:
            return False
        v.busy, v.busy_op = True, "probe"
        return True

    def probe_returned(
        self, i: int, code: int, now: int, started: int | None = None
    ) -> list[Action]:
        """A probe's FIFREEZE answered ``code`` (0: it froze, and the shell undid it);
        ``started``: when the probe was issued (for a suspect volume's verdict)."""
        v = self.vols[i]
        v.busy, v.busy_op = False, ""
        acts: list[Action] = []
        if v.state == VolState.FROZEN:
            if code != errno.EBUSY:  # the probe froze it (undone by the shell), or it was not
                acts += self._lose(i, "thawed by someone else", now)
            elif v.suspect_ns is not None:
                if (started if started is not None else now) >= v.suspect_ns:
                    # Judged in trace_caught_up, against every freeze call up to the probe's
                    # *return*: its kernel entry may come later than its start (a busy CPU),
                    # after someone else's FIFREEZE began, and then EBUSY is theirs.
                    v.clear_at_ns = now
                elif not v.probe_due:  # it began before the thaw: says nothing of it
                    v.probe_due = True
                    acts.append(Probe(i))
            else:
                v.checked_ns = now
        return acts + self._release_deferred()

    # -- the trace (the kernel's word on every freeze and thaw call) -------------------
    def outside_call(
        self, op: str, i: int | None, ts: int, who: str, now: int, tid: int = 0
    ) -> list[Action]:
        """Someone else called FIFREEZE/FITHAW at ``ts`` on volume ``i`` (None: on a
        filesystem the trace could not name). A thaw that may be ours makes the volume
        suspect and probes it at once; a freeze is kept to judge the probe by, until
        the same thread's EBUSY answer (``op == "ebusy"``) shows it froze nothing."""
        targets = [i] if i is not None else range(len(self.vols))
        if op == "ebusy":
            for k in range(len(self.foreign_freezes) - 1, -1, -1):
                if self.foreign_freezes[k][3] == tid and self.foreign_freezes[k][0] <= ts:
                    del self.foreign_freezes[k]  # it answered EBUSY: it froze nothing
                    break
            return []
        if op == "freeze":
            self.foreign_freezes.append((ts, i, who, tid))
            del self.foreign_freezes[:-256]
            return []
        acts: list[Action] = []
        for j in targets:
            v = self.vols[j]
            if v.state not in (VolState.FROZEN, VolState.THAWING):
                continue  # (a thaw decided but not yet issued checks thaw_go first)
            if v.suspect_ns is None:
                v.suspect_ns = ts
            if v.state == VolState.FROZEN and not v.busy and not v.probe_due:
                v.probe_due = True
                acts.append(Probe(j))
        return acts

    def trace_caught_up(self, now: int) -> list[Action]:
        """Every call before ``now`` has been fed in: judge the suspect volumes whose probe
        found them frozen. Frozen, with a freeze call by someone else *on this volume*
        between that thaw and our probe: that freeze is theirs, not ours (lost). A call the
        trace could not attribute does not count here (on a busy machine most are another
        filesystem's, and a false "lost" would leave our own freeze standing); it only
        made the probe come at once. docs/kernel.md §11 gives the residual this leaves."""
        acts: list[Action] = []
        for j, v in enumerate(self.vols):
            if v.state != VolState.FROZEN or v.suspect_ns is None or v.clear_at_ns is None:
                continue
            if v.clear_at_ns > now:
                continue  # calls up to its probe are not all in yet
            refrozen = [
                who for ts, k, who, _tid in self.foreign_freezes
                if k == j and v.suspect_ns <= ts <= v.clear_at_ns
            ]  # fmt: skip
            if refrozen:
                why = f"thawed and frozen again by someone else ({refrozen[0]})"
                acts += self._lose(j, why, now)
            else:
                v.checked_ns = now
            v.suspect_ns = v.clear_at_ns = None
        return acts + self._release_deferred()

    def outside_thaw_seen(self, i: int, why: str, now: int) -> list[Action]:
        """Someone else's thaw of ``i`` is known (or cannot be ruled out)."""
        if self.vols[i].state in HELD:
            return self._lose(i, why, now)
        return []

    def _lose(self, i: int, why: str, now: int) -> list[Action]:
        v = self.vols[i]
        v.state, v.lost_why, v.lost_ns, v.deferred_thaw = VolState.LOST, why, now, False
        v.suspect_ns = v.clear_at_ns = None
        return [Lost(i, why, now)]

    def _any_frozen(self) -> bool:
        return any(v.state == VolState.FROZEN for v in self.vols)

    # -- time, lease, the controller -------------------------------------------------------
    def renew(self, now: int) -> None:
        if self.lease_ns and not self.detached:
            self.lease_until_ns = now + self.lease_ns

    def detach(self) -> None:
        self.detached = True
        self.lease_until_ns = None

    def tick(self, now: int) -> list[Action]:
        """Timers: the deadline and the lease, then probes."""
        acts: list[Action] = []
        if self.expiry is None and self.held():
            if self.deadline_ns is not None and now >= self.deadline_ns:
                acts += self.expire(Reason.DEADLINE, now)
            elif self.lease_until_ns is not None and now >= self.lease_until_ns:
                acts += self.expire(Reason.LEASE, now)
        if self.done and self.expiry is None and self.held() and not self.busy():
            acts += self.expire(Reason.CONTROLLER_FINISHED, now)
        return acts + self.probes_due(now)

    def controller_died(self, now: int) -> list[Action]:
        self.controller_gone = True
        if not self.detached and self.held():
            return self.expire(Reason.CONTROLLER_DIED, now)
        return []

    def finish(self, now: int) -> list[Action]:
        """The controller said it is done."""
        self.done = True
        return self.tick(now)

    def expire(self, reason: str, now: int) -> list[Action]:
        """Thaw everything of ours, now: the backing filesystems first (reverse plan
        order); a volume whose ioctl is in flight is thawed when it returns."""
        if self.expiry is not None:
            return self._release_deferred()
        self.expiry = Expiry(str(reason), now)
        for v in self.vols:
            if v.state in HELD:
                v.deferred_thaw = True
        return self._release_deferred()

    def _release_deferred(self) -> list[Action]:
        """Thaws an expiry owes that nothing blocks any more (reverse plan order). A
        volume handed to the shell is marked busy at once, so its inners wait for it."""
        if self.expiry is None:
            return []
        acts: list[Action] = []
        why = self.expiry.reason
        for i in range(len(self.vols) - 1, -1, -1):
            v = self.vols[i]
            if not v.deferred_thaw or i in self._blocked() or v.busy or v.suspect_ns is not None:
                continue
            if v.state != VolState.FROZEN:
                v.deferred_thaw = v.state in (VolState.FREEZING, VolState.THAWING)
                continue
            if self.thaw_called(i):
                acts.append(Thaw(i, why))
        return acts

    def retry_thaws(self) -> list[Action]:
        """After an expiry, a volume whose FITHAW failed is still ours: try again."""
        if self.expiry is None:
            return []
        for v in self.vols:
            if v.state == VolState.FROZEN:
                v.deferred_thaw = True
        return self._release_deferred()

    def next_timer(self, now: int) -> int | None:
        """The next instant ``tick`` can do something (None: only events wake us)."""
        t: list[int] = []
        if self.expiry is None and self.held():
            if self.deadline_ns is not None:
                t.append(self.deadline_ns)
            if self.lease_until_ns is not None:
                t.append(self.lease_until_ns)
        elif self.expiry is None and self.lease_until_ns is not None:
            t.append(self.lease_until_ns)
        if self.next_probe_ns is not None and self._any_frozen():
            t.append(self.next_probe_ns)
        return min(t) if t else None

    def idle_lease_over(self, now: int) -> bool:
        """A silent controller that froze nothing: nothing to guard, just leave."""
        return (
            self.expiry is None
            and self.lease_until_ns is not None
            and now >= self.lease_until_ns
            and not self.held()
            and not self.busy()
        )
