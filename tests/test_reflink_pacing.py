"""The reflink pre-clone's pacing (quiesce.providers.pacing) and its place in ``prepare``:
pieces that cover each span exactly, sized from how long the last one held the lock, with a
pause after each; the volume flushed before the image is shared, so the dirty data of the
last seconds is not copied on write and re-cloned range by range."""

from __future__ import annotations

import mmap
import os

import pytest
from helpers.snaptools import image_on_reflink_host, sh
from hypothesis import given, settings
from hypothesis import strategies as st

from quiesce import snapshot as snapshots
from quiesce.host import writetrace
from quiesce.providers.pacing import Pacer

MiB = 1 << 20


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += s


def _pacer(clock: FakeClock, **kw) -> Pacer:
    return Pacer(clock=clock, sleep=clock.sleep, **kw)


spans_st = st.lists(
    st.tuples(st.integers(0, 1 << 34), st.integers(1, 300 * MiB)), min_size=0, max_size=6
)


@settings(max_examples=200, deadline=None)
@given(spans=spans_st, costs=st.lists(st.floats(0, 0.05), min_size=1, max_size=50))
def test_pieces_cover_each_span_exactly_whatever_the_timings(spans, costs):
    clock = FakeClock()
    pacer = _pacer(clock)
    done: list[tuple[int, int]] = []

    def clone(off: int, n: int) -> None:
        done.append((off, n))
        clock.now += costs[len(done) % len(costs)]

    pacer.run(spans, clone)
    i = 0
    for off, length in spans:  # consecutive pieces, in order, exactly the span
        pos = off
        while pos < off + length:
            p_off, n = done[i]
            assert p_off == pos and 0 < n <= pacer.max_piece
            pos += n
            i += 1
        assert pos == off + length
    assert i == len(done) == pacer.pieces


def test_a_slow_piece_halves_the_next_and_fast_ones_double_it_within_bounds():
    clock = FakeClock()
    pacer = _pacer(clock, target_s=0.004, piece=16 * MiB, min_piece=MiB, max_piece=64 * MiB)
    sizes = []

    def clone_taking(seconds: float):
        def clone(off: int, n: int) -> None:
            sizes.append(n)
            clock.now += seconds

        return clone

    pacer.run([(0, 200 * MiB)], clone_taking(0.010))  # every piece too slow
    assert sizes[:6] == [16 * MiB, 8 * MiB, 4 * MiB, 2 * MiB, MiB, MiB]
    sizes.clear()
    pacer.run([(0, 400 * MiB)], clone_taking(0.001))  # every piece fast
    assert sizes[:8] == [MiB, 2 * MiB, 4 * MiB, 8 * MiB, 16 * MiB, 32 * MiB, 64 * MiB, 64 * MiB]
    sizes.clear()
    pacer.run([(0, 64 * MiB)], clone_taking(0.003))  # within [target/2, target]: kept
    assert set(sizes) == {64 * MiB}


def test_each_piece_is_followed_by_a_pause_as_long_as_it_held_the_lock():
    clock = FakeClock()
    pacer = _pacer(clock)
    cycle = [0.001, 0.006, 0.0025, 0.0]
    held: list[float] = []

    def clone(off: int, n: int) -> None:
        held.append(cycle[len(held) % len(cycle)])
        clock.now += held[-1]

    pacer.run([(0, 4 * MiB), (100 * MiB, 100 * MiB)], clone)
    assert len(held) >= 4
    assert clock.slept == pytest.approx([h for h in held if h > 0])
    assert pacer.paused_s == pytest.approx(sum(held))
    assert pacer.worst_s == pytest.approx(0.006)
    fast_clock = FakeClock()
    fast = _pacer(fast_clock, pause=False)
    fast.run([(0, 40 * MiB)], lambda off, n: None)
    assert fast_clock.slept == [] and fast.paused_s == 0 and fast.pieces > 0


def preallocate(path: os.PathLike[str]) -> None:
    """A 24 MiB file, allocated and durable: later writes overwrite its blocks in place."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.posix_fallocate(fd, 0, 24 * MiB)
        os.fsync(fd)
    finally:
        os.close(fd)


def write_scattered(fd: int) -> None:
    """Every 3rd block of the first 24 MiB: 2000 writes the trace sees as separate ranges."""
    for i in range(2000):
        os.pwrite(fd, os.urandom(4096), i * 3 * 4096)


def test_prepare_flushes_the_volume_before_the_image_is_shared(loopfs, tmp_path):
    """Dirty data in the volume's page cache at ``prepare`` goes to the image before the
    pre-clone (in place, traced by nobody): the catch-up after the clone finds only what
    was written meanwhile. Flushed after the clone (as before), the same 2000 scattered
    blocks came back as ~2000 ranges to re-clone, each write copied on write."""
    pair = image_on_reflink_host(loopfs)
    path = pair.inner.mountpoint / "dirty"
    preallocate(path)
    fd = os.open(path, os.O_RDWR)
    try:
        write_scattered(fd)  # left dirty
    finally:
        os.close(fd)
    man = snapshots.create([pair.inner.path], "reflink", state_dir=tmp_path / "state")
    [snap] = man.snapshots
    prep = snap.extra["prepare"]
    assert snap.extra["mode"] == "delta", snap.extra
    assert prep["catch_up_ranges"][0] < 200, prep
    assert snap.extra["ranges_in_window"] < 200, snap.extra
    assert prep["pieces"] >= 1 and prep["cpu_s"] >= 0
    assert list(prep["steps_s"]) == ["flush", "trace", "clone", "flush_again", "catch_up"]
    fsck = sh("e2fsck", "-fn", snap.location, check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    snapshots.delete(man.id, tmp_path / "state")


def test_the_kernel_drops_reads_before_the_trace_sees_them(loopfs):
    """Only writes reach the ring buffer: a read-heavy device costs drain() nothing."""
    fs = loopfs("ext4")
    data = fs.mountpoint / "data"
    data.write_bytes(os.urandom(8 * MiB))
    os.sync()
    trace = writetrace.WriteTrace(fs.device)
    try:
        fd = os.open(fs.device, os.O_RDONLY | os.O_DIRECT)  # past the page cache
        try:
            buf = mmap.mmap(-1, 1 << 16)  # page-aligned, as O_DIRECT wants
            for i in range(256):
                assert os.preadv(fd, [buf], i * len(buf)) == len(buf)
        finally:
            os.close(fd)
        got = trace.drain()
        assert got.events == 0 and got.ranges == [], got
        with open(data, "r+b") as f:
            f.write(os.urandom(4096))
            os.fsync(f.fileno())
        got = trace.drain()
        assert got.events > 0 and got.ranges, got
    finally:
        trace.close()


class _Checkpoint:
    """A quiescer that writes like a database checkpoint while it quiesces: 2000 scattered
    blocks, fsync'd, after ``prepare`` and before the freeze."""

    name = "checkpoint"

    def __init__(self, path: os.PathLike[str]) -> None:
        self.path = path

    def before_freeze(self) -> None:
        fd = os.open(self.path, os.O_RDWR)
        try:
            write_scattered(fd)
            os.fsync(fd)
        finally:
            os.close(fd)

    def after_thaw(self, ok: bool) -> None:
        pass


def test_what_is_written_after_prepare_is_re_cloned_before_the_freeze(loopfs, tmp_path):
    """The writers quiesce after ``prepare`` (a checkpoint), and the pre-freeze flush runs
    after them: their writes are re-cloned by ``before_freeze``, once the guardian is
    armed and before the first FIFREEZE, not inside the window (where, before this step,
    a checkpoint left 12,192 ranges and an 834 ms window under pgbench). The snapshot
    still holds those writes: it is checked against the volume's file."""
    pair = image_on_reflink_host(loopfs)
    path = pair.inner.mountpoint / "table"
    preallocate(path)
    man = snapshots.create(
        [pair.inner.path], "reflink", state_dir=tmp_path / "state", quiescers=[_Checkpoint(path)]
    )
    [snap] = man.snapshots
    extra = snap.extra
    assert extra["mode"] == "delta", extra
    assert extra["prepare"]["before_freeze"]["ranges"] >= 1000, extra["prepare"]
    assert extra["ranges_in_window"] < 200, extra
    fsck = sh("e2fsck", "-fn", snap.location, check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    dumped = tmp_path / "table-from-snapshot"
    sh("debugfs", "-R", f"dump /table {dumped}", snap.location)
    assert dumped.read_bytes() == path.read_bytes(), "the checkpoint's writes are not in it"
    snapshots.delete(man.id, tmp_path / "state")


def test_a_failure_before_the_freeze_ends_the_guardian_and_leaves_nothing(loopfs, tmp_path):
    """``before_freeze`` runs with the guardian armed: if it fails, the guardian ends (no
    freeze happened), the clone is removed and the volume stays writable."""
    from quiesce.errors import QuiesceError
    from quiesce.freezing.guardian import list_guardians
    from quiesce.providers.reflink import ReflinkProvider

    class Broken(ReflinkProvider):
        def before_freeze(self, members):
            raise QuiesceError("injected before the freeze")

    pair = image_on_reflink_host(loopfs)
    guardians = set(list_guardians())
    with pytest.raises(QuiesceError, match="injected before the freeze"):
        snapshots.create([pair.inner.path], Broken(), state_dir=tmp_path / "state")
    assert set(list_guardians()) <= guardians, "a guardian was left running"
    assert not list(pair.outer.mountpoint.glob("adhoc*")), "a clone was left behind"
    probe = pair.inner.mountpoint / "probe"
    probe.write_bytes(b"writable")
    assert probe.read_bytes() == b"writable"
