"""reflink: clone a loop device's backing file (FICLONE) for a snapshot of its filesystem.

The clone shares the image's extents, so it costs metadata only, on a host filesystem with
reflink support (XFS ``reflink=1``, btrfs); but that metadata grows with the number of
extents, and clones fragment the image (every later write is copied on write into a new
small extent): a whole-image FICLONE inside the window (``mode = "clone"``) grows night
after night. ``mode = "delta"`` (the default) clones the whole image in ``prepare``,
outside the window, while a trace of the loop device's completed writes
(:mod:`quiesce.host.writetrace`) records what changes after it; inside the window only those
ranges are re-cloned (FICLONERANGE), so the window's cost follows the writes since
``prepare``, not the image's size or history. The result is byte for byte what a
whole-image FICLONE inside the window gives (tests/test_reflink_delta.py compares them).
Everything slow happens in ``prepare``: the clone files are created and opened there
(O_CREAT inside the window would be a write that may block), and the pre-clone is made
gentle for the applications that keep running (see :meth:`ReflinkProvider._pre_clone`):
the volume is flushed before the image is shared, the clone goes in pieces paced by
:class:`~quiesce.providers.pacing.Pacer`, and what the manifest's ``extra.prepare`` says
it did is recorded.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from quiesce.errors import QuiesceError, UnsafePlan, UnsupportedFilesystem, UsageError
from quiesce.freezing.plan import GroupMember
from quiesce.host import extents, kernel
from quiesce.host.mounts import MountTable, Volume, loop_backing_file
from quiesce.host.writetrace import WriteTrace, merge
from quiesce.providers.base import (
    FreezeMode,
    Provider,
    Snapshot,
    block_copy_mount_options,
    volume_slug,
)
from quiesce.providers.options import ReflinkOptions
from quiesce.providers.pacing import Pacer

BLOCK = 4096  # FICLONERANGE alignment: the host filesystem's block (XFS and btrfs: 4 KiB)
CATCH_UP_ROUNDS = 4  # prepare re-clones what was written meanwhile, at most this often ...
CATCH_UP_ENOUGH = 64  # ... until a round finds fewer ranges than this, or not half the last
# round's (a database's checkpoint writes for seconds: chasing it only adds copies on write)

GAP = 64 << 10  # changed ranges this close are cloned as one: fewer calls, and the blocks
# between are the same in both files (re-sharing a shared block changes nothing)

REFLINK_HINT = (
    "the image must live on a filesystem with reflink support: XFS made with "
    "`mkfs.xfs -m reflink=1`, or btrfs; ext4 cannot clone files"
)


@dataclass
class _Clone:
    member: GroupMember
    backing: str
    dest: str
    src_fd: int = -1
    dst_fd: int = -1
    created: bool = False  # we made the file at ``dest`` (only then may abort remove it)
    snap: Snapshot | None = None
    trace: WriteTrace | None = None  # delta mode: writes since the pre-clone
    offset: int = 0  # the loop device's offset into the image
    size: int = 0  # the image's size at the pre-clone
    note: str = ""  # why this volume fell back to a whole-image clone
    stats: dict[str, Any] = field(default_factory=dict)  # what prepare did (the manifest's)
    base: str = ""  # the base file (delta mode): the last snapshot's content
    cloned: list[tuple[int, int]] | None = None  # ranges from the image (None: all of it)
    done: bool = False  # the window's snapshot was taken (the base may follow it)


class ReflinkProvider(Provider):
    """Options (:class:`ReflinkOptions`): ``dest`` (directory for the clones; default: next
    to each image), ``mode`` (``delta``, the default, or ``clone``), ``base`` (delta: seed
    each snapshot from the last one's content; default true)."""

    name: ClassVar[str] = "reflink"

    Options: ClassVar[type[ReflinkOptions]] = ReflinkOptions
    config: ReflinkOptions

    def __init__(
        self, options: ReflinkOptions | Mapping[str, Any] | None = None, /, **kwargs: Any
    ) -> None:
        super().__init__(options, **kwargs)
        self._clones: list[_Clone] = []

    def freeze_mode(self, members: Sequence[GroupMember]) -> FreezeMode:
        return FreezeMode.FIFREEZE

    # -- outside the window ------------------------------------------------------------
    def _backing(self, m: GroupMember) -> str:
        if _is_partition(m.volume.source):
            raise UsageError(
                f"{m.name} is on a partition of a loop device ({m.volume.source}): the clone "
                "of the whole image would hold other partitions unfrozen",
                "put the filesystem on the whole loop device",
            )
        backing = loop_backing_file(m.volume.source)
        if backing is None:
            raise UsageError(
                f"{m.name} is on {m.volume.source}, not on a loop device: the reflink "
                "provider clones a loop device's backing file",
                "use the btrfs, lvm, zfs or command provider for this storage",
            )
        if backing.endswith(" (deleted)") or not os.path.isfile(backing):
            raise UsageError(f"the backing file of {m.volume.source} ({backing}) is gone")
        return backing

    def _dest_dir(self, backing: str) -> str:
        dest = self.config.dest
        return os.path.abspath(dest) if dest else os.path.dirname(backing)

    def check(self, members: Sequence[GroupMember]) -> None:
        table = MountTable.read()
        group = {m.volume.dev: m for m in members}
        for m in members:
            backing = self._backing(m)
            dest = self._dest_dir(backing)
            if not os.path.isdir(dest):
                raise UsageError(
                    f"the clone directory {dest} does not exist",
                    "create it, or choose another (--option dest=DIR) on the image's filesystem",
                    option="dest",
                )
            host = table.volume_of_path(backing)
            dest_vol = table.volume_of_path(dest)
            for what, vol in (("the image", host), ("the clone directory", dest_vol)):
                if vol is not None and vol.dev in group:
                    raise UnsafePlan(
                        f"{what} of {m.name} ({backing if what == 'the image' else dest}) is on "
                        f"{group[vol.dev].name}, which is in the group: writing the clone to a "
                        "frozen filesystem would block",
                        f"leave {group[vol.dev].name} out of the group; freezing {m.name} "
                        "already makes its image consistent",
                        option="dest" if what == "the clone directory" else None,
                    )
            if host is None or dest_vol is None or host.dev != dest_vol.dev:
                raise UsageError(
                    f"cannot clone {backing} into {dest}: a reflink clone must stay on the "
                    f"filesystem that holds the image ({_where(host)}), not {_where(dest_vol)}",
                    "choose a clone directory (--option dest=DIR) on the image's filesystem",
                    option="dest",
                )
            _probe_reflink(dest, host)

    def prepare(self, members: Sequence[GroupMember], name: str) -> None:
        slugs: set[str] = set()
        try:
            for m in members:
                backing = self._backing(m)
                slug = volume_slug(m.name)
                while slug in slugs:
                    slug += "_"
                slugs.add(slug)
                suffix = Path(backing).suffix or ".img"
                dest = os.path.join(self._dest_dir(backing), f"{name}--{slug}{suffix}")
                c = _Clone(m, backing, dest)
                self._clones.append(c)
                c.src_fd = os.open(backing, os.O_RDONLY | os.O_CLOEXEC)
                eid = self.journal.intent("file", path=dest) if self.journal else None
                try:
                    # readable too: after the thaw the base is cloned from it
                    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
                    c.dst_fd = os.open(dest, flags, 0o600)
                except FileExistsError:
                    if eid is not None:
                        self.journal.done(eid)  # not ours: cleanup must never remove it
                    raise
                c.created = True
                c.snap = Snapshot(
                    id=f"{name}/{slug}",
                    provider=self.name,
                    volume=m.name,
                    dev=m.volume.dev,
                    fstype=m.volume.fstype,
                    created=0.0,
                    location=dest,
                    extra={"image": backing, "loop_device": m.volume.source},
                )
            if self.config.mode == "delta":
                for c in self._clones:
                    self._pre_clone(c)
        except FileExistsError as e:
            self.abort()
            raise UsageError(
                f"{e.filename} already exists", "delete it or pick another job"
            ) from None
        except OSError as e:
            self.abort()
            raise QuiesceError(f"cannot prepare the clone {e.filename}: {e.strerror}") from None

    def _pre_clone(self, c: _Clone) -> None:
        """Delta mode, outside the window: trace the loop device, flush the volume, then
        make the clone hold the image's content as of now, paced; flush again and re-clone
        what was written meanwhile, paced too, until little is left.

        With a base (the last snapshot's content, kept next to the clones: see
        :func:`base_path`) the clone is a FICLONE of the base, which nobody writes, so it
        stalls nobody; only the ranges where the image and the base no longer share blocks
        (:func:`quiesce.host.extents.changed`: what the image wrote since the last snapshot)
        are cloned from the image, so the work that holds the image's lock follows the
        writes, not the image's size or fragmentation. Without one (the first snapshot,
        or a base of another size), the whole image is cloned in paced pieces.

        The second flush writes only what the clone's time dirtied, so the freeze (and the
        window's re-clone) finds little. (A flush before every catch-up round, tried,
        chased a checkpoint for 11 s: each round's flush made the next round's ranges.)
        The first flush comes before the trace, so that its writes are in the image before
        the clone begins and not re-cloned after it. With a base, what was traced before the
        extents are compared is dropped: the comparison (which writes the image's dirty
        pages back first) covers it, and the trace covers everything after."""
        source = c.member.volume.source
        cpu0, t0 = time.thread_time(), time.monotonic()
        steps: dict[str, float] = {}  # seconds of each step, in order

        def step(name: str) -> None:
            steps[name] = round(time.monotonic() - t0 - sum(steps.values()), 4)

        with contextlib.suppress(OSError):
            kernel.syncfs(c.member.fd)
        step("flush")
        try:
            c.trace = WriteTrace(source)
        except OSError as e:
            c.note = f"no write trace of {source} ({e.strerror or e}): whole-image clone"
            return
        step("trace")
        c.offset = _loop_offset(source)
        c.size = os.fstat(c.src_fd).st_size
        pacer = Pacer()
        base = self._open_base(c) if self.config.base else None
        if base is None:
            c.cloned = None  # the whole image: the base is made anew after the thaw
            self._clone_ranges(c, [(0, c.size)], pacer)
            step("clone")
        else:
            try:
                try:
                    kernel.ficlone(c.dst_fd, base)
                except OSError as e:
                    raise _clone_error(e, c.base, c.dest) from None
                step("clone_base")
                c.trace.forget()  # the comparison below covers everything until now
                diff = merge(extents.changed(c.src_fd, base, c.size, BLOCK), BLOCK, GAP)
            finally:
                os.close(base)
            step("compare")
            self._clone_ranges(c, diff, pacer)
            c.cloned = list(diff)
            step("clone_changed")
            c.stats["base"] = {"changed_ranges": len(diff), "changed_bytes": _total(diff)}
        with contextlib.suppress(OSError):  # only what the clone's time dirtied
            kernel.syncfs(c.member.fd)
        step("flush_again")
        rounds: list[int] = []
        for _ in range(CATCH_UP_ROUNDS):
            rounds.append(self._catch_up(c, pacer))
            if rounds[-1] < CATCH_UP_ENOUGH or (len(rounds) > 1 and rounds[-1] > rounds[-2] // 2):
                break  # little left, or not converging (a checkpoint): the window takes it
        step("catch_up")
        c.stats.update(
            {
                "steps_s": steps,
                "pieces": pacer.pieces,
                "worst_piece_ms": round(pacer.worst_s * 1000, 2),
                "locked_s": round(pacer.busy_s, 4),
                "catch_up_ranges": rounds,
                "cpu_s": round(time.thread_time() - cpu0, 4),
            }
        )

    def _open_base(self, c: _Clone) -> int | None:
        """The base's fd if it can seed this clone (a regular file of the image's size,
        not a link: ours), else None. Its content need not be trusted: only blocks it
        shares with the image are kept."""
        c.base = base_path(c.dest, c.backing, os.fstat(c.src_fd).st_ino)
        try:
            fd = os.open(c.base, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != c.size or st.st_uid != os.geteuid():
            os.close(fd)
            return None
        return fd

    def _catch_up(self, c: _Clone, pacer: Pacer | None = None) -> int:
        """Re-clone the ranges written since the last call (in ``pacer``'s pieces, if
        given); -1 if that cannot be trusted (the window then clones the whole image)."""
        assert c.trace is not None
        drained = c.trace.drain()
        if drained.lost:
            c.note = "the write trace lost events: whole-image clone"
            return -1
        if os.fstat(c.src_fd).st_size != c.size:
            c.note = "the image changed size: whole-image clone"
            return -1
        spans = [(off + c.offset, n) for off, n in drained.ranges]
        ranges = [
            (off, min(length, c.size - off)) for off, length in merge(spans, BLOCK) if off < c.size
        ]
        self._clone_ranges(c, ranges, pacer)
        if c.cloned is not None:
            c.cloned.extend(ranges)
        return len(ranges)

    @staticmethod
    def _clone_ranges(c: _Clone, ranges: list[tuple[int, int]], pacer: Pacer | None) -> None:
        """FICLONERANGE each range from the image into the clone: in ``pacer``'s pieces
        outside the window, whole and back to back inside it (``pacer`` None)."""
        try:
            if pacer is not None:
                pacer.run(ranges, lambda off, n: kernel.ficlonerange(c.dst_fd, c.src_fd, off, n))
                return
            for off, length in ranges:
                kernel.ficlonerange(c.dst_fd, c.src_fd, off, length)
        except OSError as e:
            raise _clone_error(e, c.backing, c.dest) from None

    def before_freeze_step(self) -> str | None:
        if self.config.mode != "delta":
            return None
        return (
            "reflink: re-clone what was written since prepare (the quiesce, the checkpoint, "
            "the flush), paced, before the freeze: the longest step outside the window"
        )

    def before_freeze(self, members: Sequence[GroupMember]) -> None:
        """Delta mode: re-clone what was written since ``prepare`` (the writers' quiesce, a
        database checkpoint, the pre-freeze flush), paced, so the window re-clones only the
        writes of the last moments. A checkpoint during ``prepare`` that the pre-freeze
        flush wrote out left 12,192 ranges (an 834 ms window) before this step existed."""
        for c in self._clones:
            if c.note or c.trace is None:
                continue
            t0 = time.monotonic()
            n = self._catch_up(c, Pacer())
            c.stats["before_freeze"] = {"ranges": n, "s": round(time.monotonic() - t0, 4)}

    # -- inside the window -------------------------------------------------------------
    def snapshot(self, members: Sequence[GroupMember]) -> list[Snapshot]:
        out = []
        for c in self._clones:
            snap = c.snap
            assert snap is not None
            try:
                ranges = -1 if c.note or c.trace is None else self._catch_up(c)
                if ranges < 0:
                    kernel.ficlone(c.dst_fd, c.src_fd)
            except OSError as e:
                raise _clone_error(e, c.backing, c.dest) from None
            snap.created = time.time()
            if ranges < 0:
                c.cloned = None  # a whole-image clone: the base is made anew from it
            c.done = self.config.mode == "delta" and self.config.base
            snap.extra["mode"] = "delta" if ranges >= 0 else "clone"
            if ranges >= 0:
                snap.extra["ranges_in_window"] = ranges
            if c.note:
                snap.extra["note"] = c.note
            if c.stats:
                snap.extra["prepare"] = c.stats
            out.append(snap)
        return out

    # -- after the thaw ----------------------------------------------------------------
    def after_thaw(self, snaps: list[Snapshot]) -> None:
        """Make the clones durable (their extents and directory entries), close the fds."""
        try:
            for c in self._clones:
                os.fsync(c.dst_fd)
            for d in {os.path.dirname(c.dest) for c in self._clones}:
                fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            for c, snap in zip(self._clones, snaps, strict=False):
                if c.done and c.trace is not None:  # no trace: no base could serve
                    t0 = time.monotonic()
                    snap.extra["base_update"] = _update_base(c)
                    snap.extra["base_update"]["s"] = round(time.monotonic() - t0, 4)
        finally:
            self._close()

    def _close(self) -> None:
        for c in self._clones:
            if c.trace is not None:
                c.trace.close()
                c.trace = None
            for fd in (c.src_fd, c.dst_fd):
                if fd >= 0:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            c.src_fd = c.dst_fd = -1

    def abort(self) -> None:
        self._close()
        for c in self._clones:
            if c.created:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(c.dest)
        self._clones = []

    def delete(self, snap: Snapshot) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(snap.location)

    def mount_options(self, snap: Snapshot) -> list[str]:
        return block_copy_mount_options(snap.fstype)


BASE_PREFIX = ".quiesce-base-"


def base_path(dest: str, backing: str, ino: int) -> str:
    """Where the base of an image lives: beside its clones, named by the image's inode
    (the clone directory is on the image's filesystem) and name. Delete it to start over;
    it holds the blocks the image has overwritten since the last snapshot."""
    return os.path.join(os.path.dirname(dest), f"{BASE_PREFIX}{ino}--{os.path.basename(backing)}")


def _total(ranges: list[tuple[int, int]]) -> int:
    return sum(n for _, n in ranges)


def _update_base(c: _Clone) -> dict[str, Any]:
    """After the thaw: make the base hold this snapshot's content. Ranges cloned from the
    image are cloned from the snapshot into the base (work in proportion to the writes);
    with no base yet (or after a whole-image clone) the snapshot is cloned whole into a
    new file that replaces it. Neither touches the image. A failure leaves no base (the
    next snapshot clones the whole image) and does not fail the snapshot."""
    try:
        if c.cloned is not None and c.base and os.path.exists(c.base):
            ranges = merge(c.cloned, BLOCK, GAP)
            fd = os.open(c.base, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                for off, n in ranges:
                    kernel.ficlonerange(fd, c.dst_fd, off, min(n, c.size - off))
                os.fsync(fd)
            finally:
                os.close(fd)
            return {"ranges": len(ranges), "bytes": _total(ranges)}
        if not c.base:
            c.base = base_path(c.dest, c.backing, os.fstat(c.src_fd).st_ino)
        tmp = f"{c.base}.tmp-{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            kernel.ficlone(fd, c.dst_fd)
            os.fsync(fd)
            os.rename(tmp, c.base)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        finally:
            os.close(fd)
        return {"whole": True}
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(c.base)
        return {"error": e.strerror or str(e)}


def _loop_offset(source: str) -> int:
    """Where the loop device starts in its backing file (``losetup --offset``)."""
    path = Path("/sys/class/block") / os.path.basename(source) / "loop" / "offset"
    try:
        return int(path.read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def _is_partition(source: str) -> bool:
    if not source.startswith("/dev/"):
        return False
    return (Path("/sys/class/block") / os.path.basename(source) / "partition").exists()


def _where(vol: Volume | None) -> str:
    return f"{vol.mount_point} ({vol.fstype})" if vol is not None else "an unknown filesystem"


def _probe_reflink(dest: str, host: Volume | None) -> None:
    """Clone 4 KiB between two anonymous files in ``dest``: nothing to clean up."""
    flags = os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC
    try:
        src = os.open(dest, flags, 0o600)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise QuiesceError(f"cannot write in {dest}: {e.strerror}") from None
        return  # no O_TMPFILE: the clone itself will tell
    try:
        dst = os.open(dest, flags, 0o600)
        try:
            os.write(src, b"\0" * 4096)
            kernel.ficlone(dst, src)
        except OSError as e:
            raise _clone_error(e, dest, dest, host) from None
        finally:
            os.close(dst)
    finally:
        os.close(src)


def _clone_error(e: OSError, src: str, dst: str, host: Volume | None = None) -> QuiesceError:
    if e.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
        what = f"{host.mount_point} ({host.fstype})" if host else os.path.dirname(dst)
        return UnsupportedFilesystem(
            f"{what} cannot clone files (FICLONE: {e.strerror})", REFLINK_HINT
        )
    if e.errno == errno.EXDEV:
        return UsageError(
            f"cannot clone {src} to {dst}: they are on different filesystems (EXDEV)",
            "choose a clone directory (--option dest=DIR) on the image's filesystem",
        )
    return QuiesceError(f"FICLONE {src} -> {dst} failed: {e.strerror}")
