"""The consistency level a snapshot achieved, named by what a restore needs, and why.

The one definition of the levels (docs/consistency.md says the same in words). The rule:
a level never promises more than the restore will see. ``clean`` needs every quiescer to
have proved a flushed, held state (a restore opens with no recovery); ``atomic`` needs
every volume captured at one instant (applications recover like after a power cut);
anything else is ``per-volume``. Each quiescer's :class:`Claim` says what it did, with
numbers; a quiescer that claims nothing (a plain hook) cannot raise the level.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from quiesce.errors import OutsideGroup
from quiesce.host.mounts import MountTable
from quiesce.providers.base import FreezeMode, Snapshot

if TYPE_CHECKING:  # annotations only: a writer that names a Claim needs no freezer
    from quiesce.freezing.freezer import Window
    from quiesce.freezing.plan import GroupMember, Plan
    from quiesce.providers.base import Provider
from quiesce.util.units import human_duration


class Consistency(enum.StrEnum):
    """What a restore of the snapshot needs (strongest first)."""

    CLEAN = "clean"  # every application confirmed flushed and held: opens with no recovery
    ATOMIC = "atomic"  # every volume at one instant: applications recover as after a power cut
    PER_VOLUME = "per-volume"  # captured volume by volume (or a freeze broken by someone else)

    @classmethod
    def read(cls, value: str) -> Consistency:
        """A level as stored, old names included (manifests written before the rename)."""
        return OLD_NAMES.get(value) or cls(value)

    @property
    def rank(self) -> int:
        return list(Consistency).index(self)

    def at_most(self, other: Consistency) -> Consistency:
        """The weaker of the two."""
        return self if self.rank >= other.rank else other


# Names the manifests and reports used before: they promised more than a restore saw
# ("application" was given to a CHECKPOINT that the restore still replays WAL after).
OLD_NAMES = {
    "application": Consistency.ATOMIC,
    "filesystem": Consistency.ATOMIC,
    "crash": Consistency.PER_VOLUME,
}


@dataclass(frozen=True)
class Claim:
    """What one quiescer did and what it lets a restore expect of its files.

    ``level``: CLEAN only for a real flush-and-hold (nothing the restore needs changed
    while held); ``held`` says the hold lasted across the whole capture, so volumes taken
    one after another still show one state of this application."""

    who: str
    level: Consistency
    says: str
    held: bool = False


def level_of(capture: Consistency, claims: Sequence[Claim]) -> Consistency:
    """The level: CLEAN only when every claim is CLEAN and the capture was one instant
    (or every claim held across it); else what the capture itself gives."""
    clean = bool(claims) and all(c.level is Consistency.CLEAN for c in claims)
    if clean and (capture is not Consistency.PER_VOLUME or all(c.held for c in claims)):
        return Consistency.CLEAN
    return capture.at_most(Consistency.ATOMIC)


def consistency(
    mode: FreezeMode,
    prov: Provider,
    plan: Plan,
    window: Window | None,
    snaps: list[Snapshot],
    snapshot_s: float,
    claims: Sequence[Claim],
    proven: str = "",
) -> tuple[Consistency, str]:
    """The level actually achieved, and why: how the group was captured, what each
    quiescer did (``claims``), and where their files were proven (``proven``)."""
    capture, how = _capture(mode, prov, window, snaps, snapshot_s)
    level = level_of(capture, claims)
    parts = [how, *(f"{c.who}: {c.says}" for c in claims)]
    if proven:
        parts.append(proven)
    return level, "; ".join(parts)


def _capture(
    mode: FreezeMode,
    prov: Provider,
    window: Window | None,
    snaps: list[Snapshot],
    snapshot_s: float,
) -> tuple[Consistency, str]:
    if window is not None:
        others = [v.mount_point for v in window.volumes if v.thawed_by == "someone-else"]
        if window.thawed_by != "controller" or others:
            who = ", ".join(others) or "the group"
            return Consistency.PER_VOLUME, f"{who} was thawed by someone else during the window"
        frozen = [v.mount_point for v in window.volumes if v.state == "thawed"]
        skipped = [v.mount_point for v in window.volumes if v.state == "skipped"]
        how = (
            f"{len(frozen)} volume(s) frozen together with FIFREEZE for "
            f"{human_duration(window.duration)} around the {prov.name} snapshot: one instant, "
            "the filesystems need no journal recovery"
        )
        if skipped:
            how += f" ({', '.join(skipped)} mounted read-only: not frozen, cannot change)"
        return Consistency.ATOMIC, how
    how = (
        f"the {prov.name} storage froze the filesystem itself while taking the snapshot"
        if mode is FreezeMode.PROVIDER
        else f"the {prov.name} snapshot is atomic and was taken without a freeze"
    )
    if len(snaps) > 1 and not prov.group_atomic:
        return Consistency.PER_VOLUME, (
            f"{len(snaps)} snapshots taken back to back over {human_duration(snapshot_s)}: each "
            f"is consistent on its own ({how}), but the group is not one atomic instant"
        )
    return Consistency.ATOMIC, how


# -- the files each quiescer depends on ---------------------------------------------------


def _existing(path: str) -> str:
    """``path``, or its nearest existing parent (a -wal file not made yet lives there)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    return str(p)


def prove_on_group(
    depends: Mapping[str, Sequence[tuple[str, str]]],
    members: Sequence[GroupMember],
    table: MountTable | None = None,
) -> str:
    """Prove every file each quiescer depends on (``{who: [(path, what), ...]}``) lies on
    a volume of the group (by superblock, through the mount the path resolves to);
    raise :class:`OutsideGroup` naming the first that does not. Returns the sentence
    for the consistency reason ("" when nothing was declared)."""
    if not any(depends.values()):
        return ""
    table = table or MountTable.read()
    group = {m.volume.dev: m.name for m in members}
    said = []
    for who, files in depends.items():
        on: list[str] = []
        for path, what in files:
            real = os.path.realpath(path)
            vol = table.volume_of_path(_existing(real))
            if vol is None or vol.dev not in group:
                where = f"{vol.mount_point} ({vol.dev})" if vol is not None else "an unknown volume"
                shown = path if real == path else f"{path} (-> {real})"
                raise OutsideGroup(
                    f"{who} depends on {shown} ({what}), which is on {where}: "
                    f"outside the group ({', '.join(group.values())})"
                )
            if group[vol.dev] not in on:
                on.append(group[vol.dev])
        if files:
            said.append(f"{who}'s {len(files)} file(s) on {', '.join(on)}")
    return "files proven on the group: " + ", ".join(said)


def depends_text(files: Sequence[tuple[str, str]]) -> str:
    """``path (what), ...`` for messages."""
    return ", ".join(f"{p} ({w})" for p, w in files)


__all__ = [
    "OLD_NAMES",
    "Claim",
    "Consistency",
    "OutsideGroup",
    "consistency",
    "depends_text",
    "level_of",
    "prove_on_group",
]
