#!/usr/bin/env python3
"""How long does a quiesce command take to start and finish, against the bare interpreter?

Whole-process wall times (fork, exec, imports, the command's own work, exit) of
``python3 -c pass`` (the baseline, measured in the same run) and of ``python3 -m quiesce``
with ``--help``, ``--version``, ``status`` and ``thaw`` of a path that is not mounted
(fails at once: the cost of getting there). Runs alternate between commands so that
drift hits all alike; the first round warms the page cache and is not counted.

Nothing is frozen: ``thaw`` is given a path that does not exist.

    python3 bench/startup.py [--runs 20] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

COMMANDS: dict[str, list[str]] = {
    "python3 -c pass": [sys.executable, "-c", "pass"],
    "quiesce --help": [sys.executable, "-m", "quiesce", "--help"],
    "quiesce --version": [sys.executable, "-m", "quiesce", "--version"],
    "quiesce status": [sys.executable, "-m", "quiesce", "status"],
    "quiesce thaw (no such path)": [sys.executable, "-m", "quiesce", "thaw", "/nonexistent/qb"],
}


def once(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False,
        env=os.environ | {"COLUMNS": "80"},  # the width of the pre-rendered help
    )  # fmt: skip
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for argv in COMMANDS.values():  # warm-up
        once(argv)
    for _ in range(args.runs):
        for name, argv in COMMANDS.items():
            times[name].append(once(argv))
    base = statistics.median(times["python3 -c pass"])
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        p90 = sorted(ts)[int(0.9 * (len(ts) - 1))]
        rows.append({"command": name, "median_ms": med * 1e3, "p90_ms": p90 * 1e3,
                     "ratio": med / base})  # fmt: skip
    if args.json:
        print(json.dumps({"runs": args.runs, "rows": rows}, indent=2))
        return 0
    print(f"{'command':32} {'median':>9} {'p90':>9} {'× bare python':>14}")
    for r in rows:
        print(f"{r['command']:32} {r['median_ms']:8.1f}ms {r['p90_ms']:8.1f}ms {r['ratio']:13.2f}×")
    print(f"({args.runs} runs each, interleaved; baseline measured in this run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
