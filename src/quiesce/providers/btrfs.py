"""btrfs: a read-only snapshot of each subvolume, through BTRFS_IOC_SNAP_CREATE_V2.

A btrfs snapshot is atomic by itself, and it blocks on a frozen btrfs (it commits a
transaction), so this provider never freezes (FreezeMode.NONE); application hooks still
run around it. Several subvolumes are snapshotted back to back: each one is an instant,
the group is not (``group_atomic = False``, and the manifest says so).

Every snapshot (and every snapshot directory ``prepare`` makes) is journaled before it
is made, like reflink's clones: a run killed while one ioctl blocks (a volume of the
group frozen by someone else) leaves subvolumes that no manifest names, and ``quiesce
cleanup`` deletes them through this provider.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from quiesce.errors import QuiesceError, UsageError
from quiesce.freezing.plan import GroupMember
from quiesce.host import proc
from quiesce.host.mounts import MountRoot, MountTable
from quiesce.providers.base import FreezeMode, Provider, Snapshot, volume_slug
from quiesce.providers.options import BtrfsOptions

# include/uapi/linux/btrfs.h
BTRFS_SUBVOL_NAME_MAX = 4039
BTRFS_SUBVOL_RDONLY = 1 << 1
BTRFS_FIRST_FREE_OBJECTID = 256  # the inode number of every subvolume root
_VOL_ARGS_V2 = struct.Struct(f"=qQQ32s{BTRFS_SUBVOL_NAME_MAX + 1}s")  # 4096 bytes
BTRFS_IOC_SNAP_CREATE_V2 = (1 << 30) | (_VOL_ARGS_V2.size << 16) | (0x94 << 8) | 23


def snap_create_args(src_fd: int, name: str, read_only: bool = True) -> bytearray:
    """struct btrfs_ioctl_vol_args_v2 for a snapshot of ``src_fd`` named ``name``."""
    raw = os.fsencode(name)
    if not raw or len(raw) > BTRFS_SUBVOL_NAME_MAX or b"/" in raw:
        raise UsageError(f"bad snapshot name {name!r}")
    flags = BTRFS_SUBVOL_RDONLY if read_only else 0
    # A mutable buffer: fcntl.ioctl copies immutable ones into 1024 bytes only.
    return bytearray(_VOL_ARGS_V2.pack(src_fd, 0, flags, b"", raw))


@dataclass
class _Job:
    target: MountRoot
    slug: str
    dest_fd: int
    path: str
    args: bytearray
    snap: Snapshot


class BtrfsProvider(Provider):
    """Options (:class:`BtrfsOptions`): ``dest`` (snapshot directory on the same btrfs; default
    ``<mount point>/.snapshots``)."""

    name: ClassVar[str] = "btrfs"
    group_atomic = False

    Options: ClassVar[type[BtrfsOptions]] = BtrfsOptions
    config: BtrfsOptions

    def __init__(
        self, options: BtrfsOptions | Mapping[str, Any] | None = None, /, **kwargs: Any
    ) -> None:
        super().__init__(options, **kwargs)
        self._jobs: list[_Job] = []
        self._made: list[str] = []  # made by a snapshot() call that has not returned
        self._new_dirs: list[str] = []

    def freeze_mode(self, members: Sequence[GroupMember]) -> FreezeMode:
        return FreezeMode.NONE

    def _subvolumes(self, members: Sequence[GroupMember]) -> list[MountRoot]:
        """One target per distinct subvolume: two subvolume mounts of one btrfs are one
        volume (one superblock) but two snapshots."""
        seen: set[int] = set()
        out = []
        for m in members:
            for t in m.targets:
                st = os.fstat(t.fd)
                if st.st_dev not in seen:
                    seen.add(st.st_dev)
                    out.append(t)
        return out

    def _dest(self, t: MountRoot) -> str:
        dest = self.config.dest
        return os.path.abspath(dest) if dest else os.path.join(t.mount.mount_point, ".snapshots")

    def check(self, members: Sequence[GroupMember]) -> None:
        table = MountTable.read()
        for m in members:
            if m.volume.fstype != "btrfs":
                raise UsageError(
                    f"{m.name} is {m.volume.fstype}, not btrfs",
                    "use a provider for that storage (reflink, lvm, zfs, command)",
                )
        for t in self._subvolumes(members):
            if os.fstat(t.fd).st_ino != BTRFS_FIRST_FREE_OBJECTID:
                raise UsageError(
                    f"{t.path} mounts a directory inside a btrfs subvolume, not a subvolume",
                    "mount the subvolume itself (-o subvol=...), or make it one",
                )
            dest = self._dest(t)
            probe = dest
            while not os.path.exists(probe) and probe != os.path.dirname(probe):
                probe = os.path.dirname(probe)
            vol = table.volume_of_path(probe)
            if vol is None or vol.dev != t.volume.dev:
                raise UsageError(
                    f"the snapshot directory {dest} is not on the btrfs of {t.path}",
                    "a btrfs snapshot stays on its filesystem: choose --option dest=DIR there",
                    option="dest",
                )

    def prepare(self, members: Sequence[GroupMember], name: str) -> None:
        slugs: set[str] = set()
        try:
            for t in self._subvolumes(members):
                slug = volume_slug(t.mount.mount_point)
                while slug in slugs:
                    slug += "_"
                slugs.add(slug)
                dest = self._dest(t)
                if not os.path.isdir(dest):
                    self._make_dirs(dest)
                snap_name = f"{name}--{slug}"
                path = os.path.join(dest, snap_name)
                if os.path.lexists(path):
                    raise UsageError(f"{path} already exists", "delete it or pick another job")
                fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                snap = Snapshot(
                    id=f"{name}/{slug}",
                    provider=self.name,
                    volume=t.mount.mount_point,
                    dev=t.volume.dev,
                    fstype="btrfs",
                    created=0.0,
                    location=path,
                    extra={"subvolume": t.mount.root},
                )
                self._jobs.append(_Job(t, slug, fd, path, snap_create_args(t.fd, snap_name), snap))
                if self.journal is not None:  # before the ioctl can make it
                    self.journal.intent(
                        "snapshot",
                        provider=self.name,
                        options=self.options,
                        snapshot=snap.to_dict(),
                    )
        except BaseException:
            self.abort()
            raise

    def _make_dirs(self, dest: str) -> None:
        """mkdir ``dest`` and its missing parents (0700), each journaled first."""
        missing = []
        probe = os.path.abspath(dest)
        while not os.path.lexists(probe) and probe != os.path.dirname(probe):
            missing.append(probe)
            probe = os.path.dirname(probe)
        for d in reversed(missing):
            if self.journal is not None:
                self.journal.intent("dir", path=d)
            os.mkdir(d, 0o700)
            os.chmod(d, 0o700)
            self._new_dirs.append(d)

    def snapshot(self, members: Sequence[GroupMember]) -> list[Snapshot]:
        out = []
        for job in self._jobs:
            t0 = time.monotonic_ns()
            try:
                fcntl.ioctl(job.dest_fd, BTRFS_IOC_SNAP_CREATE_V2, job.args)
            except OSError as e:
                raise QuiesceError(
                    f"btrfs snapshot of {job.target.path} into {job.path} failed: {e.strerror}",
                    "see the kernel log (dmesg)"
                    + ("; is the filesystem frozen?" if e.errno == errno.EBUSY else ""),
                ) from None
            self._made.append(job.path)
            job.snap.created = time.time()
            job.snap.extra["monotonic_ns"] = t0  # when the ioctl began (same clock as Window)
            job.snap.extra["ioctl_s"] = (time.monotonic_ns() - t0) / 1e9
            out.append(job.snap)
        self._made = []  # handed over: the caller deletes them if it must
        return out

    def after_thaw(self, snaps: list[Snapshot]) -> None:
        self._close()

    def _close(self) -> None:
        for job in self._jobs:
            with contextlib.suppress(OSError):
                os.close(job.dest_fd)
        self._jobs = []

    def abort(self) -> None:
        self._close()
        for path in reversed(self._made):
            with contextlib.suppress(QuiesceError):
                _delete_subvolume(path)
        self._made = []
        for d in reversed(self._new_dirs):
            with contextlib.suppress(OSError):
                os.rmdir(d)
        self._new_dirs = []

    def delete(self, snap: Snapshot) -> None:
        if os.path.lexists(snap.location):
            _delete_subvolume(snap.location)


def _delete_subvolume(path: str) -> None:
    proc.check_tool("btrfs", "subvolume", "delete", path, package="btrfs-progs")
