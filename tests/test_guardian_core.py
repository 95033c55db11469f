"""The guardian's pure core against a model of the kernel, over every interleaving.

The model knows what the kernel does not record: *who* holds each freeze. Hypothesis
drives the core (quiesce.freezing.guardian.core) with the controller's requests, time,
the controller's death, ioctls that stay in the kernel for a while, and a third party's
FIFREEZE/FITHAW, executing every action the core asks for against the model. The rules
checked after every step:

* quiesce never FITHAWs a freeze that is not its own (the model's holder is checked at
  the moment of every FITHAW the core asks for);
* a freeze of quiesce's never outlives the deadline (or the controller) once the core's
  timers ran, except a FIFREEZE still in the kernel;
* a volume the core calls ``frozen`` is one the kernel really holds for quiesce.

The residual the docs state (a thaw *and* a refreeze by someone else between two
probes looks like our own freeze) is the model's one assumption: a third party's
refreeze of a volume quiesce held needs a probe (or a thaw of ours) in between. Without
that assumption the machine finds the residual at once (test_the_residual_is_real).
"""

from __future__ import annotations

import errno

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from quiesce.freezing.guardian.core import (
    HELD,
    GuardianCore,
    Lost,
    Probe,
    Thaw,
    VolState,
)

N = 3
TIMEOUT = 1_000
LEASE = 300
MS = 1


class Kernel:
    """One superblock per volume: frozen or not, and (the model's secret) by whom."""

    def __init__(self, n: int) -> None:
        self.holder: list[str | None] = [None] * n
        self.bad_thaws: list[str] = []

    def fifreeze(self, i: int, who: str) -> int:
        if self.holder[i] is not None:
            return errno.EBUSY
        self.holder[i] = who
        return 0

    def fithaw(self, i: int, who: str) -> int:
        if self.holder[i] is None:
            return errno.EINVAL
        if who == "quiesce" and self.holder[i] != "quiesce":
            self.bad_thaws.append(f"volume {i}: thawed {self.holder[i]}'s freeze")
        self.holder[i] = None
        return 0

    def checked_thaw(self, i: int) -> tuple[int, int]:
        probe = self.fifreeze(i, "quiesce")
        if probe == errno.EBUSY:
            return probe, self.fithaw(i, "quiesce")
        if probe == 0:
            return probe, self.fithaw(i, "quiesce")  # undo the probe's own freeze
        return probe, errno.EINVAL


class CoreMachine(RuleBasedStateMachine):
    # Set by a subclass to drop the one assumption (the residual test), or to report
    # every call by someone else to the core, as the kernel's trace does.
    assume_probe_between = True
    traced = False

    def __init__(self) -> None:
        super().__init__()
        self.now = 0
        # inners: volume 0 lives on an image stored on volume 1 (thaw 1 before 0)
        self.core = GuardianCore(
            inners=[frozenset(), frozenset({0}), frozenset()],
            timeout_ns=TIMEOUT,
            lease_ns=LEASE,
            now_ns=0,
            probe_interval_ns=10,
        )
        self.kernel = Kernel(N)
        self.in_flight: dict[int, str] = {}  # volume -> "freeze" | "thaw" | "probe"
        self.queued: list[Thaw | Probe] = []  # actions the shell has not run yet
        self.needs_probe = [False] * N  # a third party thawed a freeze of ours
        self.lost_told: set[int] = set()
        self.tid = 0  # the third party's calls, one thread each

    # -- the shell ------------------------------------------------------------------------
    def run(self, acts: list) -> None:
        for a in acts:
            if isinstance(a, Lost):
                self.lost_told.add(a.idx)
            else:
                self.queued.append(a)

    @rule(data=st.data())
    @precondition(lambda self: self.queued)
    def shell_runs_an_action(self, data: st.DataObject) -> None:
        a = self.queued.pop(data.draw(st.integers(0, len(self.queued) - 1)))
        if isinstance(a, Thaw):
            if not self.core.thaw_go(a.idx):
                self.run(self.core.thaw_skipped(a.idx))
                return
            probe, code = self.kernel.checked_thaw(a.idx)
            self.needs_probe[a.idx] = False
            self.run(self.core.thaw_returned(a.idx, probe, code, self.now))
        elif self.core.probe_started(a.idx):
            code = self.kernel.fifreeze(a.idx, "quiesce")
            if code == 0:
                self.kernel.fithaw(a.idx, "quiesce")
            self.needs_probe[a.idx] = False
            self.run(self.core.probe_returned(a.idx, code, self.now, self.now))
            self.after_probe()

    def after_probe(self) -> None:
        """The shell reads the trace after a probe, then the core judges."""
        if self.traced:
            self.run(self.core.trace_caught_up(self.now))

    # -- the controller -----------------------------------------------------------------------
    @rule(i=st.integers(0, N - 1))
    def controller_calls_freeze(self, i: int) -> None:
        if i not in self.in_flight and self.core.freeze_called(i, self.now):
            self.in_flight[i] = "freeze"

    @rule(i=st.integers(0, N - 1))
    def controller_calls_thaw(self, i: int) -> None:
        """The shell issues a controller's checked thaw right after the core allowed it,
        on the same thread: modelled as one step."""
        if i not in self.in_flight and self.core.thaw_called(i):
            probe, code = self.kernel.checked_thaw(i)
            self.needs_probe[i] = False
            self.run(self.core.thaw_returned(i, probe, code, self.now))

    @rule(data=st.data())
    @precondition(lambda self: self.in_flight)
    def an_ioctl_returns(self, data: st.DataObject) -> None:
        i = data.draw(st.sampled_from(sorted(self.in_flight)))
        op = self.in_flight.pop(i)
        if op == "freeze":
            self.run(self.core.freeze_returned(i, self.kernel.fifreeze(i, "quiesce"), self.now))
        else:
            probe, code = self.kernel.checked_thaw(i)
            self.needs_probe[i] = False
            self.run(self.core.thaw_returned(i, probe, code, self.now))

    @rule()
    def controller_renews(self) -> None:
        self.core.renew(self.now)

    @rule()
    def controller_dies(self) -> None:
        self.run(self.core.controller_died(self.now))

    @rule()
    def controller_is_done(self) -> None:
        self.run(self.core.finish(self.now))

    @rule(dt=st.integers(1, 600))
    def time_passes(self, dt: int) -> None:
        self.now += dt
        self.run(self.core.tick(self.now))

    # -- someone else ------------------------------------------------------------------------
    @rule(i=st.integers(0, N - 1), attributed=st.booleans())
    def someone_thaws(self, i: int, attributed: bool) -> None:
        if self.kernel.holder[i] == "quiesce" and i not in self.in_flight and not self.traced:
            self.needs_probe[i] = True
        self.kernel.fithaw(i, "other")
        self.now += 1  # calls are stamped apart, as the trace's clock does
        if self.traced:
            who = i if attributed else None
            self.run(self.core.outside_call("thaw", who, self.now, "x", self.now))
            self.run(self.core.trace_caught_up(self.now))

    @rule(i=st.integers(0, N - 1))
    def someone_freezes(self, i: int) -> None:
        if self.assume_probe_between and self.needs_probe[i]:
            return  # the residual: a refreeze before quiesce's next probe
        code = self.kernel.fifreeze(i, "other")
        self.now += 1
        if self.traced:  # the call, and its EBUSY answer if it froze nothing
            self.tid += 1
            self.run(self.core.outside_call("freeze", i, self.now, "x", self.now, self.tid))
            if code == errno.EBUSY:
                self.run(self.core.outside_call("ebusy", None, self.now, "", self.now, self.tid))
            self.run(self.core.trace_caught_up(self.now))

    # -- the rules ------------------------------------------------------------------------
    @invariant()
    def never_thaws_what_is_not_its_own(self) -> None:
        assert not self.kernel.bad_thaws, self.kernel.bad_thaws

    @invariant()
    def frozen_means_the_kernel_holds_it_for_us_or_a_probe_is_due(self) -> None:
        for i, v in enumerate(self.core.vols):
            if v.state == VolState.FROZEN and not self.needs_probe[i] and v.suspect_ns is None:
                assert self.kernel.holder[i] == "quiesce", (i, self.kernel.holder)

    @invariant()
    def nothing_of_ours_outlives_the_deadline(self) -> None:
        """Once the timers ran past the deadline and the shell ran every action, nothing
        of ours is frozen but a FIFREEZE still in the kernel."""
        c = self.core
        if c.expiry is None or self.queued or self.in_flight:
            return
        for i, v in enumerate(c.vols):
            if self.kernel.holder[i] == "quiesce":
                assert v.state not in (VolState.FROZEN,) or v.busy, (i, v)
                assert v.state in HELD, (i, v.state)
            if v.state == VolState.FROZEN:
                assert v.deferred_thaw or v.busy or not c.expiry, (i, v)

    @invariant()
    def a_lost_volume_is_never_thawed_again(self) -> None:
        for i, v in enumerate(self.core.vols):
            if v.state == VolState.LOST:
                assert not self.core.may_thaw(i)

    def teardown(self) -> None:
        # Drain: run every queued action and in-flight ioctl, then tick past the deadline.
        for _ in range(50):
            while self.in_flight:
                i, op = self.in_flight.popitem()
                if op == "freeze":
                    code = self.kernel.fifreeze(i, "quiesce")
                    self.run(self.core.freeze_returned(i, code, self.now))
                else:
                    probe, code = self.kernel.checked_thaw(i)
                    self.run(self.core.thaw_returned(i, probe, code, self.now))
            while self.queued:
                a = self.queued.pop(0)
                if isinstance(a, Thaw) and not self.core.thaw_go(a.idx):
                    self.run(self.core.thaw_skipped(a.idx))
                elif isinstance(a, Thaw):
                    probe, code = self.kernel.checked_thaw(a.idx)
                    self.run(self.core.thaw_returned(a.idx, probe, code, self.now))
                elif self.core.probe_started(a.idx):
                    code = self.kernel.fifreeze(a.idx, "quiesce")
                    if code == 0:
                        self.kernel.fithaw(a.idx, "quiesce")
                    self.run(self.core.probe_returned(a.idx, code, self.now, self.now))
                    self.after_probe()
            self.now += TIMEOUT + LEASE + 1
            self.run(self.core.tick(self.now))
            if not self.queued and not self.in_flight:
                break
        assert not self.kernel.bad_thaws, self.kernel.bad_thaws
        stuck = [i for i, h in enumerate(self.kernel.holder) if h == "quiesce"]
        assert not stuck, f"left frozen by quiesce: {stuck} {self.core.vols}"


CoreMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    database=None,  # the machines share a test name: no replay of another's examples
    suppress_health_check=[HealthCheck.too_slow],
)
TestGuardianCore = CoreMachine.TestCase


class ResidualMachine(CoreMachine):
    assume_probe_between = False


class TraceMachine(CoreMachine):
    """The kernel's trace reports every FIFREEZE/FITHAW call by someone else: a thaw
    attributed to its volume or not (its caller may be gone before it is read), a freeze
    that succeeds attributed (it lasts milliseconds: its caller is there to be read), and
    a freeze that answered EBUSY with that answer (the trace keeps EBUSY exits).
    Then no assumption is needed: a thaw and a refreeze between two probes is caught."""

    assume_probe_between = False
    traced = True


TraceMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    database=None,  # the machines share a test name: no replay of another's examples
    suppress_health_check=[HealthCheck.too_slow],
)
TestGuardianCoreWithTrace = TraceMachine.TestCase


def test_the_residual_is_real() -> None:
    """Negative control: without the one assumption (no refreeze by someone else before
    the next probe) the machine finds a FITHAW of someone else's freeze, so the test
    above can fail."""
    ResidualMachine.TestCase.settings = settings(
        max_examples=2000,
        stateful_step_count=40,
        deadline=None,
        database=None,
        phases=[Phase.generate],  # no shrinking: finding it is the point
        report_multiple_bugs=False,
    )
    with pytest.raises(AssertionError, match="thawed other's freeze"):
        ResidualMachine.TestCase("runTest").runTest()


def test_deadline_runs_from_the_first_freeze_call() -> None:
    """A FIFREEZE stuck in the kernel does not push the deadline out."""
    c = GuardianCore(inners=[frozenset()], timeout_ns=100, now_ns=0)
    assert c.freeze_called(0, 10)
    assert c.deadline_ns == 110
    assert c.tick(500) == []  # still in the kernel: nothing to thaw yet
    assert c.expiry is not None and c.expiry.reason == "deadline"
    acts = c.freeze_returned(0, 0, 700)  # the kernel finished: thaw it at once
    assert acts == [Thaw(0, "deadline")]


def test_a_freeze_thawed_by_someone_else_is_never_thawed() -> None:
    c = GuardianCore(inners=[frozenset()], timeout_ns=1000, now_ns=0, probe_interval_ns=10)
    c.freeze_called(0, 0)
    c.freeze_returned(0, 0, 1)
    acts = c.tick(20)
    assert acts == [Probe(0)]
    assert c.probe_started(0)
    assert c.probe_returned(0, 0, 21) == [Lost(0, "thawed by someone else", 21)]
    assert not c.thaw_called(0)
    assert c.tick(2000) == []  # the deadline: nothing of ours to thaw


def test_a_loop_backed_volume_thaws_after_its_backing_volume() -> None:
    """Expiry order: volume 1 holds volume 0's image, so 1 thaws first and 0 waits."""
    c = GuardianCore(inners=[frozenset(), frozenset({0})], timeout_ns=10, now_ns=0)
    for i in (0, 1):
        c.freeze_called(i, 0)
        c.freeze_returned(i, 0, 1)
    acts = c.tick(11)
    assert acts == [Thaw(1, "deadline")]
    assert c.thaw_returned(1, errno.EBUSY, 0, 12) == [Thaw(0, "deadline")]
