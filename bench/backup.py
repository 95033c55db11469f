#!/usr/bin/env python3
"""Does backing up *from the snapshot* cost throughput, and do incremental runs reread?

One run, on a generated tree (default 2 GiB in ~9,600 files of mixed sizes) on a loop
ext4 whose image lives on a loop XFS (reflink=1):

  A. ``restic backup DIR`` alone, on the live volume (its own repository);
  B. quiesce's backup phase with the restic target (``backup.phase.run_backup``: mount
     the reflink snapshot read-only at the stable path, restic backup, unmount), after
     the snapshot exists (``snapshots.create``, not timed);

first on the full tree, then incrementally after rewriting 1% of the files (a new
snapshot for B). Page caches are cold for both: the live volume is remounted before
each A run (its loop device uses direct I/O), and B reads a fresh clone each time.
Throughput = bytes restic processed / wall time (B: the whole phase, mount to unmount).
"Read from the volume" is the read traffic on the host XFS's loop device during the
run: what really came off the storage. Targets: B >= 0.9x A on both runs, and the
incremental run reads only about the changed files.

Guest memory is made steady first. On a VM whose balloon reports free pages to the host
(virtio-balloon free page reporting, ``/sys/module/page_reporting``), every page the
guest frees is handed back and its next first touch costs a host page fault, billed as
guest *system* time. Which of two runs gets the returned pages and which gets pages
still backed depends on what the run before it freed (A drops the live volume's cache
by remounting; B does not), not on the backup path: measured on this VM, B's system CPU
was 7-10.5 s vs A's 4.6-7.6 s (B/A 0.65-0.93), and with reporting paused and memory
pre-touched both take 9.9-10.5 s wall with 3.9-4.5 s system time, B/A 1.00. So the
bench pauses reporting (page_reporting_order above the largest buddy order), touches the
free memory once, and restores the setting at the end; ``--keep-page-reporting``
measures with it on.

Everything it makes (loop filesystems, repositories, state) is removed in ``finally``.

    sudo python3 bench/backup.py [--size-gib 2] [--workdir /var/tmp] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quiesce import snapshot as snapshots
from quiesce.backup.config import BackupConfig
from quiesce.backup.phase import run_backup

MiB = 1 << 20
PASSWORD = "bench"


def sh(*cmd: str, env: dict[str, str] | None = None) -> str:
    return subprocess.run(
        cmd, check=True, text=True, capture_output=True, env=env and os.environ | env
    ).stdout


def read_bytes(device: str) -> int:
    """Bytes read through a block device so far (/sys/block/X/stat: sectors read)."""
    fields = Path(f"/sys/block/{Path(device).name}/stat").read_text().split()
    return int(fields[2]) * 512


@dataclass
class Loop:
    image: Path
    device: str
    mnt: Path


def make_loop(image: Path, size: int, mkfs: list[str], mnt: Path, direct_io: bool) -> Loop:
    with open(image, "wb") as f:
        f.truncate(size)
    sh(*mkfs, str(image))
    args = ["losetup", "-f", "--show"] + (["--direct-io=on"] if direct_io else []) + [str(image)]
    dev = sh(*args).strip()
    mnt.mkdir()
    sh("mount", dev, str(mnt))
    return Loop(image, dev, mnt)


def generate(root: Path, total: int, seed: int = 7) -> list[Path]:
    """~8,000 small (0-16 KiB), ~1,500 medium (16 KiB-1 MiB), the rest large (1-32 MiB)."""
    rng = random.Random(seed)
    files, written, n = [], 0, 0
    small, medium = 8000 * total // (2 << 30), 1500 * total // (2 << 30)

    def size_of(i: int) -> int:
        if i < small:
            return rng.randint(0, 16 << 10)
        if i < small + medium:
            return rng.randint(16 << 10, 1 << 20)
        return rng.randint(1 << 20, 32 << 20)

    while written < total:
        size = min(size_of(n), total - written)
        d = root / f"d{n % 40:02d}" / f"s{n % 7}"
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"f{n:05d}.bin"
        with open(p, "wb") as f:
            left = size
            while left:
                chunk = os.urandom(min(left, 4 * MiB))  # incompressible, no dedup
                f.write(chunk)
                left -= len(chunk)
        files.append(p)
        written += size
        n += 1
    return files


def change(files: list[Path], fraction: float, seed: int = 11) -> list[Path]:
    rng = random.Random(seed)
    picked = rng.sample(files, max(1, int(len(files) * fraction)))
    for p in picked:
        size = p.stat().st_size
        with open(p, "r+b") as f:
            f.write(os.urandom(min(size, 4096)) if size else b"")
    return picked


def _cpu() -> tuple[float, float]:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime, ru.ru_stime


def _cpu_since(before: tuple[float, float]) -> dict[str, float]:
    now = _cpu()
    return {"user_s": now[0] - before[0], "sys_s": now[1] - before[1]}


def restic_alone(repo: Path, cache: Path, source: Path, outer_dev: str) -> dict[str, Any]:
    env = {
        "RESTIC_REPOSITORY": str(repo),
        "RESTIC_PASSWORD": PASSWORD,
        "RESTIC_CACHE_DIR": str(cache),
    }
    before, cpu = read_bytes(outer_dev), _cpu()
    t0 = time.monotonic()
    p = subprocess.run(
        ["restic", "backup", "--json", "--host", "bench", str(source)],
        env=os.environ | env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    wall = time.monotonic() - t0
    summary = next(json.loads(ln) for ln in reversed(p.stdout.splitlines()) if '"summary"' in ln)
    return {
        "wall_s": wall,
        **_cpu_since(cpu),
        "bytes": summary["total_bytes_processed"],
        "files": summary["total_files_processed"],
        "files_new": summary["files_new"],
        "files_changed": summary["files_changed"],
        "files_unmodified": summary["files_unmodified"],
        "data_added": summary["data_added"],
        "read_from_volume": read_bytes(outer_dev) - before,
    }


def quiesce_phase(origin: Loop, state: Path, cfg: BackupConfig, outer_dev: str) -> dict[str, Any]:
    man = snapshots.create([str(origin.mnt)], "reflink", job="bench", state_dir=state)
    os.sync()
    before, cpu = read_bytes(outer_dev), _cpu()
    t0 = time.monotonic()
    rep = run_backup(man, cfg, job="bench", state=state)
    wall = time.monotonic() - t0
    if not rep.ok or rep.result is None:
        raise SystemExit(f"quiesce backup failed: {rep.error}")
    r = rep.result
    phases = {p["name"]: p["duration_s"] for p in rep.phases}
    out = {
        "wall_s": wall,
        **_cpu_since(cpu),
        "restic_s": r.duration_s,
        "mount_s": phases.get("mount"),
        "umount_s": phases.get("umount"),
        "bytes": r.bytes,
        "files": r.files,
        "files_new": r.files_new,
        "files_changed": r.files_changed,
        "files_unmodified": r.files_unmodified,
        "data_added": r.bytes_added,
        "read_from_volume": read_bytes(outer_dev) - before,
        "stable_path": rep.mounts[0]["path"],
        "freeze_window_s": man.window_s,
    }
    snapshots.delete(man.id, state)  # keep the host XFS small; the next run clones anew
    return out


def remount(origin: Loop) -> None:
    """Drop the live volume's page cache (the loop device does direct I/O)."""
    sh("umount", str(origin.mnt))
    sh("mount", origin.device, str(origin.mnt))


PAGE_REPORTING_ORDER = Path("/sys/module/page_reporting/parameters/page_reporting_order")
MADV_POPULATE_WRITE = 23  # Linux 5.14


@contextlib.contextmanager
def steady_guest_memory(enabled: bool) -> Iterator[str]:
    """Pause free page reporting and back the guest's free memory, restored afterwards."""
    if not enabled or not PAGE_REPORTING_ORDER.exists():
        yield "as found (free page reporting not paused)"
        return
    saved = PAGE_REPORTING_ORDER.read_text().strip()
    PAGE_REPORTING_ORDER.write_text("11")  # > MAX_PAGE_ORDER (10): no free block qualifies
    try:
        avail = next(
            int(ln.split()[1]) * 1024
            for ln in Path("/proc/meminfo").read_text().splitlines()
            if ln.startswith("MemAvailable:")
        )
        size = max(0, avail - (2 << 30)) // (1 << 21) * (1 << 21)
        t0 = time.monotonic()
        if size:
            with mmap.mmap(-1, size) as m:
                try:
                    m.madvise(MADV_POPULATE_WRITE)
                except OSError:
                    for off in range(0, size, mmap.PAGESIZE):
                        m[off] = 1
        yield (
            f"free page reporting paused (order {saved} -> 11), {size / (1 << 30):.1f} GiB "
            f"pre-touched in {time.monotonic() - t0:.1f} s"
        )
    finally:
        PAGE_REPORTING_ORDER.write_text(saved)


def fmt(n: float) -> str:
    return f"{n / MiB:,.1f} MiB"


def init_repo(path: Path) -> Path:
    sh("restic", "init", "-q", env={"RESTIC_REPOSITORY": str(path), "RESTIC_PASSWORD": PASSWORD})
    return path


def run_pair(
    i: int, origin: Loop, outer: Loop, base: Path, repos: tuple[Path, Path], cfg: BackupConfig
) -> dict[str, Any]:
    """A (restic alone) and B (quiesce phase), in alternating order, caches cold."""
    out: dict[str, Any] = {}
    for who in ("A", "B") if i % 2 == 0 else ("B", "A"):
        # No writeback of the previous run's repository in this one: without it the
        # second run of a pair is throttled writing its own repository (dirty limits).
        os.sync()
        if who == "A":
            remount(origin)
            x = restic_alone(repos[0], base / "cache-a", origin.mnt / "tree", outer.device)
        else:
            x = quiesce_phase(origin, base / "state", cfg, outer.device)
        x["throughput"] = x["bytes"] / x["wall_s"]
        out[who] = x
    out["order"] = "A,B" if i % 2 == 0 else "B,A"
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--workdir", default="/var/tmp")
    ap.add_argument("--change", type=float, default=0.01, help="fraction of files rewritten")
    ap.add_argument("--repeat", type=int, default=3, help="pairs per kind of run (medians)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument(
        "--keep-page-reporting", action="store_true",
        help="leave the VM balloon's free page reporting on (runs then differ by host faults)",
    )  # fmt: skip
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("run as root (loop devices, mounts, FIFREEZE)", file=sys.stderr)
        return 2
    total = int(args.size_gib * (1 << 30))
    base = Path(tempfile.mkdtemp(prefix="quiesce-bench-backup-", dir=args.workdir))
    loops: list[Loop] = []
    results: dict[str, Any] = {"tree_bytes": total, "first": [], "incremental": []}
    stack = contextlib.ExitStack()
    try:
        outer = make_loop(
            base / "host-xfs.img", 3 * total + (1 << 30),
            ["mkfs.xfs", "-q", "-f", "-m", "reflink=1"], base / "host", direct_io=False,
        )  # fmt: skip
        loops.append(outer)
        origin = make_loop(
            outer.mnt / "data-ext4.img", int(total * 1.3) + (512 << 20),
            ["mkfs.ext4", "-q", "-F"], base / "data", direct_io=True,
        )  # fmt: skip
        loops.append(origin)
        t0 = time.monotonic()
        files = generate(origin.mnt / "tree", total)
        os.sync()
        results["files"] = len(files)
        results["generate_s"] = round(time.monotonic() - t0, 1)
        print(f"tree: {len(files)} files, {fmt(total)} on {origin.device} (ext4 on XFS)")
        os.environ["BENCH_PW"] = PASSWORD
        cfg = BackupConfig(
            target="restic", repository="-", password_env="BENCH_PW", host="bench",
            verify="none", prune=False, mount_root=str(base / "stable"),
        )  # fmt: skip
        results["memory"] = stack.enter_context(steady_guest_memory(not args.keep_page_reporting))
        print(f"guest memory: {results['memory']}")
        repos: tuple[Path, Path] = (base, base)
        for i in range(args.repeat):  # full backups into fresh repositories
            for r in repos:
                if r != base:
                    shutil.rmtree(r)
            repos = (init_repo(base / f"repo-a{i}"), init_repo(base / f"repo-b{i}"))
            run_cfg = cfg.model_copy(update={"repository": str(repos[1])})
            results["first"].append(run_pair(i, origin, outer, base, repos, run_cfg))
        changed_total = []
        for i in range(args.repeat):  # 1% changed, against the last full backups
            changed = change(files, args.change, seed=11 + i)
            changed_total.append(sum(p.stat().st_size for p in changed))
            os.sync()
            results["incremental"].append(run_pair(i, origin, outer, base, repos, run_cfg))
        results["changed_files"] = len(changed)
        results["changed_files_bytes"] = changed_total
        report(results)
        if args.json:
            print(json.dumps(results, indent=2, default=str))
        return 0
    finally:
        stack.close()
        with contextlib.suppress(Exception):
            from quiesce.snapshot.cleanup import cleanup

            cleanup(base / "state")
        for lp in reversed(loops):
            subprocess.run(["umount", str(lp.mnt)], capture_output=True)
            subprocess.run(["losetup", "-d", lp.device], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def report(r: dict[str, Any]) -> None:
    print(
        f"\n{'run':<14} {'who':<14} {'wall':>8} {'user+sys':>11} {'throughput':>13} {'new':>5} "
        f"{'changed':>7} {'unmodified':>10} {'added':>11} {'read from vol':>14}"
    )
    for label in ("first", "incremental"):
        for i, pair in enumerate(r[label]):
            for who, name in (("A", "restic alone"), ("B", "quiesce phase")):
                x = pair[who]
                print(
                    f"{label + ' #' + str(i + 1):<14} {name:<14} {x['wall_s']:>7.2f}s "
                    f"{x['user_s']:>5.1f}+{x['sys_s']:>4.1f}s {fmt(x['throughput']) + '/s':>13} "
                    f"{x['files_new']:>5} "
                    f"{x['files_changed']:>7} {x['files_unmodified']:>10} "
                    f"{fmt(x['data_added'] or 0):>11} {fmt(x['read_from_volume']):>14}"
                )
    print()
    for label in ("first", "incremental"):
        pairs = r[label]
        a = statistics.median(p["A"]["throughput"] for p in pairs)
        b = statistics.median(p["B"]["throughput"] for p in pairs)
        cpu_a = statistics.median(p["A"]["user_s"] + p["A"]["sys_s"] for p in pairs)
        cpu_b = statistics.median(p["B"]["user_s"] + p["B"]["sys_s"] for p in pairs)
        per_pair = ", ".join(f"{p['B']['throughput'] / p['A']['throughput']:.2f}" for p in pairs)
        ok = "OK" if b / a >= 0.9 else "BELOW TARGET"
        q = pairs[-1]["B"]
        print(
            f"{label}: median throughput restic alone {fmt(a)}/s, quiesce phase {fmt(b)}/s: "
            f"ratio {b / a:.2f}x (target >= 0.9: {ok}; per pair {per_pair}); median CPU "
            f"{cpu_a:.1f} s vs {cpu_b:.1f} s; quiesce's phase = mount "
            f"{q['mount_s'] * 1000:.0f} ms + restic {q['restic_s']:.2f} s + umount "
            f"{q['umount_s'] * 1000:.0f} ms"
        )
    inc = r["incremental"][-1]["B"]
    print(
        f"incremental: {r['changed_files']} of {r['files']} files rewritten per run "
        f"({fmt(statistics.median(r['changed_files_bytes']))} of file data); restic skipped "
        f"{inc['files_unmodified']} unchanged files (stable path {inc['stable_path']}) and "
        f"read {fmt(inc['read_from_volume'])} from the snapshot of a {fmt(r['tree_bytes'])} tree"
    )


if __name__ == "__main__":
    sys.exit(main())
