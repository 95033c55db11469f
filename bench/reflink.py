#!/usr/bin/env python3
"""The reflink snapshot's window as the image grows and fragments: mode "clone" vs "delta".

Not a test: run as root, ``python3 bench/reflink.py [--small-mb 100] [--big-mb 3072]
[--n 10] [--writes 20000]``. It builds an XFS (reflink=1) loop filesystem (a sparse file in
a temporary directory) and on it one ext4 image per size; for each image and each mode it
takes N snapshots in a row with ``quiesce.snapshots.create(..., "reflink")``, with a
random 4 KiB writer running on the ext4 all along and ``--writes`` more random 4 KiB
writes between snapshots (so the image fragments as a nightly job's would; each snapshot
is deleted before the next). The modes run on separate images, made alike.

A probe process appends 512 bytes and fdatasyncs every 10 ms (a database's log): its
longest write+fdatasync during each snapshot (the whole ``create``, prepare included) is
what an application feels, window or not (a clone holds the image's inode lock, so a
whole-image clone in ``prepare`` would stall the writers too).

Printed: each snapshot's window (the manifest's: first FIFREEZE -> last FITHAW), the
in-window provider call and the probe's longest stall, then the ratios the goal is stated
in: big image / small image, at the 1st and the Nth snapshot, for each mode (goal for
delta: <= 2), and delta / clone.
Everything it makes is removed at the end, also on failure.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from quiesce import snapshot as snapshots


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


class Stack(contextlib.ExitStack):
    def mount_image(self, image: Path, where: Path, mkfs: list[str], size_mb: int) -> str:
        with open(image, "wb") as f:
            f.truncate(size_mb << 20)
        sh(*mkfs, str(image))
        dev = sh("losetup", "--find", "--show", str(image))
        self.callback(subprocess.run, ["losetup", "-d", dev], check=False)
        where.mkdir()
        sh("mount", dev, str(where))
        self.callback(subprocess.run, ["umount", str(where)], check=False)
        return dev


class Writer:
    """Random 4 KiB writes to a file filling most of the image: a thread at a steady
    pace all along (``rate`` per second, fdatasync every 64), and ``burst`` on demand."""

    def __init__(self, path: Path, size_mb: int, rate: float) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.posix_fallocate(self.fd, 0, size_mb << 20)
        os.fsync(self.fd)
        self.blocks = (size_mb << 20) // 4096
        self.rate = rate
        self.stop = threading.Event()
        self.block = os.urandom(4096)
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _write(self, rng: random.Random) -> None:
        data = rng.randbytes(16) + self.block[16:]
        os.pwrite(self.fd, data, rng.randrange(self.blocks) * 4096)

    def _loop(self) -> None:
        rng, n = random.Random(1), 0
        while not self.stop.wait(1 / self.rate):
            self._write(rng)
            n += 1
            if n % 64 == 0:
                os.fdatasync(self.fd)

    def burst(self, n: int) -> None:
        rng = random.Random(n)
        for _ in range(n):
            self._write(rng)
        os.fsync(self.fd)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        os.close(self.fd)


PROBE = r"""
import os, signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
out = open(sys.argv[2], "w", buffering=1)
while True:
    time.sleep(0.01)
    t0 = time.monotonic()
    os.write(fd, b"x" * 511 + b"\n")
    os.fdatasync(fd)
    d = time.monotonic() - t0
    if d > 0.002:
        out.write(f"{t0} {d}\n")
"""


class Probe:
    """A process of its own (no GIL shared with quiesce's work): 512-byte appends, each
    fdatasync'd, every 10 ms; logs (start, duration) of those over 2 ms to ``log``."""

    def __init__(self, path: Path, log: Path) -> None:
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-c", PROBE, str(path), str(log)])

    def worst(self, t0: float, t1: float) -> float:
        worst = 0.0
        for line in self.log.read_text().splitlines():
            s, d = map(float, line.split())
            if s + d >= t0 and s <= t1:
                worst = max(worst, d)
        return worst

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def extents(image: Path) -> int:
    return sh("xfs_io", "-c", "fiemap", str(image)).count("\n")


def run_series(
    base: Path, label: str, size_mb: int, mode: str, args: argparse.Namespace, host: Path
) -> list[dict[str, float]]:
    rows = []
    with Stack() as st:
        mnt = base / f"mnt-{label}-{mode}"
        st.mount_image(host / f"{label}-{mode}.img", mnt, ["mkfs.ext4", "-q"], size_mb)
        writer = Writer(mnt / "data", int(size_mb * 0.8), args.rate)
        st.callback(writer.close)
        probe = Probe(mnt / "probe.log", base / f"probe-{label}-{mode}.txt")
        st.callback(probe.close)
        state = base / f"state-{label}-{mode}"
        prev = None
        for i in range(args.n):
            writer.burst(args.writes)
            if prev is not None:
                snapshots.delete(prev, state)
            t0 = time.monotonic()
            man = snapshots.create(
                [str(mnt)], "reflink", options={"mode": mode}, job=f"b{i}", state_dir=state
            )
            t1 = time.monotonic()
            prev = man.id
            w = man.window or {}
            rows.append(
                {
                    "window_ms": w.get("window_s", 0) * 1000,
                    "cmd_ms": (t1 - t0) * 1000,
                    "call_ms": w.get("snapshot_s", 0) * 1000,
                    "extents": extents(host / f"{label}-{mode}.img"),
                    "ranges": man.snapshots[0]["extra"].get("ranges_in_window", -1),
                    "stall_ms": probe.worst(t0, t1) * 1000,
                }
            )
            r = rows[-1]
            print(
                f"  {label:>5} {mode:>5} #{i + 1:<2} command {r['cmd_ms']:7.0f} ms"
                f"  window {r['window_ms']:8.1f} ms"
                f"  FICLONE call {r['call_ms']:8.1f} ms  probe stall {r['stall_ms']:7.1f} ms"
                f"  extents {r['extents']:7d}"
                f"  ranges in window {r['ranges']}",
                flush=True,
            )
        if prev is not None:
            snapshots.delete(prev, state)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small-mb", type=int, default=100)
    ap.add_argument("--big-mb", type=int, default=3072)
    ap.add_argument("--n", type=int, default=10, help="snapshots in a row")
    ap.add_argument("--writes", type=int, default=20000, help="random writes between them")
    ap.add_argument("--rate", type=float, default=200, help="writer's writes per second")
    ap.add_argument("--modes", default="clone,delta")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root")
    modes = args.modes.split(",")
    sizes = {"small": args.small_mb, "big": args.big_mb}
    print(f"load average {os.getloadavg()}, {args.n} snapshots, {args.writes} writes between")
    base = Path(tempfile.mkdtemp(prefix="quiesce-bench-reflink-"))
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    try:
        with Stack() as st:
            host = base / "host"
            host_mb = 2 * (args.small_mb + args.big_mb) * len(modes) + 1024
            st.mount_image(base / "host.img", host, ["mkfs.xfs", "-q", "-m", "reflink=1"], host_mb)
            for mode in modes:
                for label, mb in sizes.items():
                    results[label, mode] = run_series(base, label, mb, mode, args, host)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"\nload average {os.getloadavg()}")
    print("window (ms) at snapshot 1 / N, and ratios (goal for delta: big/small <= 2):")
    for mode in modes:
        s, b = results["small", mode], results["big", mode]
        for k, name in ((0, "1st"), (-1, f"{args.n}th")):
            ratio = b[k]["window_ms"] / max(s[k]["window_ms"], 1e-3)
            print(
                f"  {mode:>5} {name:>4}: small {s[k]['window_ms']:8.1f}  big"
                f" {b[k]['window_ms']:8.1f}  big/small {ratio:6.2f}"
                f"   (probe stall: small {s[k]['stall_ms']:7.1f}  big {b[k]['stall_ms']:7.1f})"
            )
    print("command time and window, 11th / 1st and Nth / 1st (goal <= 1.5):")
    for (label, mode), rows in results.items():
        first, nth = rows[0], rows[-1]
        eleventh = rows[min(10, len(rows) - 1)]
        print(
            f"  {label:>5} {mode:>5}: command {first['cmd_ms']:.0f} / {eleventh['cmd_ms']:.0f}"
            f" / {nth['cmd_ms']:.0f} ms ({eleventh['cmd_ms'] / first['cmd_ms']:.2f}x,"
            f" {nth['cmd_ms'] / first['cmd_ms']:.2f}x); window {first['window_ms']:.1f} /"
            f" {eleventh['window_ms']:.1f} / {nth['window_ms']:.1f} ms"
            f" ({eleventh['window_ms'] / max(first['window_ms'], 1e-3):.2f}x,"
            f" {nth['window_ms'] / max(first['window_ms'], 1e-3):.2f}x); image extents"
            f" {first['extents']} -> {nth['extents']}"
        )
    if {"clone", "delta"} <= set(modes):
        for label in sizes:
            c, d = results[label, "clone"][-1], results[label, "delta"][-1]
            print(
                f"  {label:>5} {args.n}th: delta/clone window"
                f" {d['window_ms'] / max(c['window_ms'], 1e-3):6.3f}"
            )


if __name__ == "__main__":
    main()
