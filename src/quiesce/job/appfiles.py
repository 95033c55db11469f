"""Files an application returns that must lie beside its restored data: PostgreSQL's
``backup_label`` (and ``tablespace_map``) from ``pg_backup_stop``; and files a restore
removes (the origin's ``postmaster.pid``). Without the label a
copy taken inside ``pg_backup_start/stop`` cannot be recovered to a point in time. The
job keeps them in the manifest (``app_files``), keyed by the volume and the path in it
where the writer's data directory is, so that ``quiesce restore`` can write them there.

Files marked ``pitr`` are for a point-in-time recovery only: with ``backup_label`` in
place PostgreSQL replays WAL up to the end-of-backup record, which ``pg_backup_stop``
writes after the thaw, so it is never in the snapshot ("WAL ends before end of online
backup") and must come from the WAL archive. The snapshot itself is atomic over the
group, so without the label the data directory starts as after a power cut. A restore
therefore writes them as ``backup_label.quiesce`` unless asked for ``--pitr``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from quiesce.providers.base import volume_slug
from quiesce.snapshot import save_manifest

FILE_KEYS = ("backup_label", "tablespace_map")  # writer info key = file name
# what a restore removes from a data directory: the origin's lock file names a pid that
# may live (the origin itself, on this host), and then postgres refuses to start
REMOVE = {"postgresql": ("postmaster.pid", "postmaster.opts")}


def _slug(manifest: Any, mount_point: str) -> str:
    """The volume's name in the backup (backup.mount.mounted_snapshots names it so)."""
    for snap in manifest.snapshot_objects():
        if snap.volume == mount_point and "/" in snap.id:
            return snap.id.split("/", 1)[-1]
    return volume_slug(mount_point)


def _place(manifest: Any, data_directory: str | None, name: str) -> dict[str, str]:
    if not data_directory:
        return {}
    real = os.path.realpath(data_directory)
    best = ""
    for v in manifest.volumes:
        mp = str(v["mount_point"])
        inside = real == mp or real.startswith(mp.rstrip("/") + "/")
        if inside and len(mp) > len(best):
            best = mp
    if not best:
        return {}
    rel = os.path.relpath(os.path.join(real, name), best)
    return {"volume": best, "slug": _slug(manifest, best), "path": rel}


def app_files(manifest: Any, writers: Sequence[Any]) -> list[dict[str, Any]]:
    """What the writers returned, placed on the job's volumes where possible."""
    files: list[dict[str, Any]] = []
    for w in writers:
        for name in FILE_KEYS:
            content = w.info.get(name)
            if content:
                place = _place(manifest, w.info.get("data_directory"), name)
                files.append(
                    {"writer": w.name, "name": name, "content": content, "pitr": True, **place}
                )
        for name in REMOVE.get(getattr(w, "kind", ""), ()):
            place = _place(manifest, w.info.get("data_directory"), name)
            if place:
                files.append({"writer": w.name, "name": name, "remove": True, **place})
    return files


def keep_app_files(manifest: Any, writers: Sequence[Any], state: str | Path | None) -> list[str]:
    """Store the writers' files in the manifest; returns warnings (a file it cannot place)."""
    files = app_files(manifest, writers)
    if not files:
        return []
    manifest.app_files = files
    save_manifest(Path(state) if state else None, manifest)
    return [
        f"{f['writer']}: its data directory is not on a volume of the job: {f['name']} is "
        f"in the manifest {manifest.id} only; copy it into the data directory after a restore"
        for f in files
        if "path" not in f and not f.get("remove")
    ]


__all__ = ["FILE_KEYS", "app_files", "keep_app_files"]
