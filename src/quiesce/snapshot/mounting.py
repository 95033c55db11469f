"""Where a snapshot is mounted, and ``quiesce snapshot mount/umount``."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from quiesce.errors import UsageError
from quiesce.host.mounts import MountTable, loop_backing_file
from quiesce.providers.base import Provider, Snapshot
from quiesce.providers.registry import get_provider
from quiesce.snapshot.manifest import Manifest
from quiesce.snapshot.readonly import MountedVolume, mount_readonly, unmount_point
from quiesce.snapshot.store import list_manifests, load, resolve_id
from quiesce.state.journal import Journal


def provider_for(man: Manifest) -> Provider:
    """The provider that made ``man``, from its recorded options; keys this version does
    not take are dropped (Provider.from_record): an old snapshot stays deletable."""
    return get_provider(man.provider).from_record(man.options)


def _slug(snap: Snapshot) -> str:
    return snap.id.split("/", 1)[-1]


def _is_block_device(path: Path) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def mounts_of(snap: Snapshot, table: MountTable | None = None) -> list[str]:
    """Where ``snap`` is mounted now (a loop mount of its image, a bind mount of its dir)."""
    table = table or MountTable.read()
    loc = Path(snap.location)
    found: list[str] = []
    if _is_block_device(loc):
        rdev = os.stat(loc).st_rdev
        dev = f"{os.major(rdev)}:{os.minor(rdev)}"
        real = os.path.realpath(loc)
        for m in table.mounts:  # directly, or through the read-only loop device over it
            backing = loop_backing_file(m.source)
            if m.dev == dev or (backing is not None and os.path.realpath(backing) == real):
                found.append(m.mount_point)
    elif not loc.is_absolute():  # a dataset snapshot (pool/fs@snap): mounted by name
        # ZFS's own automounts under .zfs/snapshot/ come and go; `zfs destroy` unmounts them.
        found.extend(
            m.mount_point
            for m in table.mounts
            if m.source == snap.location and "/.zfs/snapshot/" not in m.mount_point
        )
    elif loc.is_file():
        real = os.path.realpath(loc)
        for m in table.mounts:
            backing = loop_backing_file(m.source)
            if backing is not None and backing.removesuffix(" (deleted)") == real:
                found.append(m.mount_point)
    elif loc.is_dir():
        vol = table.volume_of_path(str(loc))
        st = os.stat(loc)
        for m in table.mounts:
            if vol is None or m.dev != vol.dev:
                continue
            with contextlib.suppress(OSError):
                mst = os.stat(m.mount_point)
                if (mst.st_dev, mst.st_ino) == (st.st_dev, st.st_ino):
                    found.append(m.mount_point)
    return found


def mount(snap_id: str, directory: str | Path, state_dir: str | Path | None = None) -> list[str]:
    """Mount a snapshot read-only (nosuid, nodev, noexec) at ``directory``; several
    volumes go to ``directory/<volume-slug>``. Returns the mount points.

    Journaled like the backup's mounts (a crash half-way is undone by ``quiesce
    cleanup``); once every volume is mounted the entries are committed: a deliberate
    mount stays until ``quiesce snapshot umount``."""
    man = load(resolve_id(snap_id, state_dir), state_dir)
    prov = provider_for(man)
    snaps = man.snapshot_objects()
    base = Path(os.path.abspath(directory))
    table = MountTable.read()
    for snap in snaps:
        loc = Path(snap.location)
        dataset = not loc.is_absolute() and "@" in snap.location
        if not (dataset or loc.exists()):
            raise UsageError(
                f"{snap.id} ({man.provider}: {snap.location}) cannot be mounted on this host",
                "mount it with the storage's own tools",
            )
        where = mounts_of(snap, table)
        if where:
            raise UsageError(
                f"{snap.id} is already mounted at {where[0]}",
                f"unmount it first: quiesce snapshot umount {where[0]}",
            )
    snaps = [prov.mount_view(s) for s in snaps]  # a guest disk: its filesystem, or refused
    done: list[MountedVolume] = []
    with Journal.open(state_dir, job=man.job) as journal:
        seen: set[str] = set()
        for snap in snaps:
            if snap.location in seen:
                continue
            seen.add(snap.location)
            target = base if len(snaps) == 1 else base / _slug(snap)
            done.append(
                mount_readonly(
                    snap.location, target, journal=journal, fstype=snap.fstype or None,
                    extra_options=prov.mount_options(snap), holds=man.id,
                    slug=_slug(snap), root=base.parent,
                )
            )  # fmt: skip
        for mv in done:  # a mount the user asked for: cleanup leaves it alone
            for eid in mv.entries:
                journal.commit(eid)
    return [str(mv.path) for mv in done]


def umount(target: str, state_dir: str | Path | None = None) -> list[str]:
    """Unmount a snapshot: by id (or a unique prefix; every mount of it) or by the
    directory ``quiesce snapshot mount`` was given (every volume of a multi-volume
    mount: the slug directories it made are removed). Refuses a directory where no
    quiesce snapshot is mounted."""
    table = MountTable.read()
    manifests = list_manifests(state_dir)
    ours = {
        p: man for man in manifests for s in man.snapshot_objects() for p in mounts_of(s, table)
    }
    path = os.path.realpath(target)
    slug_dirs: list[str] = []
    if path in ours:
        points = [path]
    elif os.path.isdir(path) and any(os.path.dirname(p) == path for p in ours):
        slug_dirs = [p for p in ours if os.path.dirname(p) == path]
        points = slug_dirs
    else:
        try:
            snap_id = resolve_id(target, state_dir, manifests)
        except UsageError as e:
            if "ambiguous" in e.message:
                raise
            raise UsageError(
                f"no quiesce snapshot is mounted at {target}",
                "give the directory from `quiesce snapshot mount`, or the snapshot id",
            ) from None
        points = [p for p, man in ours.items() if man.id == snap_id]
        if not points:
            raise UsageError(f"snapshot {snap_id} is not mounted")
    for p in sorted(set(points), key=len, reverse=True):
        unmount_point(p, table)
    for d in slug_dirs:
        with contextlib.suppress(OSError):  # not empty: something else lives there
            os.rmdir(d)
    return sorted(set(points))


__all__ = ["mount", "mounts_of", "provider_for", "umount"]
