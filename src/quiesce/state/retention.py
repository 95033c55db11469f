"""Which snapshots to keep and which to delete: keep_last/hourly/daily/weekly/monthly.

Pure and deterministic, like btrbk's and sanoid's schedulers and restic's ``forget``:
for each bucketed rule (an hour, a day, an ISO week, a month) the newest snapshot of
each of the N most recent buckets that hold one is kept; ``keep_last`` keeps the N
newest. A snapshot kept by no rule is deleted unless it is *held* (a backup is reading
it: it is mounted), which always wins. A policy with no rule keeps everything: an
empty ``[retention]`` must never mean "delete all".
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo

from pydantic import BaseModel, ConfigDict, Field


class RetentionPolicy(BaseModel):
    """The ``[retention]`` section of a job (also passed through to the target's prune)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    keep_last: int = Field(0, ge=0, description="the N newest snapshots")
    keep_hourly: int = Field(0, ge=0, description="the newest of each of the last N hours")
    keep_daily: int = Field(0, ge=0, description="the newest of each of the last N days")
    keep_weekly: int = Field(0, ge=0, description="the newest of each of the last N ISO weeks")
    keep_monthly: int = Field(0, ge=0, description="the newest of each of the last N months")

    @property
    def empty(self) -> bool:
        """No rule at all: keep everything."""
        return not any(self.counts().values())

    def counts(self) -> dict[str, int]:
        return {
            "last": self.keep_last,
            "hourly": self.keep_hourly,
            "daily": self.keep_daily,
            "weekly": self.keep_weekly,
            "monthly": self.keep_monthly,
        }


def _hour(t: datetime) -> tuple[int, ...]:
    return (t.year, t.month, t.day, t.hour)


def _day(t: datetime) -> tuple[int, ...]:
    return (t.year, t.month, t.day)


def _week(t: datetime) -> tuple[int, ...]:
    iso = t.isocalendar()
    return (iso.year, iso.week)


def _month(t: datetime) -> tuple[int, ...]:
    return (t.year, t.month)


BUCKETS: dict[str, Callable[[datetime], tuple[int, ...]]] = {
    "hourly": _hour,
    "daily": _day,
    "weekly": _week,
    "monthly": _month,
}


@dataclass
class RetentionDecision:
    """The outcome: ids to keep (with the rules that keep each) and ids to delete."""

    keep: dict[str, list[str]] = field(default_factory=dict)  # id -> reasons, newest first
    delete: list[str] = field(default_factory=list)  # oldest first

    def to_dict(self) -> dict[str, object]:
        return {"keep": self.keep, "delete": self.delete}


def as_datetime(ts: float | datetime) -> datetime:
    """Unix time or datetime -> aware datetime in UTC (naive datetimes are taken as UTC)."""
    if isinstance(ts, datetime):
        return ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)
    return datetime.fromtimestamp(ts, UTC)


def decide(
    snapshots: Mapping[str, float | datetime] | Iterable[tuple[str, float | datetime]],
    policy: RetentionPolicy,
    held: Collection[str] = (),
    *,
    tz: tzinfo = UTC,
) -> RetentionDecision:
    """Apply ``policy`` to ``snapshots`` (id -> creation time); never delete a held id.

    Buckets are computed in ``tz`` (a tzinfo; UTC by default so that a run and its
    rerun agree across DST changes). Ties in time are broken by id, so the result does
    not depend on input order.
    """
    items = list(snapshots.items()) if isinstance(snapshots, Mapping) else list(snapshots)
    ids = [i for i, _ in items]
    if len(set(ids)) != len(ids):
        raise ValueError("duplicate snapshot ids")
    times = {i: as_datetime(t).astimezone(tz) for i, t in items}
    newest_first = sorted(ids, key=lambda i: (times[i], i), reverse=True)
    reasons: dict[str, list[str]] = {i: [] for i in ids}
    if policy.empty:
        for i in newest_first:
            reasons[i].append("no retention rule")
    for i in newest_first[: policy.keep_last]:
        reasons[i].append("last")
    counts = policy.counts()
    for rule, bucket_of in BUCKETS.items():
        wanted = counts[rule]
        seen: set[tuple[int, ...]] = set()
        for i in newest_first:
            if len(seen) >= wanted:
                break
            bucket = bucket_of(times[i])
            if bucket not in seen:
                seen.add(bucket)
                reasons[i].append(rule)
    held_set = set(held)
    for i in held_set & set(ids):
        reasons[i].append("held")
    decision = RetentionDecision()
    for i in newest_first:
        if reasons[i]:
            decision.keep[i] = reasons[i]
    decision.delete = [i for i in reversed(newest_first) if not reasons[i]]
    return decision
