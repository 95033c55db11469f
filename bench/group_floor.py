#!/usr/bin/env python3
"""The floor of a group freeze: what the kernel alone costs to freeze 4 volumes vs 1.

Not a test: run as root, ``python3 bench/group_floor.py [--rounds 4] [--reps 10]``.
A tiny C program (group_floor.c, built with gcc into a temp dir) FIFREEZEs and FITHAWs
this script's own loop filesystems (512 MiB, --direct-io=on, like window.py), with
rcu_expedited=1 from just before the first FIFREEZE to just after the last (as quiesce
does), idle or with window.py's fsync writer on the first volume or on each. Threading
modes for a group: ``serial`` (one thread), ``spawn`` (a thread started per volume per
wave), ``pool`` (one parked thread per volume, woken together: what the guardian does),
``pool2`` (two parked threads, each doing half the volumes: 2 cores). Rounds interleave
the modes; it prints medians and p95 of each part and the ratio to one volume. The gap
(last FIFREEZE return -> first FITHAW) is the part quiesce's guardian spends answering
the controller and hearing the thaw: compare with window.py. Everything it makes is
removed at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from window import WRITERS, Volumes, pct

MODES = ("serial", "spawn", "pool", "pool2")


def build(tmp: Path) -> Path:
    exe = tmp / "group_floor"
    src = Path(__file__).with_name("group_floor.c")
    subprocess.run(["gcc", "-O2", "-pthread", "-o", str(exe), str(src)], check=True)
    return exe


def run(exe: Path, fs: str, writers: str, rounds: int, reps: int) -> dict[tuple[str, int], list]:
    vols = Volumes(fs, 4)
    procs: list[subprocess.Popen[str]] = []
    rows: dict[tuple[str, int], list[list[int]]] = {}
    try:
        targets = {"idle": [], "first": vols.paths[:1], "each": vols.paths}[writers]
        for p in targets:
            w = subprocess.Popen(
                [sys.executable, "-c", WRITERS["fsync"], f"{p}/fsync.dat"],
                stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            procs.append(w)
            assert w.stdout is not None and w.stdout.readline().strip() == "ready"
        time.sleep(0.5)
        for _ in range(rounds):
            for mode, n in [("one", 1), *((m, 4) for m in MODES)]:
                args = [str(exe), "serial" if n == 1 else mode, str(reps), "1", *vols.paths[:n]]
                out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
                for line in out.splitlines():
                    rows.setdefault((mode, n), []).append([int(x) for x in line.split()])
    finally:
        for w in procs:
            w.terminate()
            w.communicate(timeout=60)
        vols.close()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fs", default="ext4,xfs,btrfs")
    ap.add_argument("--writers", default="idle,first", help="of idle, first, each")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--reps", type=int, default=10, help="freezes per mode per round")
    args = ap.parse_args()
    if os.geteuid() != 0 or not shutil.which("gcc"):
        print("run as root, with gcc", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="quiesce-floor-"))
    try:
        exe = build(tmp)
        print(f"kernel {os.uname().release}, {os.cpu_count()} CPUs")
        print(f"  {'fs':6} {'writer':6} {'mode':7} {'n':>2} {'freeze':>8} {'gap':>6} "
              f"{'thaw':>6} {'window':>8} {'p95':>8} {'x one':>6}  (us, medians)")  # fmt: skip
        for fs in args.fs.split(","):
            for writers in args.writers.split(","):
                load = os.getloadavg()[0]
                rows = run(exe, fs, writers, args.rounds, args.reps)
                one = statistics.median(r[3] for r in rows["one", 1])
                for (mode, n), rs in rows.items():
                    med = [statistics.median(c) for c in zip(*rs, strict=True)]
                    p95 = pct([r[3] for r in rs], 95)
                    print(f"  {fs:6} {writers:6} {mode:7} {n:>2} {med[0]:>8.0f} {med[1]:>6.0f} "
                          f"{med[2]:>6.0f} {med[3]:>8.0f} {p95:>8.0f} {med[3] / one:>6.2f}"
                          f"  load {max(load, os.getloadavg()[0]):.1f}")  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
