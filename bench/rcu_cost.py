#!/usr/bin/env python3
"""What expedited RCU grace periods cost the rest of the machine while quiesce freezes.

Not a test: run as root, ``python3 bench/rcu_cost.py [--seconds 10] [--fs ext4]``.
Expedited grace periods send IPIs to every CPU instead of waiting for them to pass
through a quiescent state. A latency-sensitive process on the other core (pinned, a
1 ms ``clock_nanosleep(TIMER_ABSTIME)`` loop) measures how late each wake-up is, while
this process (pinned to CPU 0) freezes and thaws a loop filesystem over and over with
quiesce, in blocks: no freezes, freezes with ``expedite=False``, freezes with
``expedite=True``, repeated. It prints the sleeper's worst and p99.9 lateness per mode,
and the freezes' median window. Everything it makes is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from window import Volumes, pct

import quiesce

SLEEPER = r"""
import ctypes, json, os, signal, sys, time
os.sched_setaffinity(0, {int(sys.argv[1])})
libc = ctypes.CDLL(None, use_errno=True)
class timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]
CLOCK_MONOTONIC, TIMER_ABSTIME = 1, 1
stop = False
signal.signal(signal.SIGTERM, lambda *_: globals().__setitem__("stop", True))
late = []  # (wake time, lateness s)
target = time.monotonic_ns()
print("ready", flush=True)
while not stop:
    target += 1_000_000
    ts = timespec(target // 1_000_000_000, target % 1_000_000_000)
    libc.clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, ctypes.byref(ts), None)
    now = time.monotonic_ns()
    late.append((now / 1e9, (now - target) / 1e9))
    if now - target > 50_000_000:
        target = now  # do not let one long stall turn into a burst of catch-up wake-ups
print(json.dumps(late), flush=True)
"""

LABELS = {"idle": "no freezes", "normal": "freezes, normal RCU", "expedited": "freezes, expedited"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="per mode and round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--fs", default="ext4")
    ap.add_argument("--gap", type=float, default=0.02, help="seconds between freezes")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("run as root", file=sys.stderr)
        return 2
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        print("needs two CPUs", file=sys.stderr)
        return 2
    with open("/sys/kernel/rcu_expedited") as f:
        before = f.read().strip()
    print(f"kernel {os.uname().release}, {os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")  # fmt: skip
    os.sched_setaffinity(0, {cpus[0]})
    vols = Volumes(args.fs, 1)
    sleeper = subprocess.Popen(
        [sys.executable, "-c", SLEEPER, str(cpus[1])], stdout=subprocess.PIPE, text=True
    )
    blocks: list[tuple[str, float, float]] = []
    windows: dict[str, list[float]] = {"normal": [], "expedited": []}
    try:
        assert sleeper.stdout is not None and sleeper.stdout.readline().strip() == "ready"
        for _ in range(args.rounds):
            for mode in ("idle", "normal", "expedited"):
                t0 = time.monotonic()
                while time.monotonic() - t0 < args.seconds:
                    if mode == "idle":
                        time.sleep(args.gap)
                        continue
                    with quiesce.freeze(vols.paths, timeout=30, expedite=mode == "expedited") as w:
                        pass
                    windows[mode].append(w.duration or 0.0)
                    time.sleep(args.gap)
                blocks.append((mode, t0, time.monotonic()))
    finally:
        sleeper.terminate()
        out, _ = sleeper.communicate(timeout=60)
        vols.close()
    late = json.loads(out.strip().splitlines()[-1])
    with open("/sys/kernel/rcu_expedited") as f:
        after = f.read().strip()
    print(f"{args.fs} loop fs; sleeper pinned to CPU {cpus[1]} (1 ms clock_nanosleep, "
          f"TIMER_ABSTIME), freezer on CPU {cpus[0]}; {args.rounds} x {args.seconds:g} s "
          f"per mode, {args.gap * 1000:g} ms between freezes")  # fmt: skip
    print(f"  {'mode':22} {'wake-ups':>9} {'p99':>10} {'p99.9':>10} {'worst':>10} "
          f"{'freezes':>8} {'window median':>14}")  # fmt: skip
    for mode in ("idle", "normal", "expedited"):
        ls = [d for t, d in late if any(m == mode and a <= t <= b for m, a, b in blocks)]
        ws = windows.get(mode, [])
        wmed = f"{statistics.median(ws) * 1000:11.2f} ms" if ws else f"{'-':>14}"
        label = LABELS[mode]
        lat = f"{pct(ls, 99) * 1e3:7.3f} ms {pct(ls, 99.9) * 1e3:7.3f} ms {max(ls) * 1e3:7.3f} ms"
        print(f"  {label:22} {len(ls):>9} {lat} {len(ws):>8} {wmed}")
    print(f"rcu_expedited before {before}, after {after}; load average at the end "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")  # fmt: skip
    return 0 if before == after else 1


if __name__ == "__main__":
    sys.exit(main())
