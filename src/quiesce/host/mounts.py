"""The mount model: /proc/self/mountinfo parsed into volumes identified by superblock.

A *volume* is one superblock (``major:minor`` in mountinfo). Bind mounts and btrfs
subvolume mounts of one filesystem share it, and so share one freeze state.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from quiesce.errors import (
    NotADirectory,
    NotAMountRoot,
    PathNotFound,
    PermissionDenied,
    QuiesceError,
)
from quiesce.host import kernel

MOUNTINFO = "/proc/self/mountinfo"
_ESCAPE = re.compile(r"\\([0-7]{3})")


def unescape(field_text: str) -> str:
    """Undo mountinfo's octal escapes (``\\040`` space, ``\\011`` tab, ``\\012``, ``\\134``)."""
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field_text)


def escape(text: str) -> str:
    """The inverse of :func:`unescape`, as the kernel's seq_escape does it."""
    return "".join(f"\\{ord(c):03o}" if c in " \t\n\\" else c for c in text)


@dataclass(frozen=True)
class Mount:
    """One line of mountinfo (proc(5))."""

    mount_id: int
    parent_id: int
    dev: str  # "major:minor" of the superblock
    root: str  # path inside the filesystem that is mounted here
    mount_point: str
    options: tuple[str, ...]  # per-mount options
    optional: tuple[str, ...]  # shared:N, master:N, ...
    fstype: str
    source: str
    super_options: tuple[str, ...]

    @property
    def read_only_sb(self) -> bool:
        return "ro" in self.super_options

    def super_option(self, key: str) -> str | None:
        prefix = key + "="
        for opt in self.super_options:
            if opt.startswith(prefix):
                return opt[len(prefix) :]
        return None


class MountinfoError(ValueError):
    pass


def parse_mountinfo_line(line: str) -> Mount:
    parts = line.rstrip("\n").split(" ")
    try:
        sep = parts.index("-", 6)
    except ValueError:
        raise MountinfoError(f"no '-' separator in mountinfo line: {line!r}") from None
    if len(parts) < sep + 3 or sep < 6:
        raise MountinfoError(f"short mountinfo line: {line!r}")
    try:
        mount_id, parent_id = int(parts[0]), int(parts[1])
    except ValueError:
        raise MountinfoError(f"bad mount id in mountinfo line: {line!r}") from None
    if not re.fullmatch(r"\d+:\d+", parts[2]):
        raise MountinfoError(f"bad major:minor in mountinfo line: {line!r}")
    super_opts = parts[sep + 3] if len(parts) > sep + 3 else ""
    return Mount(
        mount_id=mount_id,
        parent_id=parent_id,
        dev=parts[2],
        root=unescape(parts[3]),
        mount_point=unescape(parts[4]),
        options=tuple(parts[5].split(",")),
        optional=tuple(p for p in parts[6:sep] if p),
        fstype=unescape(parts[sep + 1]),
        source=unescape(parts[sep + 2]),
        super_options=tuple(unescape(o) for o in super_opts.split(",") if o),
    )


def parse_mountinfo(text: str) -> list[Mount]:
    # Only "\n" ends a line: the kernel escapes it in paths, but not "\r", "\x85", ...
    return [parse_mountinfo_line(line) for line in text.split("\n") if line.strip()]


def read_mountinfo(path: str = MOUNTINFO) -> list[Mount]:
    """Parse the live table; any byte in a path survives (surrogateescape, like os.fsdecode)."""
    with open(path, "rb") as f:
        return parse_mountinfo(os.fsdecode(f.read()))


@dataclass
class Volume:
    """One superblock, with every place it is mounted."""

    dev: str
    fstype: str
    source: str
    mounts: list[Mount] = field(default_factory=list)

    @property
    def mount_point(self) -> str:
        """The most natural name: the shortest mount point that mounts the fs root."""
        roots = [m for m in self.mounts if m.root == "/"] or self.mounts
        return min((m.mount_point for m in roots), key=lambda p: (p.count("/"), len(p), p))

    @property
    def read_only(self) -> bool:
        return self.mounts[0].read_only_sb

    @property
    def is_root_fs(self) -> bool:
        return any(m.mount_point == "/" for m in self.mounts)


class MountTable:
    """A snapshot of the mount table, with lookups by mount id and by superblock."""

    def __init__(self, mounts: Iterable[Mount]) -> None:
        self._load(mounts)

    def _load(self, mounts: Iterable[Mount]) -> None:
        self.mounts = list(mounts)
        self.by_id = {m.mount_id: m for m in self.mounts}
        self.volumes: dict[str, Volume] = {}
        for m in self.mounts:
            vol = self.volumes.get(m.dev)
            if vol is None:
                vol = self.volumes[m.dev] = Volume(m.dev, m.fstype, m.source)
            vol.mounts.append(m)

    @classmethod
    def read(cls, path: str = MOUNTINFO) -> MountTable:
        return cls(read_mountinfo(path))

    def refresh(self) -> None:
        """Re-read the live mount table (something was mounted since)."""
        self._load(read_mountinfo())

    def volume_of_mount_id(self, mnt_id: int) -> Volume | None:
        m = self.by_id.get(mnt_id)
        return self.volumes[m.dev] if m else None

    def volume_of_path(self, path: str) -> Volume | None:
        """The volume holding ``path`` (a file or directory), or None if unknown."""
        try:
            info = kernel.statx(path)
        except OSError:
            return None
        return self.volume_of_mount_id(info.mnt_id) if info.mnt_id is not None else None

    def depth(self, vol: Volume) -> int:
        """How deep the volume is mounted: children are frozen before parents."""
        return max(len(Path(m.mount_point).parts) for m in vol.mounts)


def loop_backing_file(source: str) -> str | None:
    """The file behind a loop device (``/dev/loop3`` or a partition ``/dev/loop3p1``)."""
    if not source.startswith("/dev/"):
        return None
    name = os.path.basename(source)
    sys_dir = Path("/sys/class/block") / name
    if (sys_dir / "partition").exists():
        sys_dir = sys_dir.resolve().parent
    try:
        text = (sys_dir / "loop" / "backing_file").read_text().rstrip("\n")
    except OSError:
        return None
    return text or None


def loop_devices_of(backing: str) -> list[str]:
    """Loop devices whose backing file is ``backing`` (also when it has been deleted)."""
    found = []
    want = os.path.realpath(backing) if os.path.exists(backing) else backing
    for sysdir in sorted(Path("/sys/block").glob("loop*")):
        name = (loop_backing_file(f"/dev/{sysdir.name}") or "").removesuffix(" (deleted)")
        if name and name in (backing, want):
            found.append(f"/dev/{sysdir.name}")
    return found


@dataclass
class MountRoot:
    """A user's path resolved to its mount and volume, with an fd kept open until the thaw."""

    path: str
    fd: int
    mount: Mount
    volume: Volume

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def resolve(path: str, table: MountTable) -> MountRoot:
    """Open ``path`` and prove that it is the root of a mount.

    A path that is no longer mounted resolves to a directory of the parent filesystem
    (perhaps ``/``); freezing that would freeze the wrong filesystem, so it is refused.
    """
    if not os.path.lexists(path):
        raise PathNotFound(f"{path}: no such file or directory")
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except OSError as e:
        raise PathNotFound(f"{path}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectory(f"{path} is not a directory")
    try:
        fd = kernel.open_dir(real)
    except PermissionError:
        raise PermissionDenied(f"{path}: permission denied") from None
    except OSError as e:
        raise PathNotFound(f"{path}: {e.strerror}") from None
    try:
        info = kernel.statx(fd=fd)
        mnt_id = info.mnt_id if info.mnt_id is not None else kernel.fd_mount_id(fd)
        mount = table.by_id.get(mnt_id)
        if mount is None:  # mounted after the table was read
            table.refresh()
            mount = table.by_id.get(mnt_id)
        if mount is None:
            raise QuiesceError(f"{path}: mount id {mnt_id} is not in {MOUNTINFO}", "retry")
        if info.mount_root is not None:
            is_root = info.mount_root
        else:
            mp = os.stat(mount.mount_point)
            is_root = (mp.st_dev, mp.st_ino) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino)
        if not is_root:
            raise NotAMountRoot(
                f"{path} is not a mount point: it is a directory on {mount.mount_point} "
                f"({mount.fstype})"
            )
        return MountRoot(path=path, fd=fd, mount=mount, volume=table.volumes[mount.dev])
    except BaseException:
        os.close(fd)
        raise
