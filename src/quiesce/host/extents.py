"""Which byte ranges of two files do not share storage: FIEMAP's physical extents compared.

On a reflink filesystem (XFS ``reflink=1``, btrfs) a block that two files share is the
same block on disk, so it holds the same bytes in both; a write to either copies it on
write to a new place. The reflink provider keeps a base file (the last snapshot's
content, cloned from the image) and finds what the image wrote since by asking where the
two files' blocks lie: every range that is not the same physical block in both (or a hole
in both) is "changed". It never says "same" for bytes that differ: dirty pages are
written back first (``FIEMAP_FLAG_SYNC``), and extents whose place the kernel does not
know yet (delayed allocation), or that are encoded, inline or unaligned, count as
changed. The cost follows the two files' extent counts and reads no data.
"""

from __future__ import annotations

import fcntl
import os
import struct

FS_IOC_FIEMAP = 0xC020660B  # _IOWR('f', 11, struct fiemap)
FIEMAP_FLAG_SYNC = 0x1
LAST = 0x1
UNKNOWN, DELALLOC, ENCODED = 0x2, 0x4, 0x8
ENCRYPTED, NOT_ALIGNED, INLINE, TAIL = 0x80, 0x100, 0x200, 0x400
UNWRITTEN = 0x800
UNTRUSTED = UNKNOWN | DELALLOC | ENCODED | ENCRYPTED | NOT_ALIGNED | INLINE | TAIL
_HEAD = struct.Struct("=QQIIII")  # fm_start, fm_length, fm_flags, mapped, count, reserved
_EXTENT = struct.Struct("=QQQ16xI12x")  # logical, physical, length, (reserved), flags
BATCH = 2048  # extents per ioctl


def extents(fd: int, length: int, *, sync: bool = True) -> list[tuple[int, int, int, int]]:
    """``(logical, physical, length, flags)`` of every extent in ``[0, length)``, sorted."""
    out: list[tuple[int, int, int, int]] = []
    start = 0
    flags = FIEMAP_FLAG_SYNC if sync else 0
    while start < length:
        buf = bytearray(_HEAD.size + BATCH * _EXTENT.size)
        _HEAD.pack_into(buf, 0, start, length - start, flags, 0, BATCH, 0)
        fcntl.ioctl(fd, FS_IOC_FIEMAP, buf, True)
        mapped = _HEAD.unpack_from(buf, 0)[3]
        if not mapped:
            break
        last = False
        for i in range(mapped):
            ext = _EXTENT.unpack_from(buf, _HEAD.size + i * _EXTENT.size)
            out.append(ext)
            last = bool(ext[3] & LAST)
        logical, _, ext_len, _ = out[-1]
        if last or logical + ext_len <= start:
            break
        start = logical + ext_len
        flags = 0  # synced once is enough
    return out


def _pieces(
    exts: list[tuple[int, int, int, int]], length: int
) -> list[tuple[int, int, int | None, int]]:
    """``(start, stop, physical_at_start | None for a hole, flags)`` covering [0, length)."""
    out: list[tuple[int, int, int | None, int]] = []
    pos = 0
    for logical, physical, ext_len, flags in exts:
        lo, hi = max(logical, pos), min(logical + ext_len, length)
        if hi <= lo:
            continue
        if lo > pos:
            out.append((pos, lo, None, 0))
        out.append((lo, hi, physical + (lo - logical), flags))
        pos = hi
    if pos < length:
        out.append((pos, length, None, 0))
    return out


def changed(a_fd: int, b_fd: int, length: int, align: int = 4096) -> list[tuple[int, int]]:
    """Sorted, merged ``(offset, length)`` of ``[0, length)`` where the files ``a`` and ``b``
    may hold different bytes: not the same physical block in both, nor a hole in both.
    Ranges are widened to ``align``."""
    return compare(extents(a_fd, length), extents(b_fd, length), length, align)


Extent = tuple[int, int, int, int]


def compare(
    a_exts: list[Extent], b_exts: list[Extent], length: int, align: int = 4096
) -> list[tuple[int, int]]:
    """:func:`changed` on two extent lists (as :func:`extents` gives them)."""
    a = _pieces(a_exts, length)
    b = _pieces(b_exts, length)
    out: list[tuple[int, int]] = []
    i = j = 0
    pos = 0
    while pos < length and i < len(a) and j < len(b):
        a0, a1, ap, af = a[i]
        b0, b1, bp, bf = b[j]
        stop = min(a1, b1)
        if ap is None and bp is None:
            same = True
        elif ap is None or bp is None or (af | bf) & UNTRUSTED:
            same = False
        else:
            same = ap + (pos - a0) == bp + (pos - b0) and (af & UNWRITTEN) == (bf & UNWRITTEN)
        if not same:
            start = pos - pos % align
            end = min(length, -(-stop // align) * align)
            if out and start <= out[-1][0] + out[-1][1]:
                out[-1] = (out[-1][0], max(out[-1][1], end - out[-1][0]))
            else:
                out.append((start, end - start))
        pos = stop
        if a1 == stop:
            i += 1
        if b1 == stop:
            j += 1
    return out


def count(fd: int) -> int:
    """How many extents a file has (no sync): a fragmentation figure for reports."""
    return len(extents(fd, os.fstat(fd).st_size, sync=False))


__all__ = ["Extent", "changed", "compare", "count", "extents"]
