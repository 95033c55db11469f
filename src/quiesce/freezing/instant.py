"""One instant at which every member of a group was frozen, proven from their records.

Members are fleet hosts (docs/fleet.md) or a job's guests (docs/vm.md): each recorded its
frozen span in its own clock, mapped onto the controller's with an error bound
(:class:`Offset`: NTP-style round trips; both clocks CLOCK_MONOTONIC), or bounded causally
by what the controller itself saw (``frozen_seen``: its freeze had returned; ``thaw_sent``:
no thaw began before it sent one), which needs no clock mapping at all.

A ping sent at controller time ``c0`` and answered at ``c1`` with host time ``h`` says that
``h`` happened within ``[c0, c1]``: the host's clock reads ``offset = h - (c0+c1)/2`` ahead
of the controller's, give or take ``(c1-c0)/2``. The round trip with the least delay gives
the tightest bound; measured before and after the window, the bound also covers the drift.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Offset:
    offset_ns: int  # host clock minus controller clock
    error_ns: int  # |true offset - offset_ns| <= error_ns

    @classmethod
    def from_samples(cls, samples: list[tuple[int, int, int]]) -> Offset:
        """Best of ``(c0, h, c1)`` round trips: the one with the least delay."""
        if not samples:
            raise ValueError("no clock samples")
        c0, h, c1 = min(samples, key=lambda s: s[2] - s[0])
        return cls(h - (c0 + c1) // 2, (c1 - c0 + 1) // 2)

    def combine(self, later: Offset) -> Offset:
        """One bound for a span between two measurements (drift included)."""
        drift = abs(later.offset_ns - self.offset_ns)
        return Offset(self.offset_ns, max(self.error_ns, later.error_ns) + drift)

    def earliest(self, host_ns: int) -> int:
        """The earliest controller time that host time ``host_ns`` can be."""
        return host_ns - self.offset_ns - self.error_ns

    def latest(self, host_ns: int) -> int:
        return host_ns - self.offset_ns + self.error_ns

    def to_host(self, ctrl_ns: int) -> int:
        return ctrl_ns + self.offset_ns


@dataclass
class FrozenSpan:
    """One member's frozen span in its own clock: all frozen from ``frozen_at`` (or later)
    until ``thaw_from`` (or sooner), as it recorded them; and its whole window."""

    host: str  # the member's name: a fleet host, or a guest
    frozen_at: int
    thaw_from: int
    start_ns: int  # first FIFREEZE issued
    end_ns: int  # last FITHAW returned
    offset: Offset
    thawed_early: str | None = None  # the guardian thawed before the agent did (why)
    # Causal bounds on the controller's clock, when it has them: it saw "frozen" at
    # ``frozen_seen`` (so all were frozen by then) and sent "thaw" at ``thaw_sent`` (so
    # no thaw began before: given only for a host that thawed because it was told to).
    # They need no clock mapping at all.
    frozen_seen: int | None = None
    thaw_sent: int | None = None

    def frozen_by(self) -> int:
        t = self.offset.latest(self.frozen_at)
        return t if self.frozen_seen is None else min(t, self.frozen_seen)

    def thaw_not_before(self) -> int:
        t = self.offset.earliest(self.thaw_from)
        return t if self.thaw_sent is None else max(t, self.thaw_sent)


@dataclass
class Verdict:
    consistent: bool
    overlap_s: float | None  # proven length of the instant's neighbourhood (may be < 0)
    window_s: float | None  # first freeze to last thaw, on the controller's clock
    skew_s: float | None  # first to last host's first freeze
    host_windows_s: dict[str, float] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    overlap_ctrl_ns: tuple[int, int] | None = None  # (all frozen by, first thaw not before)

    def to_dict(self) -> dict[str, Any]:
        return {
            "consistent": self.consistent,
            "overlap_s": self.overlap_s,
            "window_s": self.window_s,
            "skew_s": self.skew_s,
            "host_windows_s": self.host_windows_s,
            "reasons": self.reasons,
        }


def judge(spans: list[FrozenSpan], expected: list[str]) -> Verdict:
    """Consistent only if every expected host has a span, none was thawed by its guardian
    early, and the latest possible "all frozen" precedes the earliest possible thaw."""
    reasons = []
    have = {s.host for s in spans}
    reasons += [f"{h}: no frozen span recorded" for h in expected if h not in have]
    reasons += [f"{s.host}: thawed early by its guardian ({s.thawed_early})" for s in spans
                if s.thawed_early]  # fmt: skip
    if not spans:
        return Verdict(False, None, None, None, {}, reasons or ["no host froze"])
    all_frozen = max(s.frozen_by() for s in spans)
    first_thaw = min(s.thaw_not_before() for s in spans)
    overlap = (first_thaw - all_frozen) / 1e9
    if overlap <= 0:
        reasons.append(
            f"no proven instant: the last host was frozen by {all_frozen / 1e9:.6f}, the first "
            f"thaw may have begun at {first_thaw / 1e9:.6f} (controller clock)"
        )
    starts = [s.start_ns - s.offset.offset_ns for s in spans]
    ends = [s.end_ns - s.offset.offset_ns for s in spans]
    return Verdict(
        consistent=not reasons,
        overlap_s=overlap,
        window_s=(max(ends) - min(starts)) / 1e9,
        skew_s=(max(starts) - min(starts)) / 1e9,
        host_windows_s={s.host: (s.end_ns - s.start_ns) / 1e9 for s in spans},
        reasons=reasons,
        overlap_ctrl_ns=(all_frozen, first_thaw),
    )
