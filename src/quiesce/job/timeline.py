"""The run's timeline for the report: the snapshot's phases and the freeze window's
per-volume steps placed on the wall clock."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from quiesce.job.report import Phase, Report


def _wall(mono_ns: int | None, anchor: tuple[float, float]) -> float | None:
    """A monotonic timestamp (ns) as unix time, given one (wall, monotonic) pair."""
    if mono_ns is None:
        return None
    wall, mono = anchor
    return wall + (mono_ns / 1e9 - mono)


def window_phases(window: dict[str, Any], anchor: tuple[float, float]) -> list[Phase]:
    """Per-volume syncfs, freeze and thaw phases from the window's durations.

    Freezes run back to back from the window's start, thaws back to back up to its
    end (the gaps are IPC round trips of microseconds); syncfs runs just before.
    """
    vols = [v for v in window.get("volumes", []) if v.get("state") != "skipped"]
    start = _wall(window.get("start_ns"), anchor)
    end = _wall(window.get("end_ns"), anchor)
    out: list[Phase] = []
    if start is None:
        return out
    syncfs = [v for v in vols if v.get("syncfs_s") is not None]
    t = start - sum(v["syncfs_s"] for v in syncfs)
    for v in syncfs:
        out.append(
            Phase(
                name=f"syncfs {v['mount_point']}",
                start=t,
                end=t + v["syncfs_s"],
                duration_s=v["syncfs_s"],
            )
        )
        t += v["syncfs_s"]
    t = start
    for v in vols:
        if v.get("freeze_s") is not None:
            out.append(
                Phase(
                    name=f"freeze {v['mount_point']}",
                    start=t,
                    end=t + v["freeze_s"],
                    duration_s=v["freeze_s"],
                    ok=v.get("state") != "failed",
                )
            )
            t += v["freeze_s"]
    frozen_end = t
    if end is not None:
        t = end
        for v in vols:  # freeze order; thawed in reverse, so the first thaws last
            if v.get("thaw_s") is not None:
                out.append(
                    Phase(
                        name=f"thaw {v['mount_point']}",
                        start=t - v["thaw_s"],
                        end=t,
                        duration_s=v["thaw_s"],
                        ok=v.get("state") == "thawed",
                        detail=v.get("thawed_by"),
                    )
                )
                t -= v["thaw_s"]
        out.append(
            Phase(
                name="provider snapshot (frozen)",
                start=frozen_end,
                end=t,
                duration_s=max(t - frozen_end, 0.0),
            )
        )
        out.append(
            Phase(
                name="freeze window",
                start=start,
                end=end,
                duration_s=end - start,
                detail=window.get("thawed_by"),
            )
        )
    return out


_SKIPPED_PHASES = {"before_freeze", "after_thaw"}  # the hooks' own marks are more precise


def _create_phases(
    phases: Sequence[dict[str, Any]], called: float, hooks_start: float | None
) -> list[Phase]:
    """snapshots.create's phases carry durations only: they ran back to back from
    ``called`` (unix time), or, more exactly, around the moment the hooks started."""
    out, t = [], called
    for d in phases:
        ph = Phase.from_any(d)
        dur = ph.duration_s or 0.0
        ph.start, ph.end = t, t + dur
        t += dur
        out.append(ph)
    mark = next((p.start for p in out if p.name == "before_freeze"), None)
    if hooks_start is not None and mark is not None:
        shift = hooks_start - mark
        for p in out:
            p.start = None if p.start is None else p.start + shift
            p.end = None if p.end is None else p.end + shift
    return [p for p in out if p.name not in _SKIPPED_PHASES]


def fill_from_manifest(
    report: Report,
    manifest: Any,
    called: float,
    anchor: tuple[float, float],
    hooks_start: float | None,
) -> None:
    report.manifest_id = manifest.id
    report.consistency = manifest.consistency
    report.consistency_reason = manifest.consistency_reason
    report.freeze_mode = manifest.freeze_mode
    report.window = manifest.window
    report.snapshots = [s.to_dict() for s in manifest.snapshots]
    report.phases += _create_phases(manifest.phases, called, hooks_start)
    if manifest.window:
        report.phases += window_phases(manifest.window, anchor)
    report.warnings += [w for w in manifest.warnings if w not in report.warnings]


__all__ = ["fill_from_manifest", "window_phases"]
