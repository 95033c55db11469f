"""Retention: property tests (hypothesis) and a few worked examples."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quiesce.state.retention import BUCKETS, RetentionPolicy, decide

T0 = datetime(2024, 1, 1, tzinfo=UTC)

# Snapshot times spread over ~ 3 years with clusters (many in one hour, gaps of weeks).
offsets = st.lists(st.integers(min_value=0, max_value=3 * 365 * 24 * 3600), min_size=0, max_size=60)
policies = st.builds(
    RetentionPolicy,
    keep_last=st.integers(0, 6),
    keep_hourly=st.integers(0, 6),
    keep_daily=st.integers(0, 6),
    keep_weekly=st.integers(0, 6),
    keep_monthly=st.integers(0, 6),
)


def _snaps(offs: list[int]) -> dict[str, datetime]:
    return {f"s{n:03d}": T0 + timedelta(seconds=o) for n, o in enumerate(offs)}


@st.composite
def snaps_and_held(draw: st.DrawFn) -> tuple[dict[str, datetime], set[str]]:
    snaps = _snaps(draw(offsets))
    held = draw(st.sets(st.sampled_from(sorted(snaps)), max_size=4)) if snaps else set()
    return snaps, held


def _newest_first(snaps: dict[str, datetime]) -> list[str]:
    return sorted(snaps, key=lambda i: (snaps[i], i), reverse=True)


@settings(max_examples=300, deadline=None)
@given(snaps_and_held(), policies)
def test_every_rule_is_satisfied(data: tuple[dict[str, datetime], set[str]], p: RetentionPolicy):
    snaps, held = data
    d = decide(snaps, p, held)
    kept = set(d.keep)
    assert kept | set(d.delete) == set(snaps)
    assert not kept & set(d.delete)
    order = _newest_first(snaps)
    # keep_last: the N newest are kept
    assert set(order[: p.keep_last]) <= kept
    # bucketed rules: the newest of each of the N most recent buckets is kept
    for rule, bucket_of in BUCKETS.items():
        n = p.counts()[rule]
        newest_in_bucket: dict[tuple[int, ...], str] = {}
        for i in order:
            newest_in_bucket.setdefault(bucket_of(snaps[i]), i)
        recent = sorted(newest_in_bucket, reverse=True)[:n]
        assert {newest_in_bucket[b] for b in recent} <= kept, rule


@settings(max_examples=300, deadline=None)
@given(snaps_and_held(), policies)
def test_held_never_deleted_and_nothing_kept_without_reason(
    data: tuple[dict[str, datetime], set[str]], p: RetentionPolicy
):
    snaps, held = data
    d = decide(snaps, p, held)
    assert not held & set(d.delete)
    for i, reasons in d.keep.items():
        assert reasons, i
        if reasons == ["held"]:
            assert i in held
    if not p.empty and not held:
        # at most one snapshot per rule slot is kept
        assert len(d.keep) <= sum(p.counts().values())


@settings(max_examples=300, deadline=None)
@given(snaps_and_held(), policies)
def test_idempotent(data: tuple[dict[str, datetime], set[str]], p: RetentionPolicy):
    snaps, held = data
    first = decide(snaps, p, held)
    survivors = {i: snaps[i] for i in first.keep}
    second = decide(survivors, p, held)
    assert second.delete == []
    assert set(second.keep) == set(first.keep)


@settings(max_examples=100, deadline=None)
@given(offsets, policies, st.randoms())
def test_order_of_input_does_not_matter(offs: list[int], p: RetentionPolicy, rnd) -> None:
    snaps = _snaps(offs)
    items = list(snaps.items())
    rnd.shuffle(items)
    assert decide(items, p).to_dict() == decide(snaps, p).to_dict()


def test_empty_policy_keeps_everything() -> None:
    snaps = _snaps([0, 10, 3600 * 50])
    d = decide(snaps, RetentionPolicy())
    assert d.delete == [] and set(d.keep) == set(snaps)


def test_worked_example_daily_and_last() -> None:
    # three a day for four days
    snaps = {
        f"d{day}h{h}": T0 + timedelta(days=day, hours=h) for day in range(4) for h in (1, 8, 20)
    }
    d = decide(snaps, RetentionPolicy(keep_last=2, keep_daily=3))
    assert set(d.keep) == {"d3h20", "d3h8", "d2h20", "d1h20"}
    assert d.keep["d3h20"] == ["last", "daily"]
    assert d.delete[0] == "d0h1" and "d0h20" in d.delete  # oldest first
    held = decide(snaps, RetentionPolicy(keep_last=1), held={"d0h1"})
    assert "d0h1" in held.keep and held.keep["d0h1"] == ["held"]


def test_weekly_uses_iso_weeks_across_new_year() -> None:
    # 2024-12-30 (Mon) and 2025-01-02 (Thu) are in the same ISO week 2025-W01.
    snaps = {
        "a": datetime(2024, 12, 29, 12, tzinfo=UTC),  # Sunday, ISO 2024-W52
        "b": datetime(2024, 12, 30, 12, tzinfo=UTC),
        "c": datetime(2025, 1, 2, 12, tzinfo=UTC),
    }
    d = decide(snaps, RetentionPolicy(keep_weekly=2))
    assert set(d.keep) == {"a", "c"} and d.delete == ["b"]


def test_negative_counts_are_rejected() -> None:
    with pytest.raises(ValueError):
        RetentionPolicy(keep_daily=-1)
    with pytest.raises(ValueError):
        RetentionPolicy(keep_dayly=3)  # type: ignore[call-arg]
