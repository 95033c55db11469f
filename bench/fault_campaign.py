"""The fault campaign's long form (issue 18): every fault family mixed, for as long as
asked, on three throwaway ext4 loop filesystems under load (run as root).

    python3 bench/fault_campaign.py [--minutes 30] [--seed N] [--families a,b,...]

Prints each violation as it happens and, at the end, the steps per family and the
violations per family and invariant, against the same run's step counts (the baseline:
violations per 100 steps). The families and invariants are tests/helpers/campaign.py's;
tests/test_fault_campaign.py is the bounded form. Everything it makes (images, loop
devices, mounts, processes) is removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from helpers.campaign import Campaign  # noqa: E402


def _fs(base: Path, i: int) -> tuple[str, str]:
    image = base / f"fs{i}.img"
    with open(image, "wb") as f:
        f.truncate(96 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    dev = subprocess.run(
        ["losetup", "-f", "--show", "--direct-io=on", str(image)],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    mnt = base / f"mnt{i}"
    mnt.mkdir()
    subprocess.run(["mount", dev, str(mnt)], check=True)
    return str(mnt), dev


def _interrupt(_sig: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    # SIGTERM and SIGINT (ignored in a background job) end it through its cleanup
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--families", default=",".join(Campaign.FAULTS))
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    kinds = tuple(args.families.split(","))
    base = Path(tempfile.mkdtemp(prefix="quiesce-campaign-"))
    made: list[tuple[str, str]] = []
    t0 = time.monotonic()
    c: Campaign | None = None
    try:
        made = [_fs(base, i) for i in range(3)]
        c = Campaign([m for m, _ in made], base, random.Random(seed), log=print)
        print(f"seed {seed}; families {', '.join(kinds)}; {args.minutes:g} min", flush=True)
        c.isolate()  # its own run directory and stand-in knob: other users flip the real one
        c.start_load()
        end = t0 + args.minutes * 60
        while time.monotonic() < end:
            c.step(c.rng.choice(kinds))
            if c.n % 20 == 0:
                print(f"[{(time.monotonic() - t0) / 60:.1f} min] {c.summary()}", flush=True)
        c.stop_load()
        c.check_writes()
    finally:
        for mnt, _dev in made:
            subprocess.run(["fsfreeze", "-u", mnt], capture_output=True)
        if c is not None:
            with contextlib.suppress(Exception):
                c.stop_load()
        for mnt, dev in made:
            subprocess.run(["umount", "-l", mnt], capture_output=True)
            subprocess.run(["losetup", "-d", dev], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)
    assert c is not None
    minutes = (time.monotonic() - t0) / 60
    print(f"done after {minutes:.1f} min: {c.summary()}")
    per = Counter(v.kind for v in c.violations)
    for kind, n in sorted(c.steps.items()):
        print(f"  {kind:16s} steps {n:5d}  violations {per[kind]:4d}  "
              f"({100 * per[kind] / n:.1f} per 100 steps)")  # fmt: skip
    return 1 if c.violations else 0


if __name__ == "__main__":
    sys.exit(main())
