"""The consistency level a snapshot actually achieved, and why: the report must be true."""

from __future__ import annotations

from collections.abc import Sequence

from quiesce.freezing.freezer import Window
from quiesce.freezing.plan import Plan
from quiesce.providers.base import Consistency, FreezeMode, Provider, Snapshot
from quiesce.sys.units import human_duration


def consistency(
    mode: FreezeMode,
    prov: Provider,
    plan: Plan,
    window: Window | None,
    snaps: list[Snapshot],
    snapshot_s: float,
    quiesced: Sequence[str],
) -> tuple[str, str]:
    """The level actually achieved, and why. ``quiesced`` names the steps that quiesced
    applications before the freeze (a post-thaw hook is not one): only they make a
    snapshot application-consistent."""
    app = f"; {', '.join(quiesced)} quiesced the applications first" if quiesced else ""
    level = Consistency.APPLICATION if quiesced else Consistency.FILESYSTEM
    if window is not None:
        others = [v.mount_point for v in window.volumes if v.thawed_by == "someone-else"]
        if window.thawed_by != "controller" or others:
            who = ", ".join(others) or "the group"
            return Consistency.CRASH, f"{who} was thawed by someone else during the window"
        frozen = [v.mount_point for v in window.volumes if v.state == "thawed"]
        skipped = [v.mount_point for v in window.volumes if v.state == "skipped"]
        reason = (
            f"{len(frozen)} volume(s) frozen together with FIFREEZE for "
            f"{human_duration(window.duration)} "
            f"around the {prov.name} snapshot: one instant, no journal recovery needed"
        )
        if skipped:
            reason += f" ({', '.join(skipped)} mounted read-only: not frozen, cannot change)"
        return level, reason + app
    how = (
        f"the {prov.name} storage froze the filesystem itself while taking the snapshot"
        if mode is FreezeMode.PROVIDER
        else f"the {prov.name} snapshot is atomic and was taken without a freeze"
    )
    if len(snaps) > 1 and not prov.group_atomic:
        reason = (
            f"{len(snaps)} snapshots taken back to back over {human_duration(snapshot_s)}: each is "
            f"filesystem-consistent ({how}), but the group is not one atomic instant"
        )
        if quiesced:
            return Consistency.APPLICATION, reason + app
        return Consistency.CRASH, reason
    return level, how + app


__all__ = ["consistency"]
