#!/usr/bin/env python3
"""The restore drill's cost against PostgreSQL's own recovery of the same copy, and how
often the drill catches a torn copy.

Not a test: run as root, ``python3 bench/drill.py [--scale 10] [--seconds 20]
[--rounds 3] [--torn 5]``; needs Debian's postgresql (``bash scripts/db-setup.sh``).
It builds an XFS (reflink=1) loop filesystem holding two ext4 images, a PostgreSQL
cluster with its data on one and its WAL on the other (``initdb --waldir``), loads
``pgbench -i -s SCALE`` and runs ``pgbench -c 4 -j 2`` in the background with
``checkpoint_timeout = 1h`` (so a snapshot holds WAL to replay). Each round:

- a snapshot of the group (``quiesce.snapshot.create``, reflink, PostgreSQL writer
  with ``checkpoint = false``: recovery then replays everything since the last
  checkpoint, the worst case for the drill);
- **baseline**: PostgreSQL's own recovery of the same copy: each image cloned again
  (``cp --reflink``), mounted read-write, ``pg_wal`` pointed at the clone, the origin's
  postmaster.pid removed, ``postgres`` started with the origin's settings: seconds from
  start to "ready" (postmaster.pid), copy and mount not counted;
- **drill**: ``quiesce.apps.drills.drill_snapshot`` on the snapshot, whole: read-only
  mounts, overlay, recovery, ``pg_amcheck --heapallindexed``, teardown.

Printed: per round both times and the drill's parts; then the medians and the ratio
drill / baseline (goal <= 2) and drill recovery / baseline (the overlay's cost alone).

``--torn N``: the negative control. N times, the WAL volume's image is cloned, pgbench
goes on for ``--gap`` seconds, then the data volume's image is cloned (a group copied
volume by volume, without the freeze); the drill runs on the pair. Twice: ``plain``
(only pgbench in the gap: the data volume gets what the small ``--buffers`` evict) and
``checkpoint`` (a CHECKPOINT in the gap too). Printed: how many of the N torn copies
the drill caught (failed), and how (did not start / amcheck).
Everything it makes is removed at the end, also on failure.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from quiesce import snapshot as snapshots
from quiesce.apps.drills import AppTarget, drill_mounted, drill_snapshot
from quiesce.apps.writers.postgresql import PostgresWriter
from quiesce.state.journal import Journal

PORT, BASE_PORT = 54481, 54482


def sh(*cmd: str, user: str | None = None) -> str:
    argv = ["runuser", "-u", user, "--", *cmd] if user else list(cmd)
    p = subprocess.run(argv, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr}{p.stdout}")
    return p.stdout.strip()


def pg_bin() -> Path:
    import glob

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise SystemExit("no PostgreSQL: run `bash scripts/db-setup.sh`")
    return Path(found[-1]).parent


class Ground:
    """The loop filesystems, mounts and loop devices this run made; removed in reverse."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.outer = base / "outer"  # the XFS (reflink) that holds every image
        self.undo: list[list[str]] = []

    def loopfs(self, image: Path, size_mb: int, fstype: str, mnt: Path) -> str:
        with open(image, "wb") as f:
            f.truncate(size_mb << 20)
        sh(*(["mkfs.xfs", "-q", "-m", "reflink=1"] if fstype == "xfs" else
             ["mkfs.ext4", "-q", "-F"]), str(image))  # fmt: skip
        return self.attach(image, mnt)

    def attach(self, image: Path, mnt: Path, opts: str = "") -> str:
        dev = sh("losetup", "-f", "--show", str(image))
        self.undo.append(["losetup", "-d", dev])
        mnt.mkdir(exist_ok=True)
        sh("mount", *(["-o", opts] if opts else []), dev, str(mnt))
        self.undo.append(["umount", str(mnt)])
        return dev

    def release(self, n: int = 2) -> None:
        for _ in range(n):
            subprocess.run(self.undo.pop(), capture_output=True)

    def close(self) -> None:
        while self.undo:
            subprocess.run(self.undo.pop(), capture_output=True)


def start_pg(bins: Path, data: Path, sock: Path, port: int, extra: str = "") -> float:
    """pg_ctl start -w; seconds from the call until the server is ready."""
    t0 = time.monotonic()
    sh(str(bins / "pg_ctl"), "-D", str(data), "-l", str(sock / f"log-{port}"), "-w", "-t",
       "600", "-o", f"-k {sock} -p {port} -c listen_addresses='' {extra}", "start",
       user="postgres")  # fmt: skip
    return time.monotonic() - t0


def stop_pg(bins: Path, data: Path, mode: str = "fast") -> None:
    subprocess.run(["runuser", "-u", "postgres", "--", str(bins / "pg_ctl"), "-D", str(data),
                    "-m", mode, "-w", "stop"], capture_output=True)  # fmt: skip


def baseline(g: Ground, bins: Path, man, data_mp: Path, wal_mp: Path, sock: Path) -> float:
    """PostgreSQL's own recovery of the snapshot: clones mounted rw, start to ready."""
    by_vol = {s.volume: Path(s.location) for s in man.snapshot_objects()}
    copies = {}
    for name, mp in (("data", data_mp), ("wal", wal_mp)):
        img = g.outer / f"base-{name}.img"
        sh("cp", "--reflink=always", str(by_vol[str(mp)]), str(img))
        copies[name] = g.base / f"base-{name}"
        g.attach(img, copies[name])
    data = copies["data"] / "pgdata"
    (data / "pg_wal").unlink()
    os.symlink(copies["wal"] / "pg_wal", data / "pg_wal")
    os.lchown(data / "pg_wal", *_ids(data))
    (data / "postmaster.pid").unlink(missing_ok=True)
    copies["data"].chmod(0o755)
    try:
        t0 = time.monotonic()
        sh(str(bins / "postgres"), "--version")  # warm the binary, as the drill's would be
        start_pg(bins, data, sock, BASE_PORT)
        pid = data / "postmaster.pid"
        took = time.monotonic() - t0
        assert pid.exists()
        return took
    finally:
        stop_pg(bins, data, "immediate")
        g.release(4)
        for name in ("data", "wal"):
            (g.outer / f"base-{name}.img").unlink(missing_ok=True)


def _ids(p: Path) -> tuple[int, int]:
    st = p.stat()
    return st.st_uid, st.st_gid


@contextlib.contextmanager
def pgbench(bins: Path, sock: Path, port: int, seconds: int) -> Iterator[subprocess.Popen]:
    p = subprocess.Popen(["runuser", "-u", "postgres", "--", str(bins / "pgbench"), "-h",
                          str(sock), "-p", str(port), "-c", "4", "-j", "2", "-T",
                          str(seconds), "postgres"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        yield p
    finally:
        p.terminate()
        p.wait()


def torn_copy(g, data_img: Path, wal_img: Path, data_mp, wal_mp, gap, state, scratch, i,
              checkpoint: str | None = None):  # fmt: skip
    clones = [g.outer / f"torn-data{i}.img", g.outer / f"torn-wal{i}.img"]
    os.sync()
    sh("cp", "--reflink=always", str(wal_img), str(clones[1]))
    time.sleep(gap)
    if checkpoint:
        sh("psql", "-X", "-q", "-d", checkpoint, "-c", "CHECKPOINT", user="postgres")
    os.sync()
    sh("cp", "--reflink=always", str(data_img), str(clones[0]))
    mnts = [g.base / f"torn-d{i}", g.base / f"torn-w{i}"]
    for c, m in zip(clones, mnts, strict=True):
        g.attach(c, m, "ro")  # ext4 replays its journal into the clone: a power cut
    try:
        with Journal.open(state) as j:
            return drill_mounted(
                [(str(data_mp), mnts[0]), (str(wal_mp), mnts[1])],
                [AppTarget("postgresql", "pg", str(data_mp / "pgdata"))],
                snapshot=f"torn{i}", journal=j, scratch_root=scratch, timeout=600,
            )  # fmt: skip
    finally:
        g.release(4)
        for c in clones:
            c.unlink(missing_ok=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=20, help="pgbench before each snapshot")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--torn", type=int, default=5)
    ap.add_argument("--gap", type=float, default=2.0)
    ap.add_argument(
        "--buffers",
        default="16MB",
        help="the origin's shared_buffers (small: "
        "pgbench's pages are evicted to the data volume all the time)",
    )
    args = ap.parse_args()
    bins = pg_bin()
    base = Path(tempfile.mkdtemp(prefix="quiesce-drillbench-", dir="/tmp"))
    base.chmod(0o755)
    g = Ground(base)
    sock = base / "sock"
    sock.mkdir()
    shutil.chown(sock, "postgres", "postgres")
    state, scratch = base / "state", base / "scratch"
    data = None
    try:
        outer = g.outer
        g.loopfs(base / "outer.img", 4096, "xfs", outer)
        outer.chmod(0o755)
        data_mp, wal_mp = base / "data", base / "wal"
        imgs = {data_mp: outer / "data.img", wal_mp: outer / "wal.img"}
        for mp, size in ((data_mp, 1536), (wal_mp, 1024)):
            g.loopfs(imgs[mp], size, "ext4", mp)
            mp.chmod(0o755)
        data, wal = data_mp / "pgdata", wal_mp / "pg_wal"
        for d in (data, wal):
            d.mkdir()
            shutil.chown(d, "postgres", "postgres")
        sh(str(bins / "initdb"), "-D", str(data), "--waldir", str(wal), "-A", "trust", "-U",
           "postgres", "--no-instructions", user="postgres")  # fmt: skip
        conf = f"-c checkpoint_timeout=1h -c max_wal_size=4GB -c shared_buffers={args.buffers}"
        start_pg(bins, data, sock, PORT, conf)
        sh(str(bins / "pgbench"), "-h", str(sock), "-p", str(PORT), "-i", "-q", "-s",
           str(args.scale), "postgres", user="postgres")  # fmt: skip
        dsn = f"host={sock} port={PORT} user=postgres dbname=postgres"
        rows = []
        for r in range(args.rounds):
            with pgbench(bins, sock, PORT, int(args.seconds) + 60):
                time.sleep(args.seconds)
                man = snapshots.create(
                    [str(data_mp), str(wal_mp)], "reflink", job="drillbench",
                    options={"dest": str(outer)}, state_dir=state,
                    quiescers=[PostgresWriter(dsn, checkpoint=False)],
                )  # fmt: skip
            target = [AppTarget("postgresql", "pg", str(data))]
            base_s = baseline(g, bins, man, data_mp, wal_mp, sock)
            t0 = time.monotonic()
            rep = drill_snapshot(man, state=state, targets=target, scratch_root=scratch,
                                 mount_root=base / "run")  # fmt: skip
            drill_s = time.monotonic() - t0
            a = rep.apps[0]
            print(
                f"round {r}: baseline recovery {base_s:.2f} s; drill {drill_s:.2f} s "
                f"(ok={rep.ok}; recovery {a.recovery_s or 0:.2f} s, {a.replayed}, "
                f"{(a.replayed_bytes or 0) / 2**20:.1f} MiB replayed; {a.check}); "
                f"ratio {drill_s / base_s:.2f}",
                flush=True,
            )
            rows.append((base_s, drill_s, a.recovery_s or 0.0))
            snapshots.delete(man.id, state)
        if rows:
            b = statistics.median(x[0] for x in rows)
            d = statistics.median(x[1] for x in rows)
            rec = statistics.median(x[2] for x in rows)
            print(f"median: baseline {b:.2f} s, drill {d:.2f} s, drill recovery {rec:.2f} s")
            print(f"ratio drill / PostgreSQL's own recovery: {d / b:.2f} (goal <= 2)")
            print(f"ratio drill recovery / PostgreSQL's own recovery: {rec / b:.2f}")
        for kind in ("plain", "checkpoint"):
            caught = 0
            for i in range(args.torn):
                with pgbench(bins, sock, PORT, int(args.gap) + 60):
                    time.sleep(2)
                    rep = torn_copy(
                        g, imgs[data_mp], imgs[wal_mp], data_mp, wal_mp, args.gap, state,
                        scratch, i, dsn if kind == "checkpoint" else None,
                    )  # fmt: skip
                caught += not rep.ok
                a = rep.apps[0] if rep.apps else None
                how = "" if rep.ok else (f"{a.check}: {a.detail[-200:]}" if a else rep.error)
                print(f"torn ({kind}) {i}: {'CAUGHT' if not rep.ok else 'passed'} {how}",
                      flush=True)  # fmt: skip
            if args.torn:
                print(
                    f"negative control ({kind}): the drill caught {caught}/{args.torn} torn "
                    f"copies (the WAL volume copied {args.gap:g} s before the data volume, "
                    f"under pgbench{', a CHECKPOINT between' if kind == 'checkpoint' else ''})"
                )
    finally:
        if data is not None:
            stop_pg(bins, data, "immediate")
        with contextlib.suppress(Exception):
            for m in snapshots.list_manifests(state):
                snapshots.delete(m.id, state)
        g.close()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
