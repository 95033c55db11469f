"""The rule of the levels (docs/consistency.md), over every combination of capture and
claims: a level never promises more than the capture and every quiescer's claim allow."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from quiesce import Consistency
from quiesce.snapshot.consistency import OLD_NAMES, Claim, level_of

levels = st.sampled_from(list(Consistency))
claims = st.lists(st.builds(Claim, st.just("w"), levels, st.just("did"), st.booleans()))


@given(levels, claims)
def test_a_level_never_promises_more_than_its_evidence(capture, said) -> None:
    level = level_of(capture, said)
    if level is Consistency.CLEAN:  # only a real flush-and-hold, by every quiescer
        assert said and all(c.level is Consistency.CLEAN for c in said)
        assert capture is not Consistency.PER_VOLUME or all(c.held for c in said)
    else:  # otherwise exactly what the capture gave (a capture is never CLEAN by itself)
        assert level is capture.at_most(Consistency.ATOMIC)
    assert level.rank <= Consistency.ATOMIC.rank or capture is Consistency.PER_VOLUME


def test_no_quiescer_gives_what_the_capture_gives_and_a_hook_never_clean() -> None:
    assert level_of(Consistency.ATOMIC, []) is Consistency.ATOMIC
    assert level_of(Consistency.PER_VOLUME, []) is Consistency.PER_VOLUME
    hook = Claim("hook 'x'", Consistency.ATOMIC, "ran before the freeze")
    sqlite = Claim("writer s", Consistency.CLEAN, "WAL empty under the lock", held=True)
    assert level_of(Consistency.ATOMIC, [sqlite]) is Consistency.CLEAN
    assert level_of(Consistency.PER_VOLUME, [sqlite]) is Consistency.CLEAN  # held across
    assert level_of(Consistency.ATOMIC, [sqlite, hook]) is Consistency.ATOMIC


def test_old_names_map_to_no_more_than_they_proved() -> None:
    assert {k: str(v) for k, v in OLD_NAMES.items()} == {
        "application": "atomic", "filesystem": "atomic", "crash": "per-volume",
    }  # fmt: skip
    assert Consistency.read("clean") is Consistency.CLEAN
