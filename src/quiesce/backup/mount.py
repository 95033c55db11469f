"""Mount a snapshot read-only at a stable path, for the backup to read, and unmount it.

The path is ``<mount_root>/<job>/<volume-slug>`` (default root ``/run/quiesce/backup``),
the same every night: restic and borg key their "unchanged file" caches on the path, so
a stable path is what lets an incremental backup skip the files it already has.

The read-only, journaled mount machinery itself (loop devices, options, probing) is the
snapshot layer's :mod:`quiesce.snapshot.readonly`, which ``quiesce snapshot mount``
uses too; its names are re-exported here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

from quiesce.errors import QuiesceError, UsageError
from quiesce.providers.base import Provider, Snapshot, volume_slug
from quiesce.snapshot.readonly import (
    DEFAULT_MOUNT_ROOT,
    DEFAULT_OPTIONS,
    MountedVolume,
    MountError,
    is_mount_point,
    mount_readonly,
    probe_fstype,
    unmount,
)
from quiesce.state.journal import Journal


def stable_path(job: str, slug: str, root: str | Path = DEFAULT_MOUNT_ROOT) -> Path:
    for part in (job, slug):
        if not part or "/" in part or part in (".", ".."):
            raise UsageError(f"{part!r} cannot be part of a mount path")
    return Path(root) / job / slug


@contextlib.contextmanager
def mounted_snapshots(
    snaps: Sequence[Snapshot],
    *,
    job: str,
    journal: Journal,
    root: str | Path = DEFAULT_MOUNT_ROOT,
    provider: Provider | None = None,
    holds: str | None = None,
) -> Iterator[list[MountedVolume]]:
    """Mount every volume of a snapshot at ``<root>/<job>/<slug>``; unmount on exit.

    The provider's ``mount_view`` first, for every volume: one it refuses (a guest disk
    holding a partition table) fails the whole backup before anything is mounted."""
    base = Path(root)
    done: list[MountedVolume] = []
    slugs: set[str] = set()
    if provider is not None:
        snaps = [provider.mount_view(s) for s in snaps]
    try:
        for snap in snaps:
            slug = snap.id.split("/", 1)[-1] if "/" in snap.id else volume_slug(snap.volume)
            while slug in slugs:
                slug += "_"
            slugs.add(slug)
            target = stable_path(job, slug, base)
            opts = provider.mount_options(snap) if provider is not None else None
            done.append(
                mount_readonly(
                    snap.location,
                    target,
                    journal=journal,
                    fstype=snap.fstype or None,
                    extra_options=opts,
                    holds=holds or snap.id,
                    slug=slug,
                    root=base,
                )
            )
        yield done
    finally:
        errors = []
        for mv in reversed(done):
            try:
                unmount(mv, journal)
            except QuiesceError as e:
                errors.append(e.message)
        if errors:
            raise MountError("; ".join(errors), "run `quiesce cleanup` to retry")


__all__ = [
    "DEFAULT_MOUNT_ROOT",
    "DEFAULT_OPTIONS",
    "MountError",
    "MountedVolume",
    "is_mount_point",
    "mount_readonly",
    "mounted_snapshots",
    "probe_fstype",
    "stable_path",
    "unmount",
]
