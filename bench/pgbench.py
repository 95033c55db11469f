#!/usr/bin/env python3
"""PostgreSQL under pgbench while its filesystem is snapshotted every few seconds.

Not a test: run as root, ``python3 bench/pgbench.py [--image-mb 3072] [--scale 50]
[--seconds 60] [--interval 5] [--rounds 1]``; needs Debian's postgresql (``bash
scripts/db-setup.sh``). It builds an XFS (reflink=1) loop filesystem, an ext4 image on it,
and a throwaway PostgreSQL cluster on the ext4 (its own socket directory, no TCP), loads
``pgbench -i -s SCALE``, then runs ``pgbench -c 4 -j 2 -T SECONDS`` once per method,
interleaved over the rounds (the order rotates each round: the image fragments as it goes,
which slows whole-image clones), while a thread snapshots the ext4 every ``--interval``
seconds and deletes each snapshot before the next:

- ``none``: no snapshots (the baseline);
- ``script``: ``fsfreeze -f M; cp --reflink=always IMG SNAP; fsfreeze -u M`` (one shell);
- ``quiesce``: ``quiesce.snapshots.create(..., "reflink")``, mode delta (the default);
- ``quiesce-clone``: the same with ``mode = "clone"`` (the old in-window FICLONE; not
  in the default ``--methods``);
- ``quiesce-nobase``: delta with ``base = false`` (no base kept between snapshots: the
  live image's blocks are shared only while a snapshot exists, as with the script, but
  every pre-clone is of the whole image; not in the default ``--methods``).

``--warmup SECONDS`` first runs pgbench with fsfreeze-script snapshots, unmeasured: every
write after a clone is copied on write, so this ages the image as nights of snapshots would.

Between methods the host is synced (XFS frees the deleted clones' extents in the
background: the next method must not pay for the last one's) and left idle 3 s.
``--trace`` prints each snapshot's phases and, for quiesce, what ``prepare`` did (flush,
pre-clone pieces, the longest, ranges re-cloned, CPU); every method's CPU per snapshot
(the snapshotting thread plus its children: guardian, fsfreeze, cp) is printed always.

Printed per method: tps, latency p99 / p99.9 / max (ms, from pgbench's per-transaction
log), the snapshots' windows; then issue 21's table (tps, p99.9, max, the 1st and 11th
snapshot's command time and window, CPU per snapshot, the image's extent count before and
after the phase) and the ratios its targets are stated in: tps quiesce / script (>= 1)
and / none (>= 0.9), p99.9 / script (<= 1), max / script (<= 0.1), 11th / 1st snapshot
command and window (<= 1.5), CPU per snapshot / script (<= 2).
Everything it makes is removed at the end, also on failure.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from quiesce import snapshot as snapshots
from quiesce.host import extents, kernel

PORT = 54471
METHODS = ("none", "quiesce", "script")  # also: quiesce-clone, quiesce-nobase


def sh(*cmd: str, user: str | None = None, cwd: str | None = None) -> str:
    argv = ["runuser", "-u", user, "--", *cmd] if user else list(cmd)
    p = subprocess.run(argv, capture_output=True, text=True, cwd=cwd)
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr}{p.stdout}")
    return p.stdout.strip()


def pg_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise SystemExit("no PostgreSQL: run `bash scripts/db-setup.sh`")
    return Path(found[-1]).parent


class Snapshotter:
    """Snapshots the mount every ``interval`` seconds until stopped; records windows."""

    def __init__(
        self, method: str, mnt: Path, image: Path, state: Path, interval: float, trace: bool
    ):
        self.method, self.mnt, self.image, self.state = method, mnt, image, state
        self.interval, self.trace = interval, trace
        self.windows_ms: list[float] = []
        self.cmd_ms: list[float] = []  # each snapshot's command, start to end (not delete)
        self.cpu_s: list[float] = []  # CPU per snapshot: this thread + reaped children
        self.traces: list[str] = []  # --trace: one line per snapshot, its phases
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.errors: list[str] = []
        self.spans: list[tuple[float, float, str]] = []  # (start, end, phase), wall clock

    def _one(self, i: int) -> None:
        cpu0 = _cpu()
        try:
            self._snapshot(i)
        finally:
            self.cpu_s.append(_cpu() - cpu0)

    def _snapshot(self, i: int) -> None:
        if self.method == "script":
            snap = self.image.with_name(f"script-{i}.img")
            script = (
                f"fsfreeze -f {self.mnt} && cp --reflink=always {self.image} {snap};"
                f" fsfreeze -u {self.mnt}"
            )
            t0, wall = time.monotonic(), time.time()
            subprocess.run(["sh", "-c", script], check=True)
            self.windows_ms.append((time.monotonic() - t0) * 1000)
            self.cmd_ms.append(self.windows_ms[-1])
            self.spans.append((wall, time.time(), "script"))
            snap.unlink()
            return
        mode = "clone" if self.method == "quiesce-clone" else "delta"
        options: dict[str, object] = {"mode": mode}
        if self.method == "quiesce-nobase":
            options["base"] = False
        t, t0 = time.time(), time.monotonic()
        man = snapshots.create(
            [str(self.mnt)],
            "reflink",
            options=options,
            job=f"pgb{i}",
            state_dir=self.state,
        )
        self.cmd_ms.append((time.monotonic() - t0) * 1000)
        self.windows_ms.append((man.window or {}).get("window_s", 0) * 1000)
        if self.trace:
            self.traces.append(_trace_line(man))
        for ph in man.phases:  # sequential: their wall-clock spans, to blame slow transactions
            self.spans.append((t, t + ph["duration_s"], ph["phase"]))
            if ph["phase"] == "prepare":  # and prepare's own steps, which end with it
                steps = [(k, v) for s in man.snapshots for k, v in _steps(s)]
                u = t + ph["duration_s"] - sum(v for _, v in steps)
                for name, v in steps:
                    self.spans.append((u, u + v, f"prepare:{name}"))
                    u += v
            t += ph["duration_s"]
        snapshots.delete(man.id, self.state)

    def _loop(self) -> None:
        i = 0
        while not self.stop.wait(self.interval):
            try:
                self._one(i)
            except Exception as e:  # reported; the run goes on
                self.errors.append(str(e))
            i += 1

    def __enter__(self) -> Snapshotter:
        if self.method != "none":
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(120)


def _cpu() -> float:
    """CPU seconds of the calling thread plus every child reaped so far."""
    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.thread_time() + ch.ru_utime + ch.ru_stime


def _steps(snap) -> list[tuple[str, float]]:
    return list(snap.extra.get("prepare", {}).get("steps_s", {}).items())


def _trace_line(man) -> str:
    """One snapshot's phases (ms), pre-freeze syncfs, and what prepare did."""
    phases = " ".join(f"{p['phase']} {p['duration_s'] * 1000:.0f}" for p in man.phases)
    w = man.window or {}
    sync = [v.get("syncfs_s") for v in w.get("volumes", [])]
    sync_ms = ",".join(f"{x * 1000:.0f}" for x in sync if x is not None) or "-"
    prep = [s.extra.get("prepare") for s in man.snapshots]
    ranges = [s.extra.get("ranges_in_window") for s in man.snapshots]
    return (
        f"{phases} | window syncfs {w.get('syncfs')} {sync_ms} ms,"
        f" in-window ranges {ranges} | prepare {prep}"
    )


def latencies_ms(prefix: Path) -> list[tuple[float, float]]:
    """(latency ms, completion time) of every transaction in pgbench's logs."""
    out = []
    for log in glob.glob(f"{prefix}*"):
        with open(log) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6:
                    out.append((int(parts[2]) / 1000, int(parts[4]) + int(parts[5]) / 1e6))
        os.unlink(log)
    return sorted(out)


def blame(slow: list[tuple[float, float]], spans: list[tuple[float, float, str]]) -> str:
    """Which snapshot phase each slow transaction overlapped (or none)."""
    count: dict[str, int] = {}
    for lat, end in slow:
        start = end - lat / 1000
        hit = [ph for s, e, ph in spans if s < end and e > start] or ["no snapshot"]
        for ph in set(hit):
            count[ph] = count.get(ph, 0) + 1
    return ", ".join(f"{k} {v}" for k, v in sorted(count.items(), key=lambda kv: -kv[1]))


def settle(host: Path, pause: float = 3.0) -> None:
    """Let the last method's deleted clones be freed before the next method starts: XFS
    frees a deleted file's extents in the background (inodegc), and for a fragmented clone
    that is seconds of refcount updates and log traffic the next method would pay for.
    syncfs of the host waits for them."""
    fd = os.open(host, os.O_RDONLY | os.O_DIRECTORY)
    try:
        kernel.syncfs(fd)
    finally:
        os.close(fd)
    time.sleep(pause)


def pct(xs: list[float], p: float) -> float:
    return xs[min(len(xs) - 1, int(len(xs) * p))] if xs else float("nan")


def extent_count(image: Path) -> int:
    fd = os.open(image, os.O_RDONLY)
    try:
        return extents.count(fd)
    finally:
        os.close(fd)


def run_method(method: str, args, pgb: Path, mnt: Path, image: Path, work: Path) -> dict:
    prefix = work / f"log-{method}"
    ext0 = extent_count(image)
    trace = getattr(args, "trace", False)
    with Snapshotter(method, mnt, image, work / "state", args.interval, trace) as snap:
        out = sh(
            str(pgb / "pgbench"), "-h", str(work / "run"), "-p", str(PORT), "-U", "postgres",
            "-c", "4", "-j", "2", "-T", str(args.seconds), "-l", "--log-prefix", str(prefix),
            "postgres",
        )  # fmt: skip
    tps = next(float(line.split("=")[1].split()[0]) for line in out.splitlines() if "tps =" in line)
    timed = latencies_ms(prefix)
    lat = [x for x, _ in timed]
    slow = [t for t in timed if t[0] >= args.slow_ms]
    return {
        "tps": tps,
        "p99": pct(lat, 0.99),
        "p999": pct(lat, 0.999),
        "max": lat[-1] if lat else float("nan"),
        "windows": snap.windows_ms,
        "cmd": snap.cmd_ms,
        "extents": (ext0, extent_count(image)),
        "cpu": snap.cpu_s,
        "traces": snap.traces,
        "errors": snap.errors,
        "blame": blame(slow, snap.spans),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--image-mb", type=int, default=3072)
    ap.add_argument("--scale", type=int, default=50)
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--interval", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=60, help="seconds of unmeasured aging")
    ap.add_argument("--slow-ms", type=float, default=100, help="report where these overlap")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--trace", action="store_true", help="print each snapshot's phases")
    ap.add_argument(
        "--cowextsize", type=int, default=0,
        help="set XFS's copy-on-write extent size hint on the image (bytes; 0: the default)",
    )  # fmt: skip
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root")
    pgb = pg_bin()
    methods = args.methods.split(",")
    print(f"load average {os.getloadavg()}; image {args.image_mb} MiB, scale {args.scale}")
    work = Path(tempfile.mkdtemp(prefix="quiesce-bench-pg-", dir="/tmp"))
    work.chmod(0o755)
    results: dict[str, list[dict]] = {m: [] for m in methods}
    try:
        with contextlib.ExitStack() as st:
            host_img, host = work / "host.img", work / "host"
            with open(host_img, "wb") as f:
                f.truncate((args.image_mb + 2048) << 20)
            sh("mkfs.xfs", "-q", "-m", "reflink=1", str(host_img))
            hdev = sh("losetup", "--find", "--show", str(host_img))
            st.callback(subprocess.run, ["losetup", "-d", hdev], check=False)
            host.mkdir()
            sh("mount", hdev, str(host))
            st.callback(subprocess.run, ["umount", str(host)], check=False)
            image, mnt = host / "pg.img", work / "pg"
            with open(image, "wb") as f:
                f.truncate(args.image_mb << 20)
            sh("mkfs.ext4", "-q", str(image))
            if args.cowextsize:  # XFS's CoW extent size hint on the image (bytes)
                sh("xfs_io", "-c", f"cowextsize {args.cowextsize}", str(image))
            dev = sh("losetup", "--find", "--show", str(image))
            st.callback(subprocess.run, ["losetup", "-d", dev], check=False)
            mnt.mkdir()
            sh("mount", dev, str(mnt))
            st.callback(subprocess.run, ["umount", str(mnt)], check=False)
            mnt.chmod(0o755)
            run = work / "run"
            run.mkdir()
            shutil.chown(run, "postgres", "postgres")
            data = mnt / "pgdata"
            data.mkdir()
            shutil.chown(data, "postgres", "postgres")
            sh(str(pgb / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
               "--no-instructions", user="postgres")  # fmt: skip
            opts = (f"-k {run} -p {PORT} -c listen_addresses='' -c shared_buffers=128MB "
                    "-c max_wal_size=1GB")  # fmt: skip
            sh(str(pgb / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(run / "log"),
               "-w", "-t", "60", "start", user="postgres")  # fmt: skip
            st.callback(
                subprocess.run,
                ["runuser", "-u", "postgres", "--", str(pgb / "pg_ctl"), "-D", str(data),
                 "-m", "immediate", "-w", "-t", "60", "stop"],
                check=False,
                capture_output=True,
            )  # fmt: skip
            sh(str(pgb / "pgbench"), "-h", str(run), "-p", str(PORT), "-U", "postgres", "-i",
               "-q", "-s", str(args.scale), "postgres")  # fmt: skip
            if args.warmup:
                aged = argparse.Namespace(**{**vars(args), "seconds": args.warmup})
                run_method("script", aged, pgb, mnt, image, work)
                settle(host)
                print(f"  aged the image: {args.warmup} s of pgbench with snapshots", flush=True)
            for r in range(args.rounds):
                for m in methods[r % len(methods) :] + methods[: r % len(methods)]:
                    # Every phase starts with the image shared with nothing: a base the
                    # quiesce phase kept would make every write of the next phase a copy
                    # on write (the quiesce phase makes its base anew at its 1st snapshot).
                    for old in image.parent.glob(".quiesce-base-*"):
                        old.unlink()
                    res = run_method(m, args, pgb, mnt, image, work)
                    settle(host)
                    results[m].append(res)
                    w = res["windows"]
                    print(
                        f"  round {r + 1} {m:>13}: tps {res['tps']:8.1f}  p99 {res['p99']:7.1f}"
                        f"  p99.9 {res['p999']:7.1f}  max {res['max']:8.1f} ms;"
                        f"  {len(w)} snapshots, window median"
                        f" {statistics.median(w) if w else 0:7.1f} max {max(w, default=0):7.1f} ms"
                        + (
                            f"; CPU/snapshot median {statistics.median(res['cpu']) * 1000:.0f} ms"
                            if res["cpu"]
                            else ""
                        )
                        + (f"  ERRORS {res['errors'][:2]}" if res["errors"] else "")
                        + (
                            f"\n      slow transactions overlap: {res['blame']}"
                            if res["blame"]
                            else ""
                        ),
                        flush=True,
                    )
                    for line in res["traces"]:
                        print(f"      {line}")
                    print(f"      load average {os.getloadavg()}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nload average {os.getloadavg()}")
    for m in methods:
        for r in results[m]:
            print(f"  {m}: command ms {[round(x) for x in r['cmd']]}")
            print(f"  {m}: window ms {[round(x, 1) for x in r['windows']]}")

    def agg(m: str, k: str) -> float:
        vals = [r[k] for r in results[m]]
        return max(vals) if k == "max" else statistics.median(vals)

    def first_nth(m: str, k: str, n: int = 11) -> tuple[float, float]:
        xs = results[m][0][k]  # the first round's run of this method
        return (xs[0], xs[min(n, len(xs)) - 1]) if xs else (float("nan"), float("nan"))

    print("\n| phase | tps | p99.9 | max | snapshot command (1st → 11th) | window (1st → 11th)"
          " | CPU/snapshot | image extents before → after |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for m in methods:
        r0 = results[m][0]
        if m == "none":
            cmd = win = cpu = "–"
        else:
            c1, c11 = first_nth(m, "cmd")
            w1, w11 = first_nth(m, "windows")
            cmd, win = f"{c1:,.0f} → {c11:,.0f} ms", f"{w1:,.1f} → {w11:,.1f} ms"
            cpu = f"{statistics.median(r0['cpu']) * 1000:,.0f} ms" if r0["cpu"] else "–"
        e0, e1 = r0["extents"]
        print(f"| {m} | {agg(m, 'tps'):,.0f} | {agg(m, 'p999'):.1f} ms | {agg(m, 'max'):,.1f} ms"
              f" | {cmd} | {win} | {cpu} | {e0:,} → {e1:,} |")  # fmt: skip
    for m in [m for m in methods if m.startswith("quiesce") and len(results[m][0]["cmd"]) >= 100]:
        c1, c100 = first_nth(m, "cmd", 100)
        w1, w100 = first_nth(m, "windows", 100)
        print(f"  {m} 100th/1st: command {c100 / c1:.2f}, window {w100 / w1:.2f} [<= 1.5]")
    if {"script", "quiesce"} <= set(methods):
        q, sc = "quiesce", "script"
        print("\nratios (targets in brackets):")
        print(f"  tps quiesce/script {agg(q, 'tps') / agg(sc, 'tps'):.3f} [>= 1.0]")
        if "none" in methods:
            print(f"  tps quiesce/none {agg(q, 'tps') / agg('none', 'tps'):.3f} [>= 0.9]")
            print(f"  tps script/none {agg(sc, 'tps') / agg('none', 'tps'):.3f}")
        print(f"  p99.9 quiesce/script {agg(q, 'p999') / agg(sc, 'p999'):.3f} [<= 1.0]")
        print(f"  max quiesce/script {agg(q, 'max') / agg(sc, 'max'):.3f} [<= 0.1]")
        c1, c11 = first_nth(q, "cmd")
        w1, w11 = first_nth(q, "windows")
        print(f"  quiesce 11th/1st: command {c11 / c1:.2f}, window {w11 / w1:.2f} [<= 1.5]")
        cpu_q = statistics.median(results[q][0]["cpu"])
        cpu_s = statistics.median(results[sc][0]["cpu"])
        print(f"  CPU/snapshot quiesce/script {cpu_q / cpu_s:.2f} [<= 2]")


if __name__ == "__main__":
    main()
