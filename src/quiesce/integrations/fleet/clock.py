"""Each host's clock on the controller's: NTP-style round trips over the agent channel.

A ping sent at controller time ``c0`` and answered at ``c1`` with host time ``h`` says
that ``h`` happened within ``[c0, c1]``: the host's clock reads ``offset = h - (c0+c1)/2``
ahead of the controller's, give or take ``(c1-c0)/2``. The round trip with the least
delay gives the tightest bound. Both are CLOCK_MONOTONIC (no NTP steps in between);
measured before and after the window, the bound also covers the drift between the two.
"""

from __future__ import annotations

from dataclasses import dataclass


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
