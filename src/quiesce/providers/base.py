"""The provider interface: what takes the snapshot.

A provider says how the group must be quiesced around its ``snapshot`` call
(:class:`FreezeMode`), and does its slow work in ``prepare`` (outside the window) so
that ``snapshot`` (inside the window) is only the storage call itself: no imports, no
subprocess whose binary or output lives on a group volume, no writes to a group volume.
"""

from __future__ import annotations

import enum
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Self

from quiesce.errors import UsageError
from quiesce.freezing.plan import GroupMember
from quiesce.providers.options import ProviderOptions


class FreezeMode(enum.StrEnum):
    FIFREEZE = "fifreeze"  # quiesce freezes the group around snapshot() (block-level copies)
    PROVIDER = "provider"  # the storage freezes the fs itself (one LV: LVM's dm suspend)
    NONE = "none"  # atomic snapshots that must not be frozen (btrfs, zfs)


@dataclass
class Snapshot:
    """One snapshot of one volume, as a provider made it."""

    id: str  # unique, predictable: <name>/<volume-slug>
    provider: str
    volume: str  # origin mount point
    dev: str
    fstype: str
    created: float  # unix time
    location: str  # clone file, subvolume path, /dev/vg/lv, pool/fs@snap, snap-0123...
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Provider(ABC):
    """Base class. Subclasses set ``name``, their option model ``Options`` and implement
    ``snapshot`` (and usually more).

    Constructed from its option model (``ReflinkProvider(ReflinkOptions(dest=...))``) or
    from a dict or keywords validated into it: an unknown key or a wrong type raises
    :class:`~quiesce.providers.options.ProviderOptionsError` before anything runs.
    ``config`` is the typed model; ``options`` the JSON-able keys that were given (the
    manifest's record, from which :meth:`from_record` re-creates the provider).
    """

    name: ClassVar[str]
    Options: ClassVar[type[ProviderOptions]] = ProviderOptions
    # False if snapshot() of several members is not one instant (btrfs: back to back).
    group_atomic: bool = True  # a class default; zfs decides per group (one pool or several)

    def __init__(
        self, options: ProviderOptions | Mapping[str, Any] | None = None, /, **kwargs: Any
    ) -> None:
        self.config: ProviderOptions = self.Options.parse(options, **kwargs)
        self.options: dict[str, Any] = self.config.to_options()
        # Set by snapshots.create: record every file/snapshot *before* making it, so that
        # `quiesce cleanup` can remove what a killed run left (journal.Journal).
        self.journal: Any = None

    @classmethod
    def from_record(cls, options: Mapping[str, Any] | None) -> Self:
        """The provider that made a recorded snapshot (manifest, journal), to mount or
        delete it: recorded keys this version no longer takes are dropped, not refused,
        so a snapshot is never stranded by a renamed option (Options.lenient)."""
        return cls(cls.Options.lenient(options))

    def freeze_mode(self, members: Sequence[GroupMember]) -> FreezeMode:
        return FreezeMode.FIFREEZE

    def check(self, members: Sequence[GroupMember]) -> None:
        """Refuse a group this provider cannot snapshot, before anything changes."""

    def prepare(self, members: Sequence[GroupMember], name: str) -> None:
        """Slow work outside the window: resolve devices, pick names, import libraries."""

    def before_freeze(self, members: Sequence[GroupMember]) -> None:
        """The last work outside the window, after the writers quiesced and the volumes
        were flushed (the guardian is armed, nothing is frozen yet): whatever the flush
        wrote that the window would otherwise have to handle."""

    def before_freeze_step(self) -> str | None:
        """What ``before_freeze`` does, for ``--dry-run`` (None: nothing)."""
        return None

    @abstractmethod
    def snapshot(self, members: Sequence[GroupMember]) -> list[Snapshot]:
        """Inside the window: take the snapshot of every member, fast."""

    def after_thaw(self, snaps: list[Snapshot]) -> None:
        """Work that must wait for the thaw (e.g. waiting for a cloud snapshot to complete)."""

    def abort(self) -> None:
        """After a failure, and after the thaw: undo ``prepare`` (close fds, remove empty
        files it made) and remove whatever a failed ``snapshot`` call had half made.
        Snapshots that ``snapshot`` returned are removed with ``delete`` instead. Must not
        raise."""

    def delete(self, snap: Snapshot) -> None:
        raise UsageError(f"the {self.name} provider cannot delete snapshots")

    def mount_view(self, snap: Snapshot) -> Snapshot:
        """The snapshot as a read-only mount sees it (the backup, ``quiesce snapshot
        mount``): by default itself. A provider whose snapshots are not filesystems by
        construction (``qemu``: a guest's disk image) finds what the snapshot holds and
        returns it with its real ``fstype``, or raises a MountError saying what it holds
        and what to do, before anything is mounted."""
        return snap

    def mount_options(self, snap: Snapshot) -> list[str]:
        """Extra mount options the snapshot's filesystem needs (XFS: nouuid,norecovery)."""
        return []


def block_copy_mount_options(fstype: str) -> list[str]:
    """What a block-level copy of a frozen filesystem (a reflink clone, an LVM snapshot, a
    guest disk's clone) needs to mount read-only next to its origin."""
    if fstype == "xfs":
        return ["nouuid", "norecovery"]  # duplicate UUID; frozen XFS log is covered, not clean
    return []  # ext4: a frozen copy has no needs_recovery and mounts plain ro


def volume_slug(mount_point: str) -> str:
    """A file-name-safe name for a volume: ``/srv/db`` -> ``srv-db``, ``/`` -> ``root``."""
    text = re.sub(r"[^A-Za-z0-9._]+", "-", mount_point.strip("/")).strip("-.")
    return text or "root"
