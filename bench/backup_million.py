#!/usr/bin/env python3
"""Many small files, 1 % changed: quiesce's backup of a reflink snapshot vs restic alone.

Not a test: run as root, ``python3 bench/backup_million.py [--files 100000] [--rounds 2]``
(``--files 1000000`` for the full figure: the tree alone takes minutes to write). It
builds an ext4 image on an XFS (reflink=1) loop filesystem, writes FILES small files
(0-4 KiB, 1,000 per directory), backs the tree up once with each method (unmeasured
first full backups, two repositories), then per round rewrites 1 % of the files and runs
pairs, interleaved (the order alternates):

- ``A``: ``restic backup`` alone on the live tree;
- ``B``: quiesce: ``snapshots.create(..., "reflink")`` then ``run_backup`` (mount the
  snapshot read-only, restic, unmount), without verification.

once with *warm* caches (the live tree's metadata cached: A runs right after a walk of the
tree) and once *cold* (the live volume remounted first: its loop device does direct I/O,
so its metadata comes off the disk). B's snapshot is a new block device: its metadata is
read cold in both. Printed per pair: wall seconds, restic's own seconds, the files
restic re-read (changed + new), bytes read from the host's disk (the XFS loop device's
read sectors); for B every step with its tools' seconds (``losetup``, ``blkid``,
``mount``, ``umount``...), and the ratios the issue states its targets in: B's backup
phase / A, B's whole run / A, snapshot + mount + unmount in seconds.
Everything it makes is removed at the end, also on failure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from quiesce import snapshot as snapshots
from quiesce.backup.config import BackupConfig
from quiesce.backup.phase import run_backup
from quiesce.host import proc

PASSWORD = "bench"
TOOLS: dict[str, float] = defaultdict(float)  # seconds per admin tool, since the last reset


def _timed_tools() -> None:
    """Time every admin tool quiesce runs (mount, umount, losetup, blkid)."""
    real = proc.run_tool

    def run_tool(*cmd: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        t0 = time.monotonic()
        try:
            return real(*cmd, **kw)
        finally:
            TOOLS[Path(cmd[0]).name] += time.monotonic() - t0

    proc.run_tool = run_tool  # type: ignore[assignment]


def sh(*cmd: str, env: dict[str, str] | None = None) -> str:
    return subprocess.run(
        cmd, check=True, text=True, capture_output=True, env=env and os.environ | env
    ).stdout


def read_bytes(device: str) -> int:
    fields = Path(f"/sys/block/{Path(device).name}/stat").read_text().split()
    return int(fields[2]) * 512


def loop(image: Path, size: int, mkfs: list[str], mnt: Path, direct: bool) -> str:
    with open(image, "wb") as f:
        f.truncate(size)
    sh(*mkfs, str(image))
    dev = sh("losetup", "-f", "--show", *(["--direct-io=on"] if direct else []), str(image))
    mnt.mkdir()
    sh("mount", dev.strip(), str(mnt))
    return dev.strip()


def generate(root: Path, n: int) -> list[Path]:
    rng = random.Random(7)
    files = []
    for i in range(n):
        d = root / f"d{i // 1000:04d}"
        if i % 1000 == 0:
            d.mkdir(parents=True)
        p = d / f"f{i:07d}"
        p.write_bytes(os.urandom(rng.randint(0, 4096)))
        files.append(p)
    return files


def change(files: list[Path], fraction: float, seed: int) -> int:
    picked = random.Random(seed).sample(files, max(1, int(len(files) * fraction)))
    for p in picked:
        p.write_bytes(os.urandom(random.randint(1, 4096)))
    return len(picked)


def walk(root: Path) -> None:
    for _dirpath, _dirs, names in os.walk(root):
        for name in names:
            os.lstat(os.path.join(_dirpath, name))


def restic_alone(repo: Path, cache: Path, tree: Path, host_dev: str) -> dict[str, Any]:
    env = {"RESTIC_REPOSITORY": str(repo), "RESTIC_PASSWORD": PASSWORD}
    env["RESTIC_CACHE_DIR"] = str(cache)
    before = read_bytes(host_dev)
    t0 = time.monotonic()
    out = sh("restic", "backup", "--json", "--host", "bench", str(tree), env=env)
    wall = time.monotonic() - t0
    s = next(json.loads(ln) for ln in reversed(out.splitlines()) if '"summary"' in ln)
    return {
        "wall_s": wall,
        "restic_s": wall,
        "reread": s["files_new"] + s["files_changed"],
        "read_bytes": read_bytes(host_dev) - before,
    }


def quiesce_run(mnt: Path, state: Path, cfg: BackupConfig, host_dev: str) -> dict[str, Any]:
    TOOLS.clear()
    before = read_bytes(host_dev)
    t0 = time.monotonic()
    man = snapshots.create([str(mnt)], "reflink", job="bench", state_dir=state)
    snap_s = time.monotonic() - t0
    snap_tools = dict(TOOLS)
    TOOLS.clear()
    rep = run_backup(man, cfg, job="bench", state=state, force=True)  # as `quiesce run` does
    wall = time.monotonic() - t0
    if not rep.ok or rep.result is None:
        raise SystemExit(f"quiesce backup failed: {rep.error}")
    phases = {p["name"]: p["duration_s"] for p in rep.phases}
    r = rep.result
    out = {
        "wall_s": wall,
        "snapshot_s": snap_s,
        "restic_s": r.duration_s,
        "mount_s": phases.get("mount", 0.0),
        "umount_s": phases.get("umount", 0.0),
        "phases": phases,
        "tools": {k: round(v, 3) for k, v in TOOLS.items()},
        "snapshot_tools": snap_tools,
        "reread": (r.files_new or 0) + (r.files_changed or 0),
        "read_bytes": read_bytes(host_dev) - before,
    }
    snapshots.delete(man.id, state)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--change", type=float, default=0.01)
    ap.add_argument("--workdir", default="/var/tmp")
    args = ap.parse_args()
    _timed_tools()
    base = Path(tempfile.mkdtemp(prefix="quiesce-bench-million-", dir=args.workdir))
    devs: list[tuple[str, Path]] = []
    try:
        inner_size = max(1 << 30, args.files * 12 << 10)
        host_dev = loop(
            base / "host.img", 3 * inner_size, ["mkfs.xfs", "-q", "-m", "reflink=1"],
            base / "host", direct=False,
        )  # fmt: skip
        devs.append((host_dev, base / "host"))
        mnt = base / "host" / "live"
        dev = loop(
            base / "host" / "live.img",
            inner_size,
            ["mkfs.ext4", "-q", "-F", "-N", str(args.files + args.files // 10 + 10_000)],
            mnt,
            direct=True,
        )
        devs.insert(0, (dev, mnt))
        t0 = time.monotonic()
        files = generate(mnt / "tree", args.files)
        os.sync()
        print(f"tree: {len(files):,} files written in {time.monotonic() - t0:.0f} s")
        repos = base / "repo-a", base / "repo-b"
        for r in repos:
            sh(
                "restic",
                "init",
                "-q",
                env={"RESTIC_REPOSITORY": str(r), "RESTIC_PASSWORD": PASSWORD},
            )
        os.environ["BENCH_PW"] = PASSWORD
        cfg = BackupConfig(
            target="restic", repository=str(repos[1]), password_env="BENCH_PW", host="bench",
            verify="none", prune=False, mount_root=str(base / "stable"),
        )  # fmt: skip
        state = base / "state"
        first_a = restic_alone(repos[0], base / "cache-a", mnt / "tree", host_dev)
        first_b = quiesce_run(mnt, state, cfg, host_dev)
        print(f"first full backups: A {first_a['wall_s']:.1f} s, B {first_b['wall_s']:.1f} s")
        rows: list[dict[str, Any]] = []
        for i in range(args.rounds):
            for cache in ("warm", "cold"):
                n = change(files, args.change, seed=100 + 2 * i + (cache == "cold"))
                os.sync()
                pair: dict[str, Any] = {"round": i + 1, "cache": cache, "changed": n}
                for who in ("A", "B") if i % 2 == 0 else ("B", "A"):
                    os.sync()
                    if who == "A":
                        if cache == "cold":
                            sh("umount", str(mnt))
                            sh("mount", dev, str(mnt))
                        else:
                            walk(mnt / "tree")
                        pair["A"] = restic_alone(repos[0], base / "cache-a", mnt / "tree", host_dev)
                    else:
                        pair["B"] = quiesce_run(mnt, state, cfg, host_dev)
                rows.append(pair)
                a, b = pair["A"], pair["B"]
                print(
                    f"round {i + 1} {cache}: A {a['wall_s']:.2f} s (reread {a['reread']}, "
                    f"{a['read_bytes'] >> 20} MiB); B {b['wall_s']:.2f} s = snapshot "
                    f"{b['snapshot_s']:.2f} + mount {b['mount_s']:.2f} + restic "
                    f"{b['restic_s']:.2f} + umount {b['umount_s']:.2f} (reread {b['reread']}, "
                    f"{b['read_bytes'] >> 20} MiB); tools {b['tools']}; phases {b['phases']}"
                )
        print(f"\n{args.files:,} files, {args.change:.0%} changed, medians over {args.rounds}:")
        for cache in ("warm", "cold"):
            ps = [p for p in rows if p["cache"] == cache]

            def med(who: str, key: str, ps: list[dict[str, Any]] = ps) -> float:
                return statistics.median(p[who][key] for p in ps)

            fixed = statistics.median(
                p["B"]["snapshot_s"] + p["B"]["mount_s"] + p["B"]["umount_s"] for p in ps
            )
            a_wall = med("A", "wall_s")
            print(
                f"{cache}: backup phase B/A {med('B', 'restic_s') / a_wall:.2f}x (target <= 1.1 "
                f"warm); whole run B/A {med('B', 'wall_s') / a_wall:.2f}x "
                f"(target <= 1.2); snapshot+mount+umount {fixed:.2f} s (target <= 1 s); "
                f"files re-read A {med('A', 'reread'):.0f} / B {med('B', 'reread'):.0f} "
                f"(changed {ps[0]['changed']}); read from disk A "
                f"{med('A', 'read_bytes') / 2**20:.0f} / B {med('B', 'read_bytes') / 2**20:.0f} MiB"
            )  # fmt: skip
        return 0
    finally:
        with contextlib.suppress(Exception):
            from quiesce.snapshot.cleanup import cleanup

            cleanup(base / "state")
        for dev, m in devs:
            subprocess.run(["umount", str(m)], capture_output=True)
            subprocess.run(["losetup", "-d", dev], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
