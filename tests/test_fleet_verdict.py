"""The fleet's proof of one instant (freezing/instant.py), as properties.

A model of what really happened: each host's clock runs ``o`` ns ahead of the
controller's, the controller measured ``o`` within its error bound, and each host was
truly frozen from controller time ``f`` to ``t``. Whatever the clocks and the measurement
errors, the verdict may say "consistent" only if the hosts' true frozen spans share an
instant (soundness); with exact clocks it must say so whenever they do (it is not
vacuous). The causal bounds (the controller saw "frozen" after the freeze; told a host to
thaw before it thawed) keep both, as long as they are given only where they hold.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given
from hypothesis import strategies as st

from quiesce.freezing.instant import FrozenSpan, Offset, judge

NS = st.integers(min_value=0, max_value=10**9)


@dataclass
class TrueHost:
    o: int  # host clock - controller clock
    f: int  # truly all frozen from (controller clock)
    t: int  # truly first thaw at (controller clock)
    offset: Offset  # as measured: |o - offset_ns| <= error_ns
    seen_after: int | None  # the controller saw "frozen" this long after f
    told_before: int | None  # the controller sent "thaw" this long before t (told to)

    def span(self, name: str) -> FrozenSpan:
        return FrozenSpan(
            name, self.f + self.o, self.t + self.o, self.f + self.o - 1000, self.t + self.o + 1000,
            self.offset, None,
            None if self.seen_after is None else self.f + self.seen_after,
            None if self.told_before is None else self.t - self.told_before,
        )  # fmt: skip


@st.composite
def hosts(draw: st.DrawFn, exact: bool = False, causal: bool = True) -> list[TrueHost]:
    out = []
    for _ in range(draw(st.integers(1, 4))):
        o = draw(st.integers(-(10**12), 10**12))
        err = 0 if exact else draw(st.integers(0, 10**7))
        measured = o + draw(st.integers(-err, err))
        f = draw(NS)
        t = f + draw(st.integers(1, 10**8))
        seen = draw(st.none() | st.integers(0, 10**7)) if causal else None
        told = draw(st.none() | st.integers(0, t - f)) if causal else None
        out.append(TrueHost(o, f, t, Offset(measured, err), seen, told))
    return out


def truly_overlap(hs: list[TrueHost]) -> bool:
    return max(h.f for h in hs) < min(h.t for h in hs)


@given(hosts())
def test_a_proven_instant_is_a_true_one(hs: list[TrueHost]) -> None:
    names = [f"h{i}" for i in range(len(hs))]
    v = judge([h.span(n) for n, h in zip(names, hs, strict=True)], names)
    if v.consistent:
        assert truly_overlap(hs)


@given(hosts(exact=True, causal=False))
def test_with_exact_clocks_a_true_instant_is_proven(hs: list[TrueHost]) -> None:
    names = [f"h{i}" for i in range(len(hs))]
    v = judge([h.span(n) for n, h in zip(names, hs, strict=True)], names)
    assert v.consistent == truly_overlap(hs)


@given(hosts())
def test_a_host_without_a_record_or_thawed_early_is_never_consistent(hs: list[TrueHost]) -> None:
    names = [f"h{i}" for i in range(len(hs))]
    spans = [h.span(n) for n, h in zip(names, hs, strict=True)]
    assert not judge(spans[1:], names).consistent
    spans[0].thawed_early = "deadline"
    assert not judge(spans, names).consistent


def test_a_thaw_bound_given_for_a_host_that_thawed_unasked_would_hide_it() -> None:
    """Why the coordinator gives ``thaw_sent`` only for hosts that thawed on its word: a
    host that thawed at 100 (before the other froze at 200) is caught from its own record;
    the controller's later "thaw" (at 500) as its bound would prove a false instant."""
    exact = Offset(0, 0)
    a = FrozenSpan("a", 50, 100, 40, 110, exact)
    b = FrozenSpan("b", 200, 600, 190, 610, exact)
    assert not judge([a, b], ["a", "b"]).consistent
    a.thaw_sent = 500
    assert judge([a, b], ["a", "b"]).consistent  # unsound: hence the coordinator's rule


@given(o=st.integers(-(10**12), 10**12), trips=st.lists(st.tuples(NS, NS, NS), min_size=1))
def test_a_measured_offset_bounds_the_true_one(o: int, trips: list[tuple[int, int, int]]) -> None:
    """Each round trip (c0, x, c1): the host read its clock at controller time x."""
    samples = []
    for a, b, c in trips:
        c0, x, c1 = sorted((a, b, c))
        samples.append((c0, x + o, c1))
    m = Offset.from_samples(samples)
    assert abs(o - m.offset_ns) <= m.error_ns


@given(
    o1=st.integers(-(10**9), 10**9), drift=st.integers(-(10**6), 10**6),
    e1=st.integers(0, 10**6), e2=st.integers(0, 10**6),
    d1=st.floats(-1, 1), d2=st.floats(-1, 1), at=st.floats(0, 1),
)  # fmt: skip
def test_a_combined_offset_bounds_the_clock_anywhere_between_the_two(
    o1: int, drift: int, e1: int, e2: int, d1: float, d2: float, at: float
) -> None:
    """Measured before (o1) and after (o2 = o1 + drift) the window, each within its error:
    the combined bound holds for the true offset at any moment in between."""
    o2 = o1 + drift
    before = Offset(o1 + round(d1 * e1), e1)
    after = Offset(o2 + round(d2 * e2), e2)
    between = o1 + round(at * drift)
    c = before.combine(after)
    assert abs(between - c.offset_ns) <= c.error_ns
