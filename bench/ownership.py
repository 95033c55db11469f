#!/usr/bin/env python3
"""The ownership probe's residual, measured: how often does quiesce notice that someone
else thawed its freeze, when that someone refreezes it G ms later?

A throwaway ext4 loop filesystem is frozen by quiesce (with its guardian); a third party
(this process, with its own fd) runs FITHAW, waits G ms, runs FIFREEZE. quiesce caught it
if its guardian calls the volume ``lost`` (or the third party's FIFREEZE met quiesce's
probe: EBUSY). Missed ones are the residual that docs/kernel.md §11 describes. Also timed:
`fsfreeze -f; -u; -f` from a shell. Both ways quiesce can tell are measured, interleaved:
probes alone (the portable fallback) and probes with the kernel trace of every call.
Run as root: ``python3 bench/ownership.py [--n 30]``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from quiesce.freezing import guardian
from quiesce.freezing.freezer import Freezer
from quiesce.freezing.plan import make_plan

FIFREEZE, FITHAW = 0xC0045877, 0xC0045878


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


def state_of(gpid: int, path: str) -> str:
    st = guardian.ask(gpid, {"op": "status"}, timeout=5.0)
    return next(v["state"] for v in st["volumes"] if v["mount_point"] == path)


def one(path: str, gap_s: float, trace: bool) -> bool:
    """True if quiesce noticed the outside thaw + refreeze."""
    with make_plan([path]) as plan:
        f = Freezer(plan, timeout=30, syncfs=False, trace=trace)
        f.freeze()
        gpid = f.window.guardian_pid
        assert gpid is not None
        fd = os.open(path, os.O_RDONLY)
        caught = False
        try:
            fcntl.ioctl(fd, FITHAW, 0)
            if gap_s:
                time.sleep(gap_s)
            try:
                fcntl.ioctl(fd, FIFREEZE, 0)
            except OSError as e:
                if e.errno != errno.EBUSY:
                    raise
                caught = True  # quiesce's probe held it at that instant
            time.sleep(0.1)  # ten probe intervals: whatever the guardian sees, it has seen
            caught = caught or state_of(gpid, path) == "lost"
        finally:
            with contextlib.suppress(OSError):
                fcntl.ioctl(fd, FITHAW, 0)  # the third party's freeze, if it is still there
            os.close(fd)
            with contextlib.suppress(Exception):
                f.thaw(raise_errors=False)
        return caught


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=30, help="tries per gap")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="quiesce-bench-own-") as d:
        img, mnt = Path(d) / "fs.img", Path(d) / "mnt"
        mnt.mkdir()
        with open(img, "wb") as fh:
            fh.truncate(128 << 20)
        sh("mkfs.ext4", "-q", "-F", str(img))
        dev = sh("losetup", "-f", "--show", str(img))
        try:
            sh("mount", dev, str(mnt))
            try:
                gaps = []
                for _ in range(args.n):
                    t0 = time.perf_counter()
                    sh("sh", "-c", f"fsfreeze -f {mnt} && fsfreeze -u {mnt} && fsfreeze -f {mnt}")
                    gaps.append(time.perf_counter() - t0)
                    sh("fsfreeze", "-u", str(mnt))
                print(
                    f"`fsfreeze -f; fsfreeze -u; fsfreeze -f` from sh: median "
                    f"{statistics.median(gaps) * 1e3:.1f} ms for all three (n={args.n})"
                )
                print("gap (ms) | probes alone: caught / tries | trace + probes: caught / tries")
                for gap_ms in (0, 2, 5, 10, 20, 50):
                    probe = trace = 0
                    for _ in range(args.n):  # interleaved: the same machine state for both
                        probe += one(str(mnt), gap_ms / 1e3, trace=False)
                        trace += one(str(mnt), gap_ms / 1e3, trace=True)
                    print(
                        f"{gap_ms:>8} | {probe:>3} / {args.n} ({probe / args.n:.2f})"
                        f"{'':>13} | {trace:>3} / {args.n} ({trace / args.n:.2f})"
                    )
            finally:
                with contextlib.suppress(Exception):
                    sh("fsfreeze", "-u", str(mnt))
                sh("umount", str(mnt))
        finally:
            sh("losetup", "-d", dev)


if __name__ == "__main__":
    main()
