"""Deleting a snapshot: from the storage through its provider, then its manifest."""

from __future__ import annotations

from pathlib import Path

from quiesce.errors import UsageError
from quiesce.host.mounts import MountTable
from quiesce.snapshot.manifest import Manifest
from quiesce.snapshot.mounting import mounts_of, provider_for
from quiesce.snapshot.store import (
    _manifest_path,
    load,
    resolve_id,
    save_manifest,
    state_dir_path,
)


def delete(snap_id: str, state_dir: str | Path | None = None, *, forget: bool = False) -> Manifest:
    """Delete a snapshot from the storage (unless ``forget``), then its manifest.
    Refuses while any part of it is mounted."""
    state = state_dir_path(state_dir)
    snap_id = resolve_id(snap_id, state)
    man = load(snap_id, state)
    snaps = man.snapshot_objects()
    table = MountTable.read()
    for snap in snaps:
        where = mounts_of(snap, table)
        if where:
            raise UsageError(
                f"{snap.id} is mounted at {where[0]}",
                f"unmount it first: quiesce snapshot umount {where[0]}",
            )
    if not forget:
        prov = provider_for(man)
        left = list(snaps)
        for snap in snaps:
            try:
                prov.delete(snap)
            except BaseException:
                man.snapshots = list(left)
                save_manifest(state, man)
                raise
            left.remove(snap)
    _manifest_path(state, snap_id).unlink()
    return man


__all__ = ["delete"]
