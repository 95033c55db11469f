"""Clone a file in pieces that each hold its inode lock only briefly, with pauses between.

FICLONERANGE takes the source's I/O and mmap locks exclusively and flushes the range's
dirty pages first; the loop device's writes to the image (and so the fsyncs of the
database on it) wait until it returns. Its cost follows the number of extents in the
range, which a fragmented image does not show in its size: a fixed 16 MiB piece held the
lock 2-22 ms under pgbench. :class:`Pacer` sizes each piece from how long the previous one
took (halve above the target, double below half of it) and sleeps after each one as long
as it took, so the writers queued on the lock get at least half the time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

TARGET_S = 0.004  # the lock hold a piece aims at
# Smaller pieces cost more calls: with 256 KiB the pre-clone of a fragmented 3 GiB image
# took 2,400 calls and 1 s of CPU under pgbench (1 MiB: ~1,000 calls, 0.5 s), and the
# database's p99.9 did not improve.
MIN_PIECE = 1 << 20
MAX_PIECE = 64 << 20
FIRST_PIECE = 16 << 20


@dataclass
class Pacer:
    """Yields (offset, length) pieces of each span; told how long each took, adapts."""

    target_s: float = TARGET_S
    piece: int = FIRST_PIECE
    min_piece: int = MIN_PIECE
    max_piece: int = MAX_PIECE
    pause: bool = True  # sleep as long as a piece took (off: as fast as possible)
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic
    # what it did, for the manifest
    pieces: int = 0
    busy_s: float = 0.0
    worst_s: float = 0.0
    paused_s: float = 0.0

    def pieces_of(self, offset: int, length: int) -> Iterator[tuple[int, int]]:
        """The span in pieces of the current size; the caller clones each, then ``took``."""
        end = offset + length
        while offset < end:
            n = min(self.piece, end - offset)
            yield offset, n
            offset += n

    def run(self, spans: list[tuple[int, int]], clone: Callable[[int, int], None]) -> None:
        """Clone every span piece by piece, timing and pacing each."""
        for off, length in spans:
            for p_off, n in self.pieces_of(off, length):
                t0 = self.clock()
                clone(p_off, n)
                self.took(self.clock() - t0)

    def took(self, seconds: float) -> None:
        self.pieces += 1
        self.busy_s += seconds
        self.worst_s = max(self.worst_s, seconds)
        if seconds > self.target_s:
            self.piece = max(self.min_piece, self.piece // 2)
        elif seconds < self.target_s / 2:
            self.piece = min(self.max_piece, self.piece * 2)
        if self.pause and seconds > 0:
            self.sleep(seconds)
            self.paused_s += seconds


__all__ = ["Pacer"]
