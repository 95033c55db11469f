"""`quiesce demo`: freeze a throwaway loop filesystem under a live writer and show it.

Everything it makes (image, loop device, mount, writer) is removed again, also on
failure or Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from quiesce.errors import QuiesceError, UsageError
from quiesce.freezing.freezer import freeze
from quiesce.host import proc

MKFS = {
    "ext4": (["mkfs.ext4", "-q", "-F"], 64, "e2fsprogs"),
    "xfs": (["mkfs.xfs", "-q", "-f"], 320, "xfsprogs"),
    "btrfs": (["mkfs.btrfs", "-q", "-f"], 128, "btrfs-progs"),
}

WRITER = r"""
import os, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
seq, stall, t_end = 0, 0.0, time.monotonic() + float(sys.argv[2])
while time.monotonic() < t_end:
    t0 = time.monotonic()
    os.write(fd, b"%d\n" % (seq + 1)); os.fsync(fd); seq += 1
    stall = max(stall, time.monotonic() - t0)
    time.sleep(0.002)
print(seq, stall)
"""


def run_demo(
    fstype: str, console: Console | None, as_json: bool, directory: Path | None = None
) -> dict[str, Any]:
    if fstype not in MKFS:
        raise UsageError(f"unknown filesystem {fstype!r}", "choose ext4, xfs or btrfs")
    mkfs, size_mb, package = MKFS[fstype]
    if shutil.which(mkfs[0]) is None:
        raise UsageError(f"{mkfs[0]} is not installed", f"apt-get install {package}")
    say = console.print if console else (lambda *_a, **_k: None)
    base = Path(tempfile.mkdtemp(prefix="quiesce-demo-", dir=directory))  # else $TMPDIR
    image, mnt = base / f"{fstype}.img", base / "mnt"
    device = None
    mounted = False
    writer = None
    try:
        with open(image, "wb") as f:
            f.truncate(size_mb * 1024 * 1024)
        proc.check_tool(*mkfs, str(image))
        device = proc.check_tool("losetup", "-f", "--show", str(image)).strip()
        mnt.mkdir()
        proc.check_tool("mount", device, str(mnt))
        mounted = True
        say(f"made a {size_mb} MB {fstype} filesystem on {device}, mounted at {mnt}")
        log = mnt / "records.log"
        writer = proc.spawn([sys.executable, "-c", WRITER, str(log), "1.5"], stderr=None)
        time.sleep(0.4)
        say("a writer appends fsync'd, numbered records; freezing for 0.5 s ...")
        t0 = time.monotonic()
        with freeze(str(mnt), timeout=10) as window:
            before = len(log.read_bytes().splitlines())  # reads never block on a frozen fs
            time.sleep(0.5)  # stand-in for the storage snapshot
            during = len(log.read_bytes().splitlines())
        thawed_after = time.monotonic() - t0
        stdout, _ = writer.communicate(timeout=30)
        acked, stall = stdout.decode().split()
        records = [int(x) for x in log.read_text().split()]
        intact = records == list(range(1, len(records) + 1)) and len(records) >= int(acked)
        result = {
            "filesystem": fstype,
            "window": window.to_dict(),
            "records_when_frozen": before,
            "records_after_0.5s_frozen": during,
            "records_total": len(records),
            "records_acknowledged": int(acked),
            "writer_longest_stall_s": float(stall),
            "no_record_lost": intact,
            "thawed_after_s": thawed_after,
        }
        if as_json:
            sys.stdout.write(json.dumps(result, indent=2) + "\n")
        else:
            v = window.volumes[0]
            say(
                f"frozen in {(v.freeze_s or 0) * 1000:.2f} ms (syncfs before it: "
                f"{(v.syncfs_s or 0) * 1000:.2f} ms), thawed in {(v.thaw_s or 0) * 1000:.3f} ms"
            )
            took = (window.duration or 0) * 1000
            say(f"freeze window: {took:.1f} ms (thawed by {window.thawed_by})")
            say(
                f"records on disk while frozen: {before} -> {during} (no write got through); "
                f"writer's longest stall: {float(stall) * 1000:.0f} ms"
            )
            say(
                f"after the thaw the writer went on: {len(records)} records, "
                + ("none lost, none out of order" if intact else "RECORDS LOST")
            )
        if not intact or during != before:
            raise QuiesceError("demo check failed: the freeze did not hold writes or lost data")
        return result
    finally:
        if writer is not None and writer.poll() is None:
            proc.kill_group(writer)
        if mounted:
            proc.try_tool("umount", str(mnt))
        if device:
            proc.try_tool("losetup", "-d", device)
        with contextlib.suppress(OSError):
            shutil.rmtree(base)
        say("cleaned up: unmounted, loop device detached, image removed")
