"""The qemu provider's proof of one instant across guests (freezing/instant.py's verdict
from the host's own clock): pure, from the timestamps and counts a group recorded; no
agent is contacted (the VM tier runs the same code against real guests)."""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from quiesce.providers.options import QemuOptions
from quiesce.providers.qemu import GuestGroup


def _group(n: int) -> GuestGroup:
    return GuestGroup(
        QemuOptions.parse(
            {"guests": [{"name": f"g{i}", "agent": f"/nonexistent/g{i}.sock",
                         "images": [f"/nonexistent/g{i}.raw"]} for i in range(n)]}
        )
    )  # fmt: skip


def _record(grp: GuestGroup, spans: list[tuple[int, int]], thawed: list[int]) -> None:
    """Each guest answered its freeze at spans[i][0] and was sent its thaw at spans[i][1];
    its freeze froze 2 filesystems, its thaw found thawed[i] of them frozen."""
    for g, (f, t), n in zip(grp.guests, spans, thawed, strict=True):
        g.freeze_sent_ns, g.frozen_ns, g.frozen = f - 1, f, 2
        g.thaw_sent_ns, g.thawed_ns, g.thawed = t, t + 1, n


SPAN = st.tuples(st.integers(0, 1000), st.integers(1, 1000)).map(lambda s: (s[0], s[0] + s[1]))


@settings(deadline=None)  # a busy machine must not fail it (load run 3)
@given(st.lists(SPAN, min_size=1, max_size=4), st.integers(0, 2000), st.integers(0, 2000))
@example([(0, 5), (5, 10)], 5, 5)  # one guest thawed as the next froze: no instant
def test_consistent_only_if_the_clones_lie_where_every_guest_was_frozen(
    spans: list[tuple[int, int]], a: int, b: int
) -> None:
    made = (min(a, b), max(a, b))
    grp = _group(len(spans))
    _record(grp, spans, [2] * len(spans))
    v = grp.verdict(made)
    # an instant of positive width where every guest was frozen, holding the clones
    truth = max(f for f, _ in spans) < min(t for _, t in spans)
    truth = truth and all(f <= made[0] and made[1] <= t for f, t in spans)
    assert v.consistent == truth, (spans, made, v.reasons)


def test_guests_frozen_one_after_another_without_overlap_are_refused() -> None:
    """Negative control: the first guest thawed before the second froze (a sequential
    freeze-clone-thaw per guest): each clone is clean, the pair is not one instant."""
    grp = _group(2)
    _record(grp, [(10, 20), (30, 40)], [2, 2])
    v = grp.verdict()
    assert not v.consistent and "no proven instant" in " ".join(v.reasons)


def test_a_guest_whose_thaw_found_fewer_frozen_is_refused() -> None:
    grp = _group(2)
    _record(grp, [(10, 50), (12, 50)], [2, 1])
    v = grp.verdict((20, 30))
    assert not v.consistent
    assert "g1: thawed early" in " ".join(v.reasons), v.reasons
    assert grp.broken() == ["g1 (froze 2, the host's thaw found 1 frozen)"]


def test_a_guest_that_never_froze_is_named() -> None:
    grp = _group(2)
    _record(grp, [(10, 50), (12, 50)], [2, 2])
    grp.guests[1].frozen = None
    v = grp.verdict((20, 30))
    assert not v.consistent and "g1: no frozen span recorded" in v.reasons
