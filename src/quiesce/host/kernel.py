"""Thin, typed wrappers over the syscalls quiesce needs: FIFREEZE, FITHAW, syncfs, FICLONE, statx.

Direct ioctls instead of spawning fsfreeze(8): no fork/exec inside the freeze window, no
binary that might live on a frozen filesystem, and the exact errno for every outcome.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
import time
from dataclasses import dataclass

from quiesce.errors import (
    AlreadyFrozen,
    NotFrozen,
    PermissionDenied,
    QuiesceError,
    UnsupportedFilesystem,
)

# include/uapi/linux/fs.h: _IOWR('X', 119, int), _IOWR('X', 120, int), _IOW(0x94, 9, int)
FIFREEZE = 0xC0045877
FITHAW = 0xC0045878
FICLONE = 0x40049409
FICLONERANGE = 0x4020940D  # _IOW(0x94, 13, struct file_clone_range)

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_EMPTY_PATH = 0x1000
STATX_TYPE = 0x1
STATX_MNT_ID = 0x1000
STATX_ATTR_MOUNT_ROOT = 0x2000

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syncfs.argtypes = [ctypes.c_int]
_libc.statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]


class _StatxTimestamp(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_int64), ("tv_nsec", ctypes.c_uint32), ("_r", ctypes.c_int32)]


class _Statx(ctypes.Structure):
    _fields_ = [
        ("stx_mask", ctypes.c_uint32),
        ("stx_blksize", ctypes.c_uint32),
        ("stx_attributes", ctypes.c_uint64),
        ("stx_nlink", ctypes.c_uint32),
        ("stx_uid", ctypes.c_uint32),
        ("stx_gid", ctypes.c_uint32),
        ("stx_mode", ctypes.c_uint16),
        ("_spare0", ctypes.c_uint16),
        ("stx_ino", ctypes.c_uint64),
        ("stx_size", ctypes.c_uint64),
        ("stx_blocks", ctypes.c_uint64),
        ("stx_attributes_mask", ctypes.c_uint64),
        ("stx_atime", _StatxTimestamp),
        ("stx_btime", _StatxTimestamp),
        ("stx_ctime", _StatxTimestamp),
        ("stx_mtime", _StatxTimestamp),
        ("stx_rdev_major", ctypes.c_uint32),
        ("stx_rdev_minor", ctypes.c_uint32),
        ("stx_dev_major", ctypes.c_uint32),
        ("stx_dev_minor", ctypes.c_uint32),
        ("stx_mnt_id", ctypes.c_uint64),
        ("_spare", ctypes.c_uint64 * 13),
    ]


@dataclass(frozen=True)
class StatxInfo:
    mode: int
    mnt_id: int | None
    mount_root: bool | None  # None: kernel did not say (older than 5.8)


def statx(path: str | None = None, *, fd: int | None = None, follow: bool = True) -> StatxInfo:
    """Mount id and mount-root flag of a path or an open fd (st_dev lies on btrfs)."""
    buf = _Statx()
    if fd is not None:
        rc = _libc.statx(fd, b"", AT_EMPTY_PATH, STATX_TYPE | STATX_MNT_ID, ctypes.byref(buf))
    else:
        assert path is not None
        flags = 0 if follow else AT_SYMLINK_NOFOLLOW
        rc = _libc.statx(
            AT_FDCWD, os.fsencode(path), flags, STATX_TYPE | STATX_MNT_ID, ctypes.byref(buf)
        )
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    mnt_id = buf.stx_mnt_id if buf.stx_mask & STATX_MNT_ID else None
    root = None
    if buf.stx_attributes_mask & STATX_ATTR_MOUNT_ROOT:
        root = bool(buf.stx_attributes & STATX_ATTR_MOUNT_ROOT)
    return StatxInfo(mode=buf.stx_mode, mnt_id=mnt_id, mount_root=root)


def fd_mount_id(fd: int) -> int:
    """The mount id of an open fd, from /proc/self/fdinfo (works on every kernel)."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("mnt_id:"):
                return int(line.split()[1])
    raise OSError(errno.EINVAL, "no mnt_id in fdinfo", fd)


def _fs_error(err: OSError, op: str, name: str, fstype: str) -> QuiesceError:
    code = err.errno
    where = f"{name} ({fstype})" if fstype else name
    if code == errno.EPERM or code == errno.EACCES:
        return PermissionDenied(f"{op} {where}: permission denied")
    if code in (errno.EOPNOTSUPP, errno.ENOTTY, errno.ENOSYS):
        return UnsupportedFilesystem(f"{op} {where}: the filesystem does not support freezing")
    if op == "freeze" and code == errno.EBUSY:
        return AlreadyFrozen(f"{where} is already frozen by someone else (EBUSY)")
    if op == "thaw" and code == errno.EINVAL:
        return NotFrozen(f"{where} is not frozen (EINVAL)")
    return QuiesceError(
        f"{op} {where} failed: {os.strerror(code or 0)} ({errno.errorcode.get(code or 0, code)})",
        "see the kernel log (dmesg) for the filesystem's own message",
    )


def fifreeze(fd: int, name: str = "", fstype: str = "") -> None:
    """Freeze the filesystem of ``fd``; raises AlreadyFrozen on EBUSY (never ours to thaw)."""
    code = freeze_errno(fd)
    if code:
        raise error_for(code, "freeze", name or f"fd {fd}", fstype)


def fithaw(fd: int, name: str = "", fstype: str = "") -> None:
    """Thaw the filesystem of ``fd`` (one attempt); raises NotFrozen on EINVAL."""
    try:
        fcntl.ioctl(fd, FITHAW, 0)
    except OSError as e:
        raise error_for(e.errno or errno.EIO, "thaw", name or f"fd {fd}", fstype) from None


def syncfs(fd: int) -> None:
    """Flush one filesystem (not all of them, like sync(2)) so the freeze has little left to do."""
    if _libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def ficlone(dst_fd: int, src_fd: int) -> None:
    """Make dst share src's extents (a reflink copy): O(metadata), not O(data)."""
    fcntl.ioctl(dst_fd, FICLONE, src_fd)


def ficlonerange(dst_fd: int, src_fd: int, offset: int, length: int) -> None:
    """Make ``length`` bytes of dst at ``offset`` share src's extents at the same offset
    (block-aligned, or reaching src's end of file)."""
    fcntl.ioctl(dst_fd, FICLONERANGE, struct.pack("=qQQQ", src_fd, offset, length, offset))


def open_dir(path: str) -> int:
    """Open a directory for freezing: O_RDONLY never blocks on a frozen filesystem."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


THAW_RETRY_DELAYS = (0.01, 0.05, 0.2)


def thaw_errno(fd: int, retry_delays: tuple[float, ...] = THAW_RETRY_DELAYS) -> int:
    """FITHAW with a bounded retry; returns 0 or the final errno (EINVAL: not frozen).

    Never a "thaw until error" loop: that would undo freezes other holders own.
    EINVAL, EPERM and EOPNOTSUPP are final at once; other errors (EIO from a failing
    ->unfreeze_fs, EINTR) are retried a few times.
    """

    attempt = 0
    while True:
        try:
            fcntl.ioctl(fd, FITHAW, 0)
            return 0
        except OSError as e:
            code = e.errno or errno.EIO
        if code in (errno.EINVAL, errno.EPERM, errno.EOPNOTSUPP) or attempt >= len(retry_delays):
            return code
        time.sleep(retry_delays[attempt])
        attempt += 1


def freeze_errno(fd: int) -> int:
    """FIFREEZE returning 0 or the errno (for callers that report, not raise)."""
    try:
        fcntl.ioctl(fd, FIFREEZE, 0)
        return 0
    except OSError as e:
        return e.errno or errno.EIO


def checked_thaw_errno(fd: int) -> tuple[int, int]:
    """FITHAW only a freeze the kernel still holds (docs/kernel.md §11).

    A FIFREEZE probe first: EBUSY means still frozen, then FITHAW. A probe that froze
    means someone else had thawed the freeze: the probe's own freeze is undone at once.
    Any other answer means it was not frozen. Returns (probe errno, FITHAW errno)."""
    probe = freeze_errno(fd)
    if probe == errno.EBUSY:
        return probe, thaw_errno(fd)
    if probe == 0:
        return probe, thaw_errno(fd)  # undo the probe's own freeze (ours, just made)
    return probe, errno.EINVAL


def error_for(code: int, op: str, name: str, fstype: str = "") -> QuiesceError:
    """The typed error for an errno returned by freeze_errno/thaw_errno."""
    return _fs_error(OSError(code, os.strerror(code)), op, name, fstype)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename or a new entry in ``path`` durable (fsync of the directory)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
