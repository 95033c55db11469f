#!/usr/bin/env python3
"""How long do FIFREEZE, FITHAW and the freeze window take with lots of dirty data, and how
much does the pre-freeze syncfs() shrink the window?

For each filesystem (ext4, xfs, btrfs) on its own loop device, every run first writes
``--dirty-mb`` MiB through the page cache without fsync (a buffered writer), then at once
freezes and thaws the filesystem with ``quiesce.freeze(..., guardian=False)``, once with the
pre-freeze syncfs and once without (alternating, so drift hits both alike). A warm-up round
per filesystem (block allocation in the sparse image) is not counted.

Only the loop filesystems this script makes are frozen; all of them are thawed, unmounted,
detached and deleted in ``finally``, also on Ctrl-C.

    sudo python3 bench/freeze_times.py [--runs 5] [--dirty-mb 200] [--fstypes ext4,xfs,btrfs]
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import quiesce

MKFS = {
    "ext4": ["mkfs.ext4", "-q", "-F"],
    "xfs": ["mkfs.xfs", "-q", "-f"],
    "btrfs": ["mkfs.btrfs", "-q", "-f"],
}
FITHAW = 0xC0045878
CHUNK = os.urandom(1 << 20)  # incompressible


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, text=True, capture_output=True).stdout


@dataclass
class LoopFs:
    fstype: str
    image: Path
    mnt: Path
    device: str | None = None
    mounted: bool = False


@dataclass
class Samples:
    syncfs: list[float] = field(default_factory=list)
    freeze: list[float] = field(default_factory=list)
    thaw: list[float] = field(default_factory=list)
    window: list[float] = field(default_factory=list)
    dirty_mb: list[float] = field(default_factory=list)


def make_fs(base: Path, fstype: str, size_mb: int, direct_io: bool, made: list[LoopFs]) -> LoopFs:
    fs = LoopFs(fstype, base / f"{fstype}.img", base / f"mnt-{fstype}")
    made.append(fs)  # registered first: cleanup handles any partial state
    with open(fs.image, "wb") as f:
        f.truncate(size_mb << 20)
    sh(*MKFS[fstype], str(fs.image))
    dio = "--direct-io=on" if direct_io else "--direct-io=off"
    fs.device = sh("losetup", "-f", "--show", dio, str(fs.image)).strip()
    fs.mnt.mkdir()
    sh("mount", fs.device, str(fs.mnt))
    fs.mounted = True
    return fs


def cleanup(made: list[LoopFs]) -> None:
    """Thaw (EINVAL = was not frozen), unmount, detach: only what this script made."""
    for fs in made:
        if fs.mounted:
            with contextlib.suppress(OSError):
                fd = os.open(fs.mnt, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    fcntl.ioctl(fd, FITHAW, 0)
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        print(f"warning: thaw {fs.mnt}: {e}", file=sys.stderr)
                finally:
                    os.close(fd)
            subprocess.run(["umount", str(fs.mnt)], check=False, capture_output=True)
        if fs.device:
            subprocess.run(["losetup", "-d", fs.device], check=False, capture_output=True)


def dirty_meminfo_mb() -> float:
    """System-wide Dirty from /proc/meminfo (includes other processes' dirty pages)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Dirty:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def write_dirty(path: Path, mb: int) -> None:
    """Overwrite ``mb`` MiB in place through the page cache, no fsync: all of it dirty."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for i in range(mb):
            os.pwrite(fd, CHUNK, i << 20)
    finally:
        os.close(fd)


def one_run(fs: LoopFs, mb: int, syncfs: bool, out: Samples | None) -> None:
    write_dirty(fs.mnt / "data.bin", mb)
    dirty = dirty_meminfo_mb()
    with quiesce.freeze(str(fs.mnt), timeout=120, syncfs=syncfs, guardian=False) as window:
        pass  # an empty window: the cost is the freeze and the thaw themselves
    (vol,) = window.volumes
    assert vol.state == "thawed" and vol.freeze_s is not None and vol.thaw_s is not None
    if out is None:
        return
    out.dirty_mb.append(dirty)
    out.syncfs.append(vol.syncfs_s or 0.0)
    out.freeze.append(vol.freeze_s)
    out.thaw.append(vol.thaw_s)
    out.window.append(window.duration or 0.0)


def fmt(xs: list[float]) -> str:
    """median [min-max] in ms."""
    ms = [x * 1000 for x in xs]
    med = statistics.median(ms)
    prec = 2 if med < 10 else 0
    return f"{med:.{prec}f} [{min(ms):.{prec}f}-{max(ms):.{prec}f}]"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="measured runs per mode (>= 5)")
    ap.add_argument("--dirty-mb", type=int, default=200)
    ap.add_argument("--fstypes", default="ext4,xfs,btrfs")
    ap.add_argument("--direct-io", choices=["on", "off"], default="on", help="loop device mode")
    ap.add_argument("--json", action="store_true", help="also print raw samples as JSON")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("run as root (loop devices, mount, FIFREEZE)", file=sys.stderr)
        return 2
    fstypes = [t for t in args.fstypes.split(",") if t]
    size_mb = max(1024, args.dirty_mb * 4)
    base = Path(tempfile.mkdtemp(prefix="quiesce-bench-"))
    made: list[LoopFs] = []
    results: dict[str, dict[str, Samples]] = {}
    try:
        for fstype in fstypes:
            fs = make_fs(base, fstype, size_mb, args.direct_io == "on", made)
            one_run(fs, args.dirty_mb, True, None)  # warm-up: allocate blocks in the image
            one_run(fs, args.dirty_mb, False, None)
            res = results[fstype] = {"syncfs": Samples(), "no-syncfs": Samples()}
            for _ in range(args.runs):
                one_run(fs, args.dirty_mb, True, res["syncfs"])
                one_run(fs, args.dirty_mb, False, res["no-syncfs"])
            print(f"  {fstype}: done", file=sys.stderr, flush=True)
    finally:
        cleanup(made)
        shutil.rmtree(base, ignore_errors=True)

    print(
        f"kernel {platform.release()}, {os.cpu_count()} CPUs, loop direct-io={args.direct_io}, "
        f"{args.dirty_mb} MiB dirty before each freeze, {args.runs} runs per row; "
        "times in ms: median [min-max]; window = first FIFREEZE to last FITHAW"
    )
    head = f"{'fs':6} {'mode':9} {'syncfs':>22} {'FIFREEZE':>22} {'FITHAW':>16} {'window':>22}"
    print(head)
    print("-" * len(head))
    for fstype, modes in results.items():
        for mode, s in modes.items():
            sync = fmt(s.syncfs) if mode == "syncfs" else "-"
            print(
                f"{fstype:6} {mode:9} {sync:>22} {fmt(s.freeze):>22} {fmt(s.thaw):>16} "
                f"{fmt(s.window):>22}"
            )
    ratios = []
    for fstype, modes in results.items():
        with_, without = (statistics.median(modes[m].window) for m in ("syncfs", "no-syncfs"))
        ratios.append(f"{fstype} {with_ / without:.3f}")
    print("window(with syncfs)/window(without), medians: " + ", ".join(ratios))
    dirty = [d for modes in results.values() for s in modes.values() for d in s.dirty_mb]
    if dirty:
        print(
            f"system Dirty before the freeze (meminfo): median {statistics.median(dirty):.0f} MiB"
        )
    if args.json:
        raw = {f: {m: vars(s) for m, s in modes.items()} for f, modes in results.items()}
        print(json.dumps(raw))
    return 0


if __name__ == "__main__":
    sys.exit(main())
