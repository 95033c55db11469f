"""Where a snapshot is mounted, and ``quiesce snapshot mount/umount``."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from quiesce.errors import QuiesceError, UsageError
from quiesce.providers.base import Provider, Snapshot
from quiesce.providers.registry import get_provider
from quiesce.snapshot.manifest import Manifest
from quiesce.snapshot.store import list_manifests, load
from quiesce.sys import proc
from quiesce.sys.mounts import MountTable, loop_backing_file


def provider_for(man: Manifest) -> Provider:
    """The provider that made ``man``, from its recorded options; keys this version does
    not take are dropped (Provider.from_record): an old snapshot stays deletable."""
    return get_provider(man.provider).from_record(man.options)


def _run(*cmd: str) -> None:
    proc.check_tool(*cmd, hint="see the kernel log (dmesg) for the filesystem's own message")


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
        found.extend(m.mount_point for m in table.mounts if m.dev == dev)
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
    volumes go to ``directory/<volume-slug>``. Returns the mount points."""
    man = load(snap_id, state_dir)
    prov = provider_for(man)
    snaps = man.snapshot_objects()
    base = Path(os.path.abspath(directory))
    table = MountTable.read()
    done: list[str] = []
    seen: set[str] = set()
    for snap in snaps:
        if snap.location in seen:
            continue
        seen.add(snap.location)
        loc = Path(snap.location)
        block = _is_block_device(loc)
        dataset = not loc.is_absolute() and "@" in snap.location
        if not (block or dataset or loc.is_file() or loc.is_dir()):
            raise UsageError(
                f"{snap.id} ({man.provider}: {snap.location}) cannot be mounted on this host",
                "mount it with the storage's own tools",
            )
        where = mounts_of(snap, table)
        if where:
            raise UsageError(f"{snap.id} is already mounted at {where[0]}")
        target = base if len(snaps) == 1 else base / _slug(snap)
        target.mkdir(parents=True, exist_ok=True)
        opts = ",".join(["ro", "nosuid", "nodev", "noexec", *prov.mount_options(snap)])
        try:
            if block or dataset:  # an LV snapshot /dev/vg/lv, a ZFS pool/fs@snap
                _run("mount", "-t", snap.fstype, "-o", opts, snap.location, str(target))
            elif loc.is_file():
                _run("mount", "-t", snap.fstype, "-o", f"loop,{opts}", str(loc), str(target))
            else:
                _run("mount", "--bind", "-o", opts, str(loc), str(target))
        except QuiesceError:
            for t in reversed(done):
                _umount_one(t, table)
            raise
        done.append(str(target))
    return done


def _umount_one(target: str, table: MountTable) -> None:
    source = next((m.source for m in table.mounts if m.mount_point == target), None)
    _run("umount", target)
    # mount -o loop sets autoclear; detach explicitly if the device outlived the umount.
    if source and source.startswith("/dev/loop") and loop_backing_file(source):
        still = MountTable.read()
        if not any(m.source == source for m in still.mounts):
            proc.try_tool("losetup", "-d", source)


def umount(target: str, state_dir: str | Path | None = None) -> list[str]:
    """Unmount a snapshot: by id (every mount of it) or by the directory it is mounted on.
    Refuses a directory where no quiesce snapshot is mounted."""
    table = MountTable.read()
    manifests = list_manifests(state_dir)
    by_id = {m.id: m for m in manifests}
    if target in by_id:
        points = [p for s in by_id[target].snapshot_objects() for p in mounts_of(s, table)]
        if not points:
            raise UsageError(f"snapshot {target} is not mounted")
    else:
        path = os.path.realpath(target)
        ours = {p for man in manifests for s in man.snapshot_objects() for p in mounts_of(s, table)}
        if path not in ours:
            raise UsageError(
                f"no quiesce snapshot is mounted at {target}",
                "give the directory from `quiesce snapshot mount`, or the snapshot id",
            )
        points = [path]
    for p in sorted(set(points), key=len, reverse=True):
        _umount_one(p, table)
    return points


__all__ = ["mount", "mounts_of", "provider_for", "umount"]
