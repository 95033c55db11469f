"""Benchmark the second line on a throwaway ext4 loop filesystem (run as root).

    python3 bench/second_line.py [--trials N]

A stand-in guardian (tests/helpers/fake_guardian.py: a real SecondLine, real FIFREEZE)
freezes the fs with a 0.2 s timeout; a writer child blocks in write(2). Once the deadline
has passed, either

(base) the stand-in thaws with its own FITHAW on command (what a live guardian does), or
(kill) the stand-in is SIGKILLed: its watchdog learns it from the pidfd, probes, thaws;

measured: the command (or SIGKILL) to the moment the blocked write returns. Trials are
interleaved; the ratio kill/base is the cost of the second line's path. Everything it
makes is removed at the end (bench/guardian.py's Bench).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from guardian import Bench, wait_until  # bench/guardian.py

from quiesce.freezing.guardian import RUN_DIR_ENV

FAKE = Path(__file__).resolve().parents[1] / "tests" / "helpers" / "fake_guardian.py"
TIMEOUT_S = 0.2
FAKES: list[subprocess.Popen[str]] = []


def one(b: Bench, kill: bool) -> float:
    g = subprocess.Popen(
        [sys.executable, str(FAKE), str(TIMEOUT_S), b.path],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    FAKES.append(g)
    assert g.stdin is not None and g.stdout is not None
    hello = json.loads(g.stdout.readline())
    g.stdin.write("freeze 0\n")
    g.stdin.flush()
    froze = json.loads(g.stdout.readline())
    assert froze["errno"] == 0, froze
    w = b.blocked_writer()
    time.sleep(max(0.0, froze["call_ns"] / 1e9 + TIMEOUT_S + 0.05 - time.monotonic()))
    if kill:
        t0 = time.monotonic()
        g.kill()
    else:
        t0 = time.monotonic()
        g.stdin.write("thaw 0\n")
        g.stdin.flush()
    took = b.write_returned(w) - t0
    if not kill:
        g.stdin.write("stop\n")
        g.stdin.flush()
        g.stdin.close()
    g.wait(timeout=30)
    wait_until(lambda: not os.path.exists(f"/proc/{hello['watchdog']}"), "the watchdog to leave")
    return took


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=10)
    args = ap.parse_args()
    run = Path(tempfile.mkdtemp(prefix="quiesce-bench-2nd-run-"))
    os.environ[RUN_DIR_ENV] = str(run)
    b = Bench()
    try:
        b.setup("ext4")
        base, killed = [], []
        for _ in range(args.trials):
            base.append(one(b, kill=False))
            killed.append(one(b, kill=True))
        mb, mk = statistics.median(base) * 1e3, statistics.median(killed) * 1e3
        print(f"base: own FITHAW -> write returns: median {mb:.1f} ms (max {max(base) * 1e3:.1f})")
        print(f"kill: SIGKILL past the deadline -> write returns: median {mk:.1f} ms "
              f"(max {max(killed) * 1e3:.1f})")  # fmt: skip
        print(f"ratio kill/base: {mk / mb:.1f}x over {args.trials} interleaved trials")
    finally:
        for g in FAKES:
            if g.poll() is None:
                g.kill()
                g.wait()
        b.fs_thaw()
        b.cleanup()
        shutil.rmtree(run, ignore_errors=True)


if __name__ == "__main__":
    main()
