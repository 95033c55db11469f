"""reflink ``mode = "delta"``: a clone before the freeze, and only the ranges written since
re-cloned inside the window, gives the same bytes as a whole-image FICLONE in the window.

Each test takes both inside the same window (the plain clone is the reference), under a
writer, and compares them with cmp; the delta clone must also pass e2fsck -fn. A negative
control (the window's re-clone skipped) shows the comparison can fail.
"""

from __future__ import annotations

import itertools
import os
import random
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
from helpers.snaptools import image_on_reflink_host, sh
from hypothesis import given, settings
from hypothesis import strategies as st

from quiesce import snapshot as snapshots
from quiesce.freezing.plan import GroupMember
from quiesce.host import extents, kernel, writetrace
from quiesce.providers import reflink as reflink_mod
from quiesce.providers.base import Snapshot
from quiesce.providers.reflink import ReflinkProvider

DATA_MB = 24


class WithReference(ReflinkProvider):
    """Also takes a plain whole-image FICLONE inside the same window: the reference."""

    skip_window_delta = False

    def prepare(self, members: Sequence[GroupMember], name: str) -> None:
        super().prepare(members, name)
        self.refs = []
        for c in self._clones:
            ref = c.dest + ".ref"
            self.refs.append((ref, os.open(ref, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)))

    def _catch_up(self, c: reflink_mod._Clone, pacer=None) -> int:
        if self.in_window and self.skip_window_delta:
            c.trace.drain()  # type: ignore[union-attr]
            return 0
        return super()._catch_up(c, pacer)

    in_window = False

    def snapshot(self, members: Sequence[GroupMember]) -> list[Snapshot]:
        self.in_window = True
        out = super().snapshot(members)
        for c, (_, fd) in zip(self._clones, self.refs, strict=True):
            kernel.ficlone(fd, c.src_fd)
        return out

    def after_thaw(self, snaps: list[Snapshot]) -> None:
        for _, fd in self.refs:
            os.close(fd)
        super().after_thaw(snaps)


class BlockWriter:
    """Random 4 KiB writes to a preallocated file: ``burst`` synchronously (so some land
    between prepare and the freeze, as the quiescer's before_freeze), and a thread that
    keeps writing through the whole run."""

    def __init__(self, path: Path, size_mb: int = DATA_MB) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.posix_fallocate(self.fd, 0, size_mb << 20)
        os.fsync(self.fd)
        self.blocks = (size_mb << 20) // 4096
        self.stop = threading.Event()
        self.rng = random.Random(7)
        self.written = 0

    def burst(self, n: int = 300) -> None:
        for _ in range(n):
            os.pwrite(self.fd, os.urandom(4096), self.rng.randrange(self.blocks) * 4096)
        os.fsync(self.fd)
        self.written += n

    def _loop(self) -> None:
        rng = random.Random(11)
        while not self.stop.is_set():
            os.pwrite(self.fd, os.urandom(4096), rng.randrange(self.blocks) * 4096)
            self.written += 1
            if self.written % 64 == 0:
                os.fdatasync(self.fd)

    @contextmanager
    def running(self) -> Iterator[BlockWriter]:
        t = threading.Thread(target=self._loop, daemon=True)
        t.start()
        try:
            yield self
        finally:
            self.stop.set()
            t.join(10)
            os.close(self.fd)

    # a Quiescer: writes after prepare, before the freeze
    def before_freeze(self) -> None:
        self.burst()

    def after_thaw(self, ok: bool) -> None:
        pass


def _take(pair, tmp_path: Path, prov: WithReference, writer: BlockWriter, n: int = 0):
    man = snapshots.create(
        [pair.inner.path],
        prov,
        job=f"delta{n}",
        state_dir=tmp_path / "state",
        quiescers=[writer],
    )
    [snap] = man.snapshots
    clone = Path(snap.location)
    return snap, clone, Path(str(clone) + ".ref")


def _identical(a: Path, b: Path) -> bool:
    return sh("cmp", str(a), str(b), check=False).returncode == 0


@pytest.mark.parametrize("outer", ["xfs", "btrfs"])
def test_delta_clone_equals_a_plain_clone_taken_in_the_same_window(loopfs, tmp_path, outer):
    pair = image_on_reflink_host(loopfs, "ext4", outer)
    writer = BlockWriter(pair.inner.mountpoint / "data")
    with writer.running():
        for n in range(3):  # in a row: the image fragments, the next pre-clone shares it
            prov = WithReference()
            snap, clone, ref = _take(pair, tmp_path, prov, writer, n)
            assert snap.extra["mode"] == "delta", snap.extra
            assert snap.extra["ranges_in_window"] > 0  # the burst landed after prepare
            assert _identical(clone, ref), f"snapshot {n}: delta clone differs from FICLONE"
            fsck = sh("e2fsck", "-fn", str(clone), check=False)
            assert fsck.returncode == 0, fsck.stdout + fsck.stderr
            ref.unlink()
    assert writer.written > 900


def test_negative_control_without_the_window_pass_the_clone_differs(loopfs, tmp_path):
    pair = image_on_reflink_host(loopfs)
    writer = BlockWriter(pair.inner.mountpoint / "data")
    with writer.running():
        prov = WithReference()
        prov.skip_window_delta = True
        _, clone, ref = _take(pair, tmp_path, prov, writer)
        assert not _identical(clone, ref)


def test_lost_trace_events_fall_back_to_a_whole_image_clone(loopfs, tmp_path, monkeypatch):
    pair = image_on_reflink_host(loopfs)
    writer = BlockWriter(pair.inner.mountpoint / "data")
    real = writetrace.WriteTrace.drain

    def lossy(self: writetrace.WriteTrace) -> writetrace.Drained:
        got = real(self)
        got.lost = True
        return got

    monkeypatch.setattr(writetrace.WriteTrace, "drain", lossy)
    with writer.running():
        snap, clone, ref = _take(pair, tmp_path, WithReference(), writer)
    assert snap.extra["mode"] == "clone"
    assert "lost events" in snap.extra["note"]
    assert _identical(clone, ref)


def test_no_trace_falls_back_to_a_whole_image_clone(loopfs, tmp_path, monkeypatch):
    pair = image_on_reflink_host(loopfs)
    writer = BlockWriter(pair.inner.mountpoint / "data")

    def refuse(device: str) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(reflink_mod, "WriteTrace", refuse)
    with writer.running():
        snap, clone, ref = _take(pair, tmp_path, WithReference(), writer)
    assert snap.extra["mode"] == "clone"
    assert "no write trace" in snap.extra["note"]
    assert _identical(clone, ref)


def test_clone_mode_takes_no_trace(loopfs, tmp_path, monkeypatch):
    pair = image_on_reflink_host(loopfs)
    writer = BlockWriter(pair.inner.mountpoint / "data")

    def forbidden(device: str) -> None:
        raise AssertionError("clone mode must not trace")

    monkeypatch.setattr(reflink_mod, "WriteTrace", forbidden)
    with writer.running():
        snap, clone, ref = _take(pair, tmp_path, WithReference(mode="clone"), writer)
    assert snap.extra == {
        "image": str(pair.inner.image),
        "loop_device": pair.inner.device,
        "mode": "clone",
    }
    assert _identical(clone, ref)


def _instances() -> list[str]:
    """This process's trace instances, and the stale one the test plants."""
    mine = (f"quiesce-{os.getpid()}-", "quiesce-4194305-")
    with writetrace._tracefs() as root:
        return sorted(i for i in os.listdir(os.path.join(root, "instances")) if i.startswith(mine))


def test_trace_instances_are_removed_and_stale_ones_reaped(loopfs, tmp_path):
    pair = image_on_reflink_host(loopfs)
    assert _instances() == []
    with writetrace._tracefs() as root:  # one a SIGKILLed quiesce left (pid 2**22+1: none)
        os.mkdir(os.path.join(root, "instances", "quiesce-4194305-7-99"))
    writer = BlockWriter(pair.inner.mountpoint / "data")
    with writer.running():
        trace = writetrace.WriteTrace(pair.inner.device)
        try:
            assert f"quiesce-{os.getpid()}-" in " ".join(_instances())
            assert "quiesce-4194305-7-99" not in _instances()
            writer.burst(10)
            got = trace.drain()
            assert got.ranges and not got.lost
        finally:
            trace.close()
    assert _instances() == []


spans = st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(1, 1 << 13)), max_size=40)


@settings(deadline=None)
@given(spans, st.sampled_from([1, 512, 4096]))
def test_merge_covers_exactly_the_aligned_union(items, align):
    out = writetrace.merge(items, align)
    covered = set()
    for off, n in items:
        start = off - off % align
        stop = -(-(off + n) // align) * align
        covered.update(range(start // align, stop // align))
    got = set()
    for i, (a, n) in enumerate(out):
        nxt = out[i + 1] if i + 1 < len(out) else None
        assert a % align == 0 and n % align == 0 and n > 0
        if nxt is not None:
            assert a + n < nxt[0]  # sorted, apart (touching ranges are merged)
        got.update(range(a // align, (a + n) // align))
    assert got == covered


class Trimmer:
    """A Quiescer whose before_freeze only discards: fstrim of the blocks of a file that
    was written, and deleted, before the pre-clone."""

    def __init__(self, mnt: Path) -> None:
        self.mnt = mnt
        self.trimmed = ""

    def before_freeze(self) -> None:
        self.trimmed = sh("fstrim", "-v", str(self.mnt)).stdout

    def after_thaw(self, ok: bool) -> None:
        pass


def test_discards_after_the_pre_clone_are_re_cloned(loopfs, tmp_path):
    pair = image_on_reflink_host(loopfs)
    sh("fstrim", str(pair.inner.mountpoint))  # what is free now stays out of the next trim
    junk = pair.inner.mountpoint / "junk"
    junk.write_bytes(os.urandom(8 << 20))
    os.sync()
    junk.unlink()
    os.sync()
    trimmer = Trimmer(pair.inner.mountpoint)
    man = snapshots.create(
        [pair.inner.path], WithReference(), state_dir=tmp_path / "state", quiescers=[trimmer]
    )
    assert "trimmed" in trimmer.trimmed and "(0 bytes)" not in trimmer.trimmed
    [snap] = man.snapshots
    clone = Path(snap.location)
    assert snap.extra["mode"] == "delta" and snap.extra["ranges_in_window"] > 0
    assert _identical(clone, Path(str(clone) + ".ref"))


def test_a_loop_device_with_an_offset_maps_its_writes_into_the_image(loopfs, tmp_path):
    """``losetup --offset``: the traced sectors are the device's; the image's bytes sit
    1 MiB further. Without the offset the window re-clones the wrong ranges."""
    host = loopfs("xfs")
    image = host.mountpoint / "offset.img"
    with open(image, "wb") as f:
        f.truncate(97 << 20)
    dev = sh("losetup", "-f", "--show", "--offset", str(1 << 20), str(image)).stdout.strip()
    mnt = tmp_path / "offset-mnt"
    mnt.mkdir()
    try:
        sh("mkfs.ext4", "-q", dev)
        sh("mount", dev, str(mnt))
        try:
            writer = BlockWriter(mnt / "data", size_mb=48)
            with writer.running():
                man = snapshots.create(
                    [str(mnt)], WithReference(), state_dir=tmp_path / "state", quiescers=[writer]
                )
            [snap] = man.snapshots
            clone = Path(snap.location)
            assert snap.extra["mode"] == "delta" and snap.extra["ranges_in_window"] > 0
            assert _identical(clone, Path(str(clone) + ".ref"))
        finally:
            sh("umount", str(mnt), check=False)
    finally:
        sh("losetup", "-d", dev, check=False)


def test_a_full_trace_buffer_is_reported_lost(loopfs):
    """The window trusts the trace only if nothing was dropped: fill a tiny buffer."""
    fs = loopfs("ext4")
    writer = BlockWriter(fs.mountpoint / "data", size_mb=16)
    with writer.running():
        writer.stop.set()  # only the bursts below
        trace = writetrace.WriteTrace(fs.device, buffer_kb=4)
        try:
            for _ in range(20):
                writer.burst(100)  # each fsync'd: at least 20 requests, ~2000 in all
            got = trace.drain()
            assert got.lost, got.events
        finally:
            trace.close()
        trace = writetrace.WriteTrace(fs.device)
        try:
            writer.burst(100)
            got = trace.drain()
            assert not got.lost and got.events > 0
        finally:
            trace.close()


# -- the base: each snapshot seeded from the last one's content ---------------------------


def _sha(path: Path) -> str:
    return sh("sha256sum", str(path)).stdout.split()[0]


def _bases(pair) -> list[Path]:
    return sorted(pair.inner.image.parent.glob(reflink_mod.BASE_PREFIX + "*"))


def test_consecutive_snapshots_from_the_base_equal_the_frozen_image(loopfs, tmp_path):
    """Five snapshots in a row under scattered writes, each deleted before the next (as a
    job that backs up and prunes does): from the second on the clone is seeded from the
    base and only what changed since is cloned from the image; each equals (sha256) the
    image as it was frozen, cloned whole inside the same window."""
    pair = image_on_reflink_host(loopfs, "ext4", "xfs")
    writer = BlockWriter(pair.inner.mountpoint / "data", size_mb=4)  # the journal: 4 MiB
    image_size = pair.inner.image.stat().st_size
    with writer.running():
        for n in range(5):
            writer.burst(200)  # between snapshots: only the extent comparison sees these
            prov = WithReference()
            snap, clone, ref = _take(pair, tmp_path, prov, writer, n)
            extra = snap.extra
            assert extra["mode"] == "delta", extra
            assert _sha(clone) == _sha(ref), f"snapshot {n} differs from the frozen image"
            if n == 0:
                assert "base" not in extra["prepare"]
                assert extra["base_update"].get("whole") is True, extra["base_update"]
            else:
                base = extra["prepare"]["base"]
                assert base["changed_ranges"] > 0
                # the work follows the writes (data file and journal), not the image's size
                assert 0 < base["changed_bytes"] < image_size // 4, base
                assert "ranges" in extra["base_update"], extra["base_update"]
            assert len(_bases(pair)) == 1
            clone.unlink()
            ref.unlink()


def test_negative_control_a_base_without_the_comparison_misses_writes(
    loopfs, tmp_path, monkeypatch
):
    """The comparison skipped (nothing 'changed' since the base): the writes made between
    two snapshots are missing from the second, so the checksum test above can fail."""
    pair = image_on_reflink_host(loopfs)
    writer = BlockWriter(pair.inner.mountpoint / "data")
    with writer.running():
        _, clone, ref = _take(pair, tmp_path, WithReference(), writer, 0)
        assert _sha(clone) == _sha(ref)
        monkeypatch.setattr(reflink_mod.extents, "changed", lambda *a, **k: [])
        writer.burst(200)
        snap, clone, ref = _take(pair, tmp_path, WithReference(), writer, 1)
        assert snap.extra["prepare"]["base"]["changed_ranges"] == 0
        assert _sha(clone) != _sha(ref)


def test_a_base_of_another_size_is_not_used(loopfs, tmp_path):
    pair = image_on_reflink_host(loopfs)
    writer = BlockWriter(pair.inner.mountpoint / "data")
    with writer.running():
        _take(pair, tmp_path, WithReference(), writer, 0)
        [base] = _bases(pair)
        os.truncate(base, 4096)  # someone's, or a stale one: whole-image clone instead
        snap, clone, ref = _take(pair, tmp_path, WithReference(), writer, 1)
        assert "base" not in snap.extra["prepare"]
        assert _sha(clone) == _sha(ref)
        assert base.stat().st_size == pair.inner.image.stat().st_size  # made anew


BLK = 4096
ext_lists = st.lists(
    st.tuples(st.integers(0, 31), st.integers(1, 4), st.integers(0, 3), st.booleans()),
    max_size=12,
)


def _layout(items, phys_base: int):
    """Extents from (block, blocks, physical choice, unwritten) items, non-overlapping,
    and the per-block model: block -> (physical block or None, unwritten)."""
    exts, model, used = [], {}, set()
    for blk, n, choice, unwritten in items:
        blocks = [b for b in range(blk, min(blk + n, 32))]
        if not blocks or used & set(blocks):
            continue
        used |= set(blocks)
        phys = (choice * 100 + blk) if choice < 3 else phys_base + blk  # 3: unique to it
        flags = extents.UNWRITTEN if unwritten else 0
        exts.append((blk * BLK, phys * BLK, len(blocks) * BLK, flags))
        for i, b in enumerate(blocks):
            model[b] = (phys + i, unwritten)
    return sorted(exts), model


@settings(deadline=None)
@given(ext_lists, ext_lists)
def test_compare_flags_every_block_not_shared_and_no_other(a_items, b_items):
    a, am = _layout(a_items, 1000)
    b, bm = _layout(b_items, 2000)
    got = extents.compare(a, b, 32 * BLK, BLK)
    flagged = {o // BLK + i for o, n in got for i in range(n // BLK)}
    want = {blk for blk in range(32) if am.get(blk) != bm.get(blk)}
    assert flagged == want
    assert got == writetrace.merge(got)  # sorted, merged


@settings(deadline=None)
@given(spans, st.sampled_from([0, 4096, 65536]))
def test_merge_with_a_gap_covers_the_union_and_leaves_only_wider_gaps(items, gap):
    out = writetrace.merge(items, 512, gap)
    covered = {b for off, n in out for b in range(off // 512, (off + n) // 512)}
    for off, n in items:
        assert set(range(off // 512, -(-(off + n) // 512))) <= covered
    for (a, an), (b, _) in itertools.pairwise(out):
        assert b - (a + an) > gap


def test_base_false_keeps_no_base_and_clones_the_whole_image(loopfs, tmp_path):
    pair = image_on_reflink_host(loopfs)
    writer = BlockWriter(pair.inner.mountpoint / "data")
    with writer.running():
        for n in range(2):
            snap, clone, ref = _take(pair, tmp_path, WithReference(base=False), writer, n)
            assert "base" not in snap.extra["prepare"] and "base_update" not in snap.extra
            assert _sha(clone) == _sha(ref)
    assert _bases(pair) == []
