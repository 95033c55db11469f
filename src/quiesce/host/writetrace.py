"""Which byte ranges of a block device were written: the kernel's ``block_rq_complete`` event.

The reflink provider's ``delta`` mode clones a loop image before the freeze and, inside the
window, re-clones only what changed since. Walking the image's extents to find the changes
costs time in proportion to the image's fragmentation; tracing the loop device's completed
requests costs nothing per extent. The trace lives in a tracefs *instance* of its own
(``instances/quiesce-<pid>-<dev>``: its own ring buffer, filtered to one device), so it
neither sees nor disturbs anyone else's tracing.

Only completions are traced: a request that completed before the trace started had already
reached the backing file. The ring buffer drops events when full (``overwrite`` off) and
counts them; :meth:`WriteTrace.drain` then reports ``lost`` and the caller must not trust
the ranges. (The block trace ioctl, BLKTRACESETUP, needs debugfs, which kernel lockdown
closes; tracefs it leaves open.)
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field

from quiesce.host import pids

TRACEFS = "/sys/kernel/tracing"
EVENT = "events/block/block_rq_complete"
PREFIX = "quiesce-"
MNT_DETACH = 2
MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
# "<task>-<pid> [cpu] flags ts: block_rq_complete: 7,2 WS () 1234 + 8 be,0,4 [0]"
_LINE = re.compile(rb"block_rq_complete: \d+,\d+ (\S+) \([^)]*\) (\d+) \+ (\d+)")
_LOST = re.compile(rb"LOST \d+ EVENTS")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


@contextlib.contextmanager
def _tracefs() -> Iterator[str]:
    """tracefs' root: the usual mount, or a private one for as long as the block lasts (open
    files outlive the lazy unmount), so that nothing stays mounted."""
    if os.path.isdir(os.path.join(TRACEFS, "instances")):
        yield TRACEFS
        return
    where = tempfile.mkdtemp(prefix="quiesce-tracefs-")
    try:
        flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
        if _libc.mount(b"tracefs", where.encode(), b"tracefs", flags, None) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"cannot mount tracefs: {os.strerror(err)}")
        try:
            yield where
        finally:
            _libc.umount2(where.encode(), MNT_DETACH)
    finally:
        os.rmdir(where)


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _set_filter(path: str, kdev: int) -> None:
    """Let the kernel drop other devices' events, reads and empty requests (flushes): a
    busy database reads far more than it writes, and every event kept is one more line
    for :meth:`WriteTrace.drain` to parse. A kernel that cannot filter on ``rwbs`` gets
    the device filter alone (drain skips reads itself)."""
    try:
        _write(path, f'dev == {kdev} && nr_sector > 0 && !(rwbs ~ "R*")')
    except OSError:
        _write(path, f"dev == {kdev}")


def _remove_instance(inst: str) -> None:
    with contextlib.suppress(OSError):
        _write(os.path.join(inst, EVENT, "enable"), "0")
    with contextlib.suppress(OSError):
        os.rmdir(inst)


@dataclass
class Drained:
    """What one :meth:`WriteTrace.drain` read."""

    ranges: list[tuple[int, int]] = field(default_factory=list)  # (byte offset, length)
    events: int = 0
    lost: bool = False  # events were dropped: the ranges are incomplete


class WriteTrace:
    """Trace the writes (and discards, write-zeroes) one block device completes, from now on.

    Opened outside any freeze window. ``drain`` reads only tracefs (never a frozen
    filesystem) and may run inside it. ``close`` removes the trace and never raises.
    """

    def __init__(self, device: str, *, buffer_kb: int = 4096) -> None:
        st = os.stat(device)
        self.device = device
        self._pipe = -1
        self._stats: list[int] = []
        self._baseline: list[int] = []  # drops counted before the last forget()
        self._partial = b""
        self._name = f"{PREFIX}{os.getpid()}-{os.major(st.st_rdev)}-{os.minor(st.st_rdev)}"
        kdev = (os.major(st.st_rdev) << 20) | os.minor(st.st_rdev)
        try:
            with _tracefs() as root:
                _reap_stale(root)
                inst = os.path.join(root, "instances", self._name)
                with contextlib.suppress(FileNotFoundError):
                    _remove_instance(inst)
                os.mkdir(inst, 0o700)
                self._made = True
                _write(os.path.join(inst, "options/overwrite"), "0")
                _write(os.path.join(inst, "buffer_size_kb"), str(buffer_kb))
                _set_filter(os.path.join(inst, EVENT, "filter"), kdev)
                self._stats = [
                    os.open(os.path.join(inst, "per_cpu", cpu, "stats"), os.O_RDONLY)
                    for cpu in sorted(os.listdir(os.path.join(inst, "per_cpu")))
                ]
                self._pipe = os.open(os.path.join(inst, "trace_pipe"), os.O_RDONLY | os.O_NONBLOCK)
                _write(os.path.join(inst, EVENT, "enable"), "1")
        except BaseException:
            self.close()
            raise

    _made = False

    def _drops(self) -> list[int]:
        counts = []
        for fd in self._stats:
            text = os.pread(fd, 4096, 0)
            for key in (b"overrun: ", b"dropped events: "):
                m = re.search(key + rb"(\d+)", text)
                counts.append(int(m.group(1)) if m else 0)
        return counts

    def _dropped(self) -> bool:
        base = self._baseline or [0] * (2 * len(self._stats))
        return any(n > b for n, b in zip(self._drops(), base, strict=False))

    def forget(self) -> None:
        """Drop what was traced so far, lost events included: the caller has another
        account of that time (the reflink provider's extent comparison, taken after)."""
        self.drain()
        self._baseline = self._drops()

    def drain(self) -> Drained:
        """Every write completed since the last drain, as merged byte ranges."""
        out = Drained()
        spans: list[tuple[int, int]] = []
        data = self._partial
        while True:
            try:
                chunk = os.read(self._pipe, 1 << 20)
            except BlockingIOError:
                break
            if not chunk:
                break
            data += chunk
        cut = data.rfind(b"\n") + 1
        self._partial, data = data[cut:], data[:cut]
        for m in _LINE.finditer(data):
            out.events += 1
            rwbs, sector, count = m.group(1), int(m.group(2)), int(m.group(3))
            if count and not rwbs.startswith(b"R"):
                spans.append((sector * 512, count * 512))
        if _LOST.search(data) or self._dropped():
            out.lost = True
        out.ranges = merge(spans)
        return out

    def close(self) -> None:
        for fd in [self._pipe, *self._stats]:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._pipe, self._stats = -1, []
        if self._made:
            self._made = False
            with contextlib.suppress(OSError), _tracefs() as root:
                _remove_instance(os.path.join(root, "instances", self._name))


def _reap_stale(root: str) -> None:
    """Remove the trace instances of quiesce processes that died before closing them."""
    inst_dir = os.path.join(root, "instances")
    for name in os.listdir(inst_dir):
        if not name.startswith(PREFIX):
            continue
        pid = name.removeprefix(PREFIX).split("-", 1)[0]
        if pid.isdigit() and not pids.pid_alive(int(pid)):
            with contextlib.suppress(OSError):
                _remove_instance(os.path.join(inst_dir, name))


def merge(spans: list[tuple[int, int]], align: int = 1, gap: int = 0) -> list[tuple[int, int]]:
    """Sorted, non-overlapping (offset, length) covering ``spans``, widened to ``align``;
    spans at most ``gap`` bytes apart become one (covering the gap too)."""
    out: list[tuple[int, int]] = []
    for off, length in sorted(spans):
        start = off - off % align
        stop = -(-(off + length) // align) * align
        if out and start <= out[-1][0] + out[-1][1] + gap:
            prev_start, prev_len = out[-1]
            out[-1] = (prev_start, max(prev_len, stop - prev_start))
        else:
            out.append((start, stop - start))
    return out


__all__ = ["Drained", "WriteTrace", "merge"]
