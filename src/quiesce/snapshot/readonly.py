"""Read-only mounts of a snapshot's volumes, journaled: what ``quiesce snapshot mount``
and the backup's stable paths (:mod:`quiesce.backup.mount`) are both built on.

Images (a reflink clone) and block devices (an LVM snapshot) go through a *read-only*
loop device, so nothing, not even a journal replay, can write to the snapshot; they are
mounted ``ro,nosuid,nodev,noexec`` plus the options the filesystem needs (the
provider's ``mount_options``: XFS clone ``nouuid,norecovery``; a frozen ext4 clone plain
``ro``; a btrfs clone relies on the kernel's temp-fsid). A directory (a btrfs snapshot
subvolume) is bind-mounted with the same flags. Every loop device, directory and mount
is written to the cleanup journal before it is made; :func:`unmount_point` removes a
mount (and its loop device) with the journal's own undo actions.

The mount point is a trust boundary like the state directory (:mod:`quiesce.host.trust`):
the mount root and every directory above it must be root's and not writable by others
(else another user pre-creates the mount point and reads the snapshot through it, or
plants a link that makes root mount it over a directory of their choice). The mount point
is reached without following a link, checked through its fd, and ``mount`` is given that
fd (``/proc/self/fd/N``, ``--no-canonicalize``): what was checked is where it mounts. The
journal records the mount's id, so cleanup removes that mount and no other.
"""

from __future__ import annotations

import contextlib
import os
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quiesce.errors import MountError, QuiesceError, UsageError
from quiesce.host import kernel, proc
from quiesce.host.mounts import MountTable, loop_backing_file
from quiesce.host.trust import TrustError, open_trusted_dir
from quiesce.state.journal import Journal
from quiesce.state.undo import undo_entry

DEFAULT_MOUNT_ROOT = "/run/quiesce/backup"  # the backup's stable paths: <root>/<job>/<slug>

SAFE_OPTIONS = ["ro", "nosuid", "nodev", "noexec"]
DEFAULT_OPTIONS: dict[str, list[str]] = {
    "xfs": ["nouuid", "norecovery"],  # same UUID as the origin; frozen log: covered, not clean
    "ext4": [],  # a frozen ext4 has no needs_recovery: plain ro
    "ext3": [],
    "ext2": [],
    "btrfs": [],  # kernel >= 6.7 mounts a clone with a temp-fsid by itself
}
# Retried once, with a warning, when the plain mount fails: a crash-consistent copy
# needs journal recovery, which a read-only device cannot do.
NO_REPLAY: dict[str, list[str]] = {
    "ext4": ["noload"],
    "ext3": ["noload"],
    "btrfs": ["rescue=nologreplay"],
}


@dataclass
class MountedVolume:
    """One snapshot volume mounted for the backup."""

    slug: str
    path: Path
    location: str  # clone file, device, directory
    source: str  # what is mounted: /dev/loopN or the directory
    fstype: str
    options: list[str]
    snapshot_id: str | None = None
    warnings: list[str] = field(default_factory=list)
    entries: list[int] = field(default_factory=list)  # journal ids, in creation order

    def to_dict(self) -> dict[str, Any]:
        return {
            "slug": self.slug,
            "path": str(self.path),
            "location": self.location,
            "source": self.source,
            "fstype": self.fstype,
            "options": ",".join(self.options),
            "snapshot_id": self.snapshot_id,
            "warnings": self.warnings,
        }


def probe_fstype(source: str) -> str:
    """The filesystem type on a device or image file, from its superblock (blkid -p)."""
    p = proc.run_tool("blkid", "-p", "-o", "value", "-s", "TYPE", source)
    fstype = p.stdout.strip()
    if p.returncode != 0 or not fstype:
        raise MountError(f"no filesystem found on {source}", "is it a snapshot of a filesystem?")
    return fstype


def is_mount_point(path: Path, table: MountTable | None = None) -> bool:
    table = table or MountTable.read()
    return any(m.mount_point == str(path) for m in table.mounts)


def probe(source: str) -> dict[str, str]:
    """blkid's view of the superblock on a device or image file (TYPE, BLOCK_SIZE, ...)."""
    p = proc.run_tool("blkid", "-p", "-o", "export", source)
    return dict(
        line.split("=", 1) for line in p.stdout.splitlines() if "=" in line
    )  # fmt: skip


def _losetup(backing: str, *extra: str) -> str:
    last = ""
    for attempt in range(20):  # parallel losetup -f can race for the same free device
        p = proc.run_tool("losetup", "--find", "--show", "--read-only", *extra, backing)
        if p.returncode == 0:
            return p.stdout.strip()
        last = p.stderr.strip()
        time.sleep(0.05 * (attempt + 1))
    raise MountError(f"cannot attach {backing} to a loop device: {last}")


def _sector_size(device: str) -> int:
    path = Path("/sys/block") / Path(device).name / "queue" / "logical_block_size"
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return 512


def _attach_readonly(journal: Journal, location: str, fs_block: int | None) -> tuple[str, int]:
    """A read-only loop device, with direct I/O when the filesystem allows it.

    Direct I/O keeps the snapshot's data out of the page cache twice (measured: buffered
    costs restic 2-3x the system CPU time on a 2 GiB tree). But a reflinked file's
    direct I/O alignment is the host filesystem's block size, which becomes the loop
    device's sector size: a filesystem with smaller blocks (a 1 KiB-block ext4, an XFS
    with 512-byte sectors) cannot be mounted on it, so it gets a buffered device.
    """
    backing = os.path.realpath(location)
    eid = journal.intent("loop", backing=backing)
    try:
        device = _losetup(backing, "--direct-io=on")
        journal.update(eid, device=device)
        if fs_block is None or _sector_size(device) > fs_block:
            journal.undo(eid)
            eid = journal.intent("loop", backing=backing)
            device = _losetup(backing)
            journal.update(eid, device=device)
    except BaseException:
        with contextlib.suppress(QuiesceError, OSError):
            journal.undo(eid)
        raise
    return device, eid


def _make_dirs(journal: Journal, path: Path, upto: Path) -> tuple[list[int], Path]:
    """mkdir the missing components of ``path`` below ``upto``, each journaled first,
    each made inside its parent's fd (reached without following a link, checked); the
    mount root ``upto`` (made 0700 if missing) must be a directory root may trust."""
    if upto not in path.parents:
        raise UsageError(f"the mount point {path} is not below {upto}")
    made = []
    fd = open_trusted_dir(upto, create=True, what="the mount root", as_parent=True)
    try:
        where = upto
        for name in path.relative_to(upto).parts:
            where = where / name
            try:
                nxt = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY, dir_fd=fd)
            except FileNotFoundError:
                made.append(journal.intent("dir", path=str(where)))
                os.mkdir(name, 0o700, dir_fd=fd)
                nxt = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY, dir_fd=fd)
            except OSError as e:  # ELOOP (a link), ENOTDIR
                raise TrustError(
                    f"refusing the mount point {path}: {where} is not a directory root made "
                    f"({e.strerror})",
                    f"remove {where} if root did not make it",
                    culprit=str(where),
                ) from None
            os.close(fd)
            fd = nxt
    finally:
        os.close(fd)
    return made, where


def mount_readonly(
    location: str,
    target: Path,
    *,
    journal: Journal,
    fstype: str | None = None,
    extra_options: Sequence[str] | None = None,
    holds: str | None = None,
    slug: str | None = None,
    root: Path | None = None,
) -> MountedVolume:
    """Mount ``location`` (image file, block device, directory, or ZFS ``fs@snap``)
    read-only at ``target``; undone via the journal on failure."""
    target = Path(os.path.abspath(target))
    table = MountTable.read()
    if is_mount_point(target, table):
        raise UsageError(
            f"{target} is already a mount point",
            "another backup of this job is running, or a crashed one left it: "
            "run `quiesce cleanup`",
        )
    entries: list[int] = []
    warnings: list[str] = []
    try:
        made, target = _make_dirs(journal, target, Path(os.path.abspath(root or target.parent)))
        entries += made
        loc = Path(location)
        mode = os.stat(location).st_mode if loc.exists() else 0
        bind = stat.S_ISDIR(mode)
        if stat.S_ISREG(mode) or stat.S_ISBLK(mode):
            sb = probe(location)
            fstype = fstype or sb.get("TYPE") or probe_fstype(location)
            block = sb.get("BLOCK_SIZE")
            source, eid = _attach_readonly(journal, location, int(block) if block else None)
            entries.append(eid)
            backing = os.path.realpath(location)
        elif bind:
            source, backing = location, None
            fstype = fstype or "none"
        elif "@" in location and not loc.exists():
            source, backing, fstype = location, None, fstype or "zfs"
        else:
            raise UsageError(f"cannot mount {location}: not a file, device or directory")
        options = [*SAFE_OPTIONS]
        wanted = list(extra_options) if extra_options is not None else None
        if wanted is None:
            wanted = DEFAULT_OPTIONS.get(fstype, [])
        options += [o for o in wanted if o not in options]
        target_fd = open_trusted_dir(target, what="the mount point")
        try:
            eid = journal.intent(
                "mount", target=str(target), source=source, backing=backing, holds=holds,
                dev=_expected_dev(source, bind, table),
            )  # fmt: skip
            entries.append(eid)
            err = _mount(source, target_fd, fstype, options, bind)
            if err and fstype in NO_REPLAY and not bind:
                retry = options + [o for o in NO_REPLAY[fstype] if o not in options]
                if _mount(source, target_fd, fstype, retry, bind) is None:
                    options = retry
                    err = None
                    warnings.append(
                        f"{location} needed journal recovery (a crash-consistent copy): "
                        f"mounted with {','.join(NO_REPLAY[fstype])}, the latest writes may "
                        "be missing"
                    )
            if err:
                raise MountError(f"cannot mount {location} ({fstype}) at {target}: {err}")
            mnt_id = _mounted_on(target_fd, target)
            if mnt_id is not None:
                journal.update(eid, mnt_id=mnt_id)
        finally:
            os.close(target_fd)
    except BaseException:
        for eid in reversed(entries):
            with contextlib.suppress(QuiesceError, OSError):
                journal.undo(eid)
        raise
    return MountedVolume(
        slug=slug or target.name,
        path=target,
        location=location,
        source=source,
        fstype=fstype,
        options=options,
        snapshot_id=holds,
        warnings=warnings,
        entries=entries,
    )


def _mounted_on(target_fd: int, target: Path) -> int | None:
    """The id of the mount just made on the directory ``target_fd`` (the newest mount at
    ``target`` whose parent is the mount that directory is on)."""
    under = kernel.fd_mount_id(target_fd)
    ids = [
        m.mount_id
        for m in MountTable.read().mounts
        if m.mount_point == str(target) and m.parent_id == under
    ]
    return ids[-1] if ids else None


def _expected_dev(source: str, bind: bool, table: MountTable) -> str | None:
    """The ``major:minor`` mountinfo will show for this mount (the journal's check that
    a mount found at the target later is ours)."""
    if bind:
        vol = table.volume_of_path(source)
        return vol.dev if vol is not None else None
    with contextlib.suppress(OSError):
        st = os.stat(source)
        if stat.S_ISBLK(st.st_mode):
            return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    return None


def _mount(source: str, target_fd: int, fstype: str, options: list[str], bind: bool) -> str | None:
    """mount onto the checked directory itself: ``/proc/self/fd/N`` of the fd passed down,
    not canonicalized (util-linux would resolve it back to a path someone could swap)."""
    opts = ",".join(options)
    at = f"/proc/self/fd/{target_fd}"
    if not bind:
        argv = ["mount", "--no-canonicalize", "-t", fstype, "-o", opts, source, at]
        p = proc.run_tool(*argv, pass_fds=(target_fd,))
        return None if p.returncode == 0 else (p.stderr.strip() or f"exit {p.returncode}")
    # A bind mount takes its flags in a second step (remount,bind) on the new mount's own
    # root, which the fd (the directory under it) is not: bind, then remount through an fd
    # of the new mount's root, opened below the same checked directory's parent.
    p = proc.run_tool("mount", "--no-canonicalize", "--bind", source, at, pass_fds=(target_fd,))
    if p.returncode != 0:
        return p.stderr.strip() or f"exit {p.returncode}"
    path = os.readlink(at)
    new_id = _mounted_on(target_fd, Path(path))
    root = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if new_id is None or kernel.fd_mount_id(root) != new_id:
            return f"the bind mount at {path} was replaced before its flags were set"
        argv = ["mount", "--no-canonicalize", "-o", f"remount,bind,{opts}", f"/proc/self/fd/{root}"]
        p = proc.run_tool(*argv, pass_fds=(root,))
    finally:
        os.close(root)
    return None if p.returncode == 0 else (p.stderr.strip() or f"exit {p.returncode}")


def unmount(mv: MountedVolume, journal: Journal) -> None:
    """Unmount, detach the loop device, remove the directories (newest first)."""
    errors = []
    for eid in reversed(mv.entries):
        try:
            journal.undo(eid)
        except (QuiesceError, OSError) as e:
            errors.append(str(e))
    if errors:
        raise MountError("; ".join(errors), "run `quiesce cleanup` to retry")


def unmount_point(target: str, table: MountTable | None = None) -> None:
    """Unmount a read-only snapshot mount found at ``target`` and detach its loop device
    (the same undo actions the journal uses, so both remove things the same way)."""
    table = table or MountTable.read()
    source = next((m.source for m in table.mounts if m.mount_point == target), None)
    backing = loop_backing_file(source) if source and source.startswith("/dev/loop") else None
    undo_entry("mount", {"target": target, "source": source}, {})
    if backing:
        undo_entry("loop", {"backing": backing.removesuffix(" (deleted)"), "device": source}, {})


__all__ = [
    "DEFAULT_MOUNT_ROOT",
    "DEFAULT_OPTIONS",
    "NO_REPLAY",
    "SAFE_OPTIONS",
    "MountError",
    "MountedVolume",
    "is_mount_point",
    "mount_readonly",
    "probe",
    "probe_fstype",
    "unmount",
    "unmount_point",
]
