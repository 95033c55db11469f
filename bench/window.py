#!/usr/bin/env python3
"""The freeze window: the shell's fsfreeze pair vs quiesce, and a reflink snapshot's.

Not a test: run as root, ``python3 bench/window.py [--n 20] [--tables freeze,reflink]``.
Every table runs its own setup and teardown and prints its own section (TABLES below).

**freeze** (issue 12): for ext4, XFS and btrfs x {idle, fsync writer, bulk writer} x
groups of 1, 2 and 4 independent volumes, three methods interleaved: the shell's
``fsfreeze -f ...; fsfreeze -u ...``, quiesce with ``--no-expedite`` and one volume at a
time (before issue 12), and quiesce now (expedited RCU grace periods while freezing,
independent volumes at once, syncfs skipped when little is dirty). Median and p95 window,
and the writer's worst stall per snapshot inside and outside the window (and how often
quiesce skipped its syncfs: it does when under 4 MiB is dirty machine-wide, so other
processes' dirty pages on a shared machine make it syncfs); then the target ratios.

**reflink**: it builds an ext4 image on
an XFS (reflink=1) loop filesystem, runs one writer profile at a time on the ext4, and
takes N snapshots with each method, interleaved (a, b, c, a, b, c, ...):

(a) the naive script: ``fsfreeze -f M; cp --reflink=always IMG SNAP; fsfreeze -u M``,
    three processes; its window is measured from the spawn of ``fsfreeze -f`` to the
    exit of ``fsfreeze -u`` (an upper bound by the ~1 ms exec of the first fsfreeze);
(b) ``quiesce.snapshots.create(..., "reflink")`` (what `quiesce snapshot create
    --provider reflink` runs); its window is the manifest's (first FIFREEZE issued ->
    last FITHAW returned, measured by the guardian that does the ioctls);
(c) the floor: syncfs, then FIFREEZE + FICLONE + FITHAW back to back in one process.

Writer profiles: (1) "fsync": 100-byte appends, each fsync'd, 2 ms apart (a database's
log); (2) "bulk": buffered 1 MiB pwrites cycling over a 64 MiB region, ~100 MB/s, never
fsync'd, so tens of MB are dirty when a snapshot starts. Each writer logs every write
that took longer than 1 ms (start, duration); a stall is charged to the snapshot whose
operation it overlaps; "outside window" is the longest part of such a stall that falls
outside that snapshot's freeze window (the pre-freeze syncfs, or CPU contention).
Everything it makes is removed at the end, also on failure.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from quiesce import snapshot as snapshots
from quiesce.host import kernel

FIFREEZE, FITHAW, FICLONE = kernel.FIFREEZE, kernel.FITHAW, kernel.FICLONE

WRITERS = {
    "fsync": r"""
import json, os, signal, sys, time
stop = False
SLOW = float(sys.argv[2]) if len(sys.argv) > 2 else 0.001
signal.signal(signal.SIGTERM, lambda *_: globals().__setitem__("stop", True))
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
slow, n = [], 0
print("ready", flush=True)
while not stop:
    t0 = time.monotonic()
    os.write(fd, b"%099d\n" % n); os.fsync(fd); n += 1
    d = time.monotonic() - t0
    if d > SLOW: slow.append((t0, d))
    time.sleep(0.002)
print(json.dumps({"ops": n, "slow": slow}), flush=True)
""",
    "bulk": r"""
import json, os, signal, sys, time
stop = False
SLOW = float(sys.argv[2]) if len(sys.argv) > 2 else 0.001
signal.signal(signal.SIGTERM, lambda *_: globals().__setitem__("stop", True))
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o644)
chunk, region = b"\xa5" * (1 << 20), 64
slow, n = [], 0
print("ready", flush=True)
while not stop:
    t0 = time.monotonic()
    os.pwrite(fd, chunk, (n % region) << 20); n += 1
    d = time.monotonic() - t0
    if d > SLOW: slow.append((t0, d))
    time.sleep(0.01)
print(json.dumps({"ops": n, "slow": slow}), flush=True)
""",
}
GAP = {"fsync": 0.3, "bulk": 0.7}  # bulk: let ~64 MiB get dirty between snapshots
METHODS = ("a", "b", "c")
LABEL = {
    "a": "(a) fsfreeze -f; cp --reflink; fsfreeze -u",
    "b": "(b) quiesce snapshot --provider reflink",
    "c": "(c) floor: syncfs; FIFREEZE+FICLONE+FITHAW",
}


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, text=True, capture_output=True).stdout.strip()


class Bench:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.loops: list[str] = []
        self.mounts: list[Path] = []
        self.parts: dict[str, list[tuple[float, float, float]]] = {"b": [], "c": []}

    def setup(self) -> None:
        outer_img = self.base / "outer.img"
        with open(outer_img, "wb") as f:
            f.truncate(4 << 30)
        sh("mkfs.xfs", "-q", "-f", "-m", "reflink=1", str(outer_img))
        self.outer = self._mount(outer_img, self.base / "outer")
        self.image = self.outer / "inner.img"
        with open(self.image, "wb") as f:
            f.truncate(1 << 30)
        sh("mkfs.ext4", "-q", "-F", str(self.image))
        self.inner = self._mount(self.image, self.base / "inner")
        self.state = self.base / "state"
        self.clones = self.outer / "clones"
        self.clones.mkdir()

    def _mount(self, image: Path, mnt: Path) -> Path:
        dev = sh("losetup", "-f", "--show", "--direct-io=on", str(image))
        self.loops.append(dev)
        mnt.mkdir()
        sh("mount", dev, str(mnt))
        self.mounts.append(mnt)
        return mnt

    def teardown(self) -> None:
        with contextlib.suppress(OSError):  # thaw only what this script may have frozen
            fd = os.open(self.inner, os.O_RDONLY | os.O_DIRECTORY)
            try:
                fcntl.ioctl(fd, FITHAW, 0)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    print(f"warning: thaw {self.inner}: {e}", file=sys.stderr)
            finally:
                os.close(fd)
        # inner first: its loop device keeps the outer filesystem busy until detached
        for mnt, dev in reversed(list(zip(self.mounts, self.loops, strict=False))):
            for _ in range(50):
                if subprocess.run(["umount", str(mnt)], capture_output=True).returncode == 0:
                    break
                time.sleep(0.1)
            subprocess.run(["losetup", "-d", dev], capture_output=True)
        for dev in self.loops[len(self.mounts) :]:  # attached but never mounted
            subprocess.run(["losetup", "-d", dev], capture_output=True)

    # -- the three methods: (window_s, op begin, op end, window begin, window end) ------
    def naive(self, i: int) -> tuple[float, ...]:
        snap = self.clones / f"a{i}.img"
        t0 = time.monotonic()
        subprocess.run(["fsfreeze", "-f", str(self.inner)], check=True)
        try:
            subprocess.run(["cp", "--reflink=always", str(self.image), str(snap)], check=True)
        finally:
            subprocess.run(["fsfreeze", "-u", str(self.inner)], check=True)
        t1 = time.monotonic()
        snap.unlink()
        return t1 - t0, t0, t1, t0, t1

    def quiesce(self, i: int) -> tuple[float, ...]:
        t0 = time.monotonic()
        man = snapshots.create(
            [str(self.inner)], "reflink", job="bench", options={"dest": str(self.clones)},
            state_dir=self.state,
        )  # fmt: skip
        t1 = time.monotonic()
        snapshots.delete(man.id, self.state)
        assert man.window is not None and man.window_s is not None
        v = man.window["volumes"][0]
        snap = man.window["snapshot_s"]
        self.parts["b"].append((v["freeze_s"], snap, v["frozen_for_s"] - snap, v["thaw_s"]))
        w = man.window
        return man.window_s, t0, t1, w["start_ns"] / 1e9, w["end_ns"] / 1e9

    def floor(self, i: int) -> tuple[float, ...]:
        snap = self.clones / f"c{i}.img"
        t0 = time.monotonic()
        fd = os.open(self.inner, os.O_RDONLY | os.O_DIRECTORY)
        src = os.open(self.image, os.O_RDONLY)
        dst = os.open(snap, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            kernel.syncfs(fd)
            f0 = time.monotonic_ns()
            fcntl.ioctl(fd, FIFREEZE, 0)
            fa = time.monotonic_ns()
            try:
                fcntl.ioctl(dst, FICLONE, src)
            finally:
                fb = time.monotonic_ns()
                fcntl.ioctl(fd, FITHAW, 0)
            f1 = time.monotonic_ns()
            self.parts["c"].append(((fa - f0) / 1e9, (fb - fa) / 1e9, (f1 - fb) / 1e9))
        finally:
            for x in (dst, src, fd):
                os.close(x)
        t1 = time.monotonic()
        snap.unlink()
        return (f1 - f0) / 1e9, t0, t1, f0 / 1e9, f1 / 1e9


def rcu_grace_period_ms(n: int = 15) -> float:
    """Median cost of synchronize_rcu(), via membarrier(MEMBARRIER_CMD_GLOBAL): each
    FIFREEZE level (write, pagefault, fs) takes a percpu rwsem for writing, which waits
    for one unless the fs was frozen a moment ago."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    sys_membarrier, cmd_global = 324, 1  # x86_64
    times = []
    for _ in range(n):
        time.sleep(0.05)
        t = time.monotonic()
        if libc.syscall(sys_membarrier, cmd_global, 0) != 0:
            return float("nan")
        times.append((time.monotonic() - t) * 1000)
    return statistics.median(times)


def dirty_mb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Dirty:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


def run_profile(b: Bench, profile: str, n: int) -> dict[str, dict[str, object]]:
    target = b.inner / f"{profile}.dat"
    w = subprocess.Popen(
        [sys.executable, "-c", WRITERS[profile], str(target)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert w.stdout is not None and w.stdout.readline().strip() == "ready"
    # per snapshot: (window_s, op begin, op end, window begin, window end), monotonic s
    runs: dict[str, list[tuple[float, ...]]] = {m: [] for m in METHODS}
    dirty: list[float] = []
    do = {"a": b.naive, "b": b.quiesce, "c": b.floor}
    try:
        time.sleep(1.0)
        for i in range(n):
            for m in METHODS:
                time.sleep(GAP[profile])
                dirty.append(dirty_mb())
                runs[m].append(do[m](i))
    finally:
        w.terminate()
        out, _ = w.communicate(timeout=60)
    report = json.loads(out.strip().splitlines()[-1])
    result: dict[str, dict[str, object]] = {}
    for m in METHODS:
        windows = [r[0] for r in runs[m]]
        stall, stall_window, outside = 0.0, 0.0, 0.0
        for start, dur in report["slow"]:
            for win, t0, t1, w0, w1 in runs[m]:
                if start < t1 and start + dur > t0:
                    if dur > stall:
                        stall, stall_window = dur, win
                    inside = max(0.0, min(start + dur, w1) - max(start, w0))
                    outside = max(outside, dur - inside)
        result[m] = {
            "n": len(windows),
            "median": statistics.median(windows),
            "p95": pct(windows, 95),
            "max": max(windows),
            "stall": stall,
            "stall_window": stall_window,
            "outside": outside,
        }
    result["_dirty"] = {"median_mb": statistics.median(dirty), "ops": report["ops"]}
    return result


def ms(s: float) -> str:
    return f"{s * 1000:8.2f} ms"


# -- the freeze window at the hardware's limit (issue 12) ----------------------------------

FREEZE_METHODS = ["pair", "serial", "now"]  # --methods; "base" needs --baseline-src
FREEZE_LABEL = {
    "pair": "fsfreeze -f ...; fsfreeze -u ...",
    "serial": "quiesce --no-expedite, serial",
    "now": "quiesce (expedite, concurrent)",
    "base": "the same, --baseline-src's code",
}
MKFS = {
    "ext4": ["mkfs.ext4", "-q", "-F"],
    "xfs": ["mkfs.xfs", "-q", "-f"],
    "btrfs": ["mkfs.btrfs", "-q", "-f"],
}
FREEZE_GAP = {"idle": 0.15, "fsync": 0.3, "bulk": 0.7}
SYNCFS_SKIPPED = {True: 0, False: 0}  # quiesce runs whose syncfs was skipped (little dirty)


class Volumes:
    """Up to 4 loop filesystems of one type in a temp dir; removed on close."""

    def __init__(self, fstype: str, n: int) -> None:
        self.base = Path(tempfile.mkdtemp(prefix=f"quiesce-bench-{fstype}-"))
        self.loops: list[str] = []
        self.paths: list[str] = []
        try:
            for i in range(n):
                img = self.base / f"v{i}.img"
                with open(img, "wb") as f:
                    f.truncate(512 << 20)
                sh(*MKFS[fstype], str(img))
                dev = sh("losetup", "-f", "--show", "--direct-io=on", str(img))
                self.loops.append(dev)
                mnt = self.base / f"m{i}"
                mnt.mkdir()
                sh("mount", dev, str(mnt))
                self.paths.append(str(mnt))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for p in self.paths:  # thaw only what this script may have frozen
            with contextlib.suppress(OSError):
                fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    fcntl.ioctl(fd, FITHAW, 0)
                except OSError:
                    pass
                finally:
                    os.close(fd)
        for p in self.paths:
            for _ in range(50):
                if subprocess.run(["umount", p], capture_output=True).returncode == 0:
                    break
                time.sleep(0.1)
        for dev in self.loops:
            subprocess.run(["losetup", "-d", dev], capture_output=True)
        shutil.rmtree(self.base, ignore_errors=True)


def fsfreeze_pair(paths: list[str]) -> tuple[float, ...]:
    """The shell way: one fsfreeze -f per volume, then fsfreeze -u in reverse."""
    t0 = time.monotonic()
    for p in paths:
        subprocess.run(["fsfreeze", "-f", p], check=True)
    for p in reversed(paths):
        subprocess.run(["fsfreeze", "-u", p], check=True)
    t1 = time.monotonic()
    return t1 - t0, t0, t1, t0, t1


def quiesce_freeze(paths: list[str], *, expedite: bool, concurrent: bool) -> tuple[float, ...]:
    import quiesce

    t0 = time.monotonic()
    with quiesce.freeze(paths, timeout=30, expedite=expedite, concurrent=concurrent) as w:
        pass
    t1 = time.monotonic()
    assert w.start_ns is not None and w.end_ns is not None and w.duration is not None
    SYNCFS_SKIPPED[expedite] += (w.syncfs or "").startswith("skipped")
    return w.duration, t0, t1, w.start_ns / 1e9, w.end_ns / 1e9


BASELINE_HELPER = r"""
import json, sys, time
import quiesce
for line in sys.stdin:
    paths = json.loads(line)
    t0 = time.monotonic()
    with quiesce.freeze(paths, timeout=30) as w:
        pass
    t1 = time.monotonic()
    skipped = (w.syncfs or "").startswith("skipped")
    print(json.dumps([w.duration, t0, t1, w.start_ns / 1e9, w.end_ns / 1e9, skipped]), flush=True)
"""


class Baseline:
    """quiesce "now" from another source tree (e.g. main's ``src``), in a helper process
    that freezes on request, so that before/after windows interleave in one run (the
    same CLOCK_MONOTONIC: the writer's stalls are charged the same way)."""

    def __init__(self, src: str) -> None:
        env = {**os.environ, "PYTHONPATH": src}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", BASELINE_HELPER], env=env, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )  # fmt: skip
        self.skipped = 0

    def freeze(self, paths: list[str]) -> tuple[float, ...]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(paths) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the baseline helper died (see its stderr above)")
        *run, skipped = json.loads(line)
        self.skipped += skipped
        return tuple(run)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)


BASELINE: list[Baseline] = []  # set by freeze_table from --baseline-src


def stalls(slow: list[list[float]], runs: list[tuple[float, ...]]) -> dict[str, float]:
    """Per snapshot, the writer's worst stall overlapping its operation, split into the
    part inside its window and the part outside; medians and maxima over snapshots."""
    worst, inside_w, outside_w = [], [], []
    for _, t0, t1, w0, w1 in runs:
        tot = ins = out = 0.0
        for start, dur in slow:
            if start < t1 and start + dur > t0:
                inside = max(0.0, min(start + dur, w1) - max(start, w0))
                tot, ins, out = max(tot, dur), max(ins, inside), max(out, dur - inside)
        worst.append(tot)
        inside_w.append(ins)
        outside_w.append(out)
    return {
        "stall_med": statistics.median(worst),
        "stall_max": max(worst),
        "inside_max": max(inside_w),
        "outside_max": max(outside_w),
        "outside_med": statistics.median(outside_w),
    }


def freeze_case(paths: list[str], profile: str, n: int) -> dict[str, dict[str, float]]:
    load = os.getloadavg()[0]
    writer = None
    if profile != "idle":
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITERS[profile], f"{paths[0]}/{profile}.dat", "0.0002"],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
    do = {
        "pair": lambda: fsfreeze_pair(paths),
        "serial": lambda: quiesce_freeze(paths, expedite=False, concurrent=False),
        "now": lambda: quiesce_freeze(paths, expedite=True, concurrent=True),
        "base": lambda: BASELINE[0].freeze(paths),
    }
    runs: dict[str, list[tuple[float, ...]]] = {m: [] for m in FREEZE_METHODS}
    try:
        time.sleep(0.5)
        for _ in range(n):
            for m in FREEZE_METHODS:
                time.sleep(FREEZE_GAP[profile])
                runs[m].append(do[m]())
    finally:
        slow: list[list[float]] = []
        if writer is not None:
            writer.terminate()
            out, _ = writer.communicate(timeout=60)
            slow = json.loads(out.strip().splitlines()[-1])["slow"]
    res = {}
    skipped = dict(SYNCFS_SKIPPED)
    SYNCFS_SKIPPED.update({True: 0, False: 0})
    base_skipped = 0
    if BASELINE:
        base_skipped, BASELINE[0].skipped = BASELINE[0].skipped, 0
    for m in FREEZE_METHODS:
        windows = [r[0] for r in runs[m]]
        res[m] = {"median": statistics.median(windows), "p95": pct(windows, 95)}
        if writer is not None:
            res[m] |= stalls(slow, runs[m])
    for m, k in (("now", skipped[True]), ("base", base_skipped)):
        if m in res:
            res[m]["syncfs_skipped"] = k
    res["_load"] = {"at": max(load, os.getloadavg()[0])}  # the higher, start or end
    return res


def freeze_table(args: argparse.Namespace) -> None:
    """The freeze window alone (no snapshot): fsfreeze pair vs quiesce before/after."""
    groups = [int(g) for g in args.groups.split(",")]
    profiles = args.profiles.split(",")
    FREEZE_METHODS[:] = args.methods.split(",")
    if "base" in FREEZE_METHODS:
        if not args.baseline_src:
            raise SystemExit("--methods base needs --baseline-src")
        BASELINE.append(Baseline(args.baseline_src))
    try:
        _freeze_table(args, groups, profiles)
    finally:
        for b in BASELINE:
            b.close()
        BASELINE.clear()


def _freeze_table(args: argparse.Namespace, groups: list[int], profiles: list[str]) -> None:
    results: dict[tuple[str, int, str], dict[str, dict[str, float]]] = {}
    for fstype in args.fs.split(","):
        vols = Volumes(fstype, max(groups))
        try:
            for g in groups:
                for profile in profiles:
                    results[fstype, g, profile] = freeze_case(vols.paths[:g], profile, args.n)
        finally:
            vols.close()
    print(f"\n== freeze window: 512 MiB loop filesystems (--direct-io=on), {args.n} per method "
          "and case; window = first FIFREEZE issued -> last FITHAW returned (the pair: spawn of "
          "the first fsfreeze -> exit of the last); stall = the writer's (on the first volume) "
          "worst write per snapshot, inside / outside the window")  # fmt: skip
    cols = ("stall med", "stall max", "inside max", "outside max")
    print(f"  {'fs':6} {'vols':>4} {'writer':6} {'method':32} {'median':>11} {'p95':>11} "
          + " ".join(f"{c:>11}" for c in cols))  # fmt: skip
    for (fstype, g, profile), res in results.items():
        print(f"  {fstype:6} {g:>4} {profile:6} load average {res['_load']['at']:.2f}")
        for m in FREEZE_METHODS:
            r = res[m]
            st = (
                f"{ms(r['stall_med'])} {ms(r['stall_max'])} {ms(r['inside_max'])} "
                f"{ms(r['outside_max'])}"
                if "stall_med" in r
                else ""
            )
            k = r.get("syncfs_skipped")
            skip = f"  (syncfs skipped {k}/{args.n})" if k is not None else ""
            print(f"  {fstype:6} {g:>4} {profile:6} {FREEZE_LABEL[m]:32} {ms(r['median'])} "
                  f"{ms(r['p95'])} {st}{skip}")  # fmt: skip
    print("\n  targets (median ratios; target in brackets):")
    for (fstype, g, profile), res in results.items():
        if profile != "fsync" or g != min(groups):
            continue
        if "now" not in res or "pair" not in res:
            continue
        now, pair = res["now"], res["pair"]
        print(f"  {fstype:6} fsync writer: window now/pair {now['median'] / pair['median']:.3f} "
              f"[<= 0.1]; worst stall per snapshot now/pair: median "
              f"{now['stall_med'] / max(pair['stall_med'], 1e-9):.3f}, max "
              f"{now['stall_max'] / max(pair['stall_max'], 1e-9):.3f} [<= 0.2]")  # fmt: skip
    for (fstype, g, profile), res in results.items():
        one = results.get((fstype, 1, profile))
        if g == 1 or one is None:
            continue
        for m in [m for m in ("serial", "now", "base") if m in res]:
            print(f"  {fstype:6} {profile:6} group of {g} / one volume ({m}): "
                  f"{res[m]['median'] / one[m]['median']:.2f}"
                  + (" [<= 1.5]" if g == 4 and m != "serial" else "")
                  + f"  (load {one['_load']['at']:.1f} / {res['_load']['at']:.1f})")  # fmt: skip


def reflink_table(args: argparse.Namespace) -> None:
    """The reflink snapshot's window: naive script vs quiesce vs the floor."""
    base = Path(tempfile.mkdtemp(prefix="quiesce-bench-"))
    bench = Bench(base)
    results = {}
    parts = {}
    try:
        bench.setup()
        for profile in ("fsync", "bulk"):
            bench.parts = {"b": [], "c": []}
            results[profile] = run_profile(bench, profile, args.n)
            parts[profile] = bench.parts
    finally:
        bench.teardown()
        shutil.rmtree(base, ignore_errors=True)
    print(f"\n== reflink snapshot: ext4 1 GiB image on XFS (reflink=1) loop fs, "
          f"loop --direct-io=on; {args.n} snapshots per method")  # fmt: skip
    for profile, res in results.items():
        d = res["_dirty"]
        print(f"\nwriter profile: {profile} ({d['ops']} writes; Dirty before a snapshot, "
              f"median: {d['median_mb']:.1f} MB system-wide)")  # fmt: skip
        print(f"  {'method':45} {'median':>11} {'p95':>11} {'max':>11} "
              f"{'longest stall':>14} {'(its window)':>12} {'outside window':>14}")  # fmt: skip
        for m in METHODS:
            r = res[m]
            stall, win, out = ms(r["stall"]), ms(r["stall_window"]), ms(r["outside"])
            print(f"  {LABEL[m]:45} {ms(r['median'])} {ms(r['p95'])} {ms(r['max'])} "
                  f"{stall:>14} {win} {out:>14}")  # fmt: skip
        a, b, c = res["a"], res["b"], res["c"]
        print(f"  (b)/(a): median {b['median'] / a['median']:.3f}, p95 {b['p95'] / a['p95']:.3f}"
              f"    (b)/(c): median {b['median'] / c['median']:.3f}, "
              f"p95 {b['p95'] / c['p95']:.3f}")  # fmt: skip
        med = [statistics.median(x) * 1000 for x in zip(*parts[profile]["b"], strict=True)]
        print(f"  (b) median parts: FIFREEZE {med[0]:.2f} ms, provider snapshot (FICLONE) "
              f"{med[1]:.2f} ms, guardian round trips (freeze reply + thaw request) "
              f"{med[2]:.2f} ms, FITHAW {med[3]:.2f} ms")  # fmt: skip
        med = [statistics.median(x) * 1000 for x in zip(*parts[profile]["c"], strict=True)]
        print(f"  (c) median parts: FIFREEZE {med[0]:.2f} ms, FICLONE {med[1]:.2f} ms, "
              f"FITHAW {med[2]:.2f} ms")  # fmt: skip


# Each table: a function of the parsed arguments that runs its own setup and teardown and
# prints its own section. Add a table here (and its name to --tables' help).
TABLES = {"freeze": freeze_table, "reflink": reflink_table}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20, help="repetitions per method and case")
    ap.add_argument(
        "--tables", default="freeze,reflink", help="comma-separated, of: " + ", ".join(TABLES)
    )
    ap.add_argument("--fs", default="ext4,xfs,btrfs", help="freeze table: filesystems")
    ap.add_argument("--groups", default="1,2,4", help="freeze table: group sizes")
    ap.add_argument("--profiles", default="idle,fsync,bulk", help="freeze table: writer profiles")
    ap.add_argument(
        "--methods", default="pair,serial,now", help="freeze table: of pair, serial, now, base"
    )
    ap.add_argument(
        "--baseline-src",
        help="freeze table, method base: another tree's src (e.g. /work/main/src), interleaved",
    )
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("run as root", file=sys.stderr)
        return 2
    with open("/sys/kernel/rcu_expedited") as f:
        before = f.read()
    print(f"kernel {os.uname().release}, {os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")  # fmt: skip
    try:
        for name in args.tables.split(","):
            TABLES[name](args)
        print(f"\none RCU grace period (membarrier GLOBAL), median: {rcu_grace_period_ms():.1f} ms")
    finally:
        with open("/sys/kernel/rcu_expedited") as f:
            after = f.read()
        if after != before:
            print(f"warning: rcu_expedited was {before.strip()}, now {after.strip()}")
        print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
