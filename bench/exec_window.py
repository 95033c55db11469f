#!/usr/bin/env python3
"""``quiesce exec M -- true``: the freeze window when the command is started before it.

Not a test: run as root, ``python3 bench/exec_window.py [--n 30]``. It makes an idle
ext4 loop filesystem and, interleaved N times each:

- ``quiesce``: ``python3 -m quiesce exec --json M -- true`` (the command held before its
  exec until the freeze returns); its window is the report's ``window_s`` (first FIFREEZE
  issued -> last FITHAW returned);
- ``ungated``: the same freezer, with ``true`` forked and exec'd from this Python process
  inside the window (what ``exec`` did before);
- ``gated``: the same as ``quiesce`` from this process (no CLI start-up around it): the
  guardian releases the command as the last FIFREEZE returns and thaws as it exits;
- ``gated-by-controller``: the path before, both through this process (its round trips);
- ``quiesce-before`` (``--before-src DIR``): ``quiesce exec`` from another checkout;
- ``guardian``: the same freezer with no command at all (the guardian's round trips);
- ``floor``: FIFREEZE + FITHAW back to back in this process (no guardian, no command).

Prints median and p90 of each and the ratios quiesce / floor and quiesce / ungated. The
target: quiesce's median window <= 2 ms. ``--hops N``: N more runs of the in-process paths
with every hop timed (bench/hops.py), a table of medians per hop. ``--floor-c N``: the
same window in C (bench/exec_floor.c), with rcu_expedited off and held through quiesce's
record. Run it under ``chrt -f 50`` on a loaded machine (the ioctls' own times still swing
with the load: compare within one run).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
sys.path.insert(0, str(SRC))

from quiesce.freezing.freezer import Freezer  # noqa: E402
from quiesce.freezing.plan import make_plan  # noqa: E402
from quiesce.host import kernel, proc  # noqa: E402


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


BEFORE: list[str] = []  # --before-src: another checkout's src/ (e.g. main's, exported)


def quiesce_exec(mnt: str, src: str = str(SRC)) -> float:
    env = os.environ | {"PYTHONPATH": src, "PYTHONDONTWRITEBYTECODE": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "quiesce", "exec", "--json", mnt, "--", "true"],
        check=True, capture_output=True, text=True, env=env,
    ).stdout  # fmt: skip
    return float(json.loads(out)["window_s"])


def ungated(mnt: str) -> float:
    with make_plan([mnt]) as plan:
        f = Freezer(plan, timeout=10, lease=5)
        f.freeze()
        proc.run_bounded(["/usr/bin/true"], timeout=5)
        w = f.thaw()
    return float(w.duration or 0)


LAST_GUARDIAN: list[int | None] = [None]


def guardian(mnt: str) -> float:
    with make_plan([mnt]) as plan:
        f = Freezer(plan, timeout=10, lease=5)
        f.freeze()
        w = f.thaw()
    LAST_GUARDIAN[0] = w.guardian_pid
    return float(w.duration or 0)


def gated(mnt: str) -> float:
    """As ``quiesce exec`` does it: the guardian releases the command."""
    with make_plan([mnt]) as plan:
        f = Freezer(plan, timeout=10, lease=5)
        g = proc.Gated(["/usr/bin/true"])
        f.freeze(gate_fd=g.gate, exit_fd=g.pidfd)
        g.released_by(f.gate_released_ns)
        g.wait(5)
        w = f.thaw()
    LAST_GUARDIAN[0] = w.guardian_pid
    return float(w.duration or 0)


def gated_by_controller(mnt: str) -> float:
    """The path before: the controller releases the command after the guardian's answer."""
    with make_plan([mnt]) as plan:
        f = Freezer(plan, timeout=10, lease=5)
        g = proc.Gated(["/usr/bin/true"])
        f.freeze()
        g.release()
        g.wait(5)
        w = f.thaw()
    LAST_GUARDIAN[0] = w.guardian_pid
    return float(w.duration or 0)


def floor(mnt: str) -> float:
    fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    try:
        kernel.syncfs(fd)
        t0 = time.perf_counter()
        kernel.fifreeze(fd)
        kernel.fithaw(fd)
        return time.perf_counter() - t0
    finally:
        os.close(fd)


def hop_table(mnt: str, n: int) -> None:
    """Where the window goes: each hop from the first FIFREEZE issued to the last FITHAW
    returned (bench/hops.py wraps quiesce's functions in this process and the guardian it
    forks), for ``guardian`` (no command), ``gated`` (the guardian releases the command
    and thaws at its exit) and ``gated-by-controller`` (the path before: both through
    this process); interleaved, medians over ``n`` runs each. The ioctls' own times swing
    with the machine's load (RCU grace periods): ``hops`` is the window without them."""
    import hops

    hops.install()
    runs = (("guardian", guardian), ("gated", gated), ("gated-by-controller", gated_by_controller))
    per: dict[str, dict[str, list[float]]] = {name: {} for name, _ in runs}
    whole: dict[str, list[float]] = {name: [] for name, _ in runs}
    rest: dict[str, list[float]] = {name: [] for name, _ in runs}
    for _ in range(n):
        for name, fn in runs:
            hops.MARKS.clear()
            window = fn(mnt)
            marks = hops.collect(LAST_GUARDIAN[0], hops.MARKS)
            seq = hops.window_hops(marks, hops.CHAINS[name])
            for h, ms in seq:
                per[name].setdefault(h, []).append(ms)
            if len(seq) == len(hops.CHAINS[name]) - 1:
                whole[name].append(window * 1e3)
                kernel_ms = sum(ms for h, ms in seq if tuple(h.split(" -> ")) in hops.IOCTLS)
                rest[name].append(window * 1e3 - kernel_ms)
    for name, rows in per.items():
        print(f"\nhops of `{name}` (first FIFREEZE issued -> last FITHAW returned), {n} runs")
        print("| hop | median ms | runs |\n| --- | --- | --- |")
        for h, xs in rows.items():
            print(f"| {h} | {statistics.median(xs):.3f} | {len(xs)} |")
        if whole[name]:
            print(f"| window | {statistics.median(whole[name]):.3f} | {len(whole[name])} |")
            print(f"| window - ioctls (hops) | {statistics.median(rest[name]):.3f} | "
                  f"{len(rest[name])} |")  # fmt: skip


def _before(src: str) -> Callable[[str], float]:
    return lambda mnt: quiesce_exec(mnt, src)


def c_floor(mnt: str, work: Path, n: int) -> None:
    """bench/exec_floor.c: the same window with no Python at all (fork before, FIFREEZE,
    one byte, the child execs true and exits, pidfd, FIFREEZE probe, FITHAW), with quiesce's
    gate shell and with a child that execs true itself; rcu_expedited off, and on (held
    through quiesce's own record, as the guardian holds it: never written by hand).
    Interleaved in rounds of 10."""
    from quiesce.freezing.guardian.expedite import Expedite

    exe = work / "exec_floor"
    sh("cc", "-O2", "-o", str(exe), str(Path(__file__).resolve().parent / "exec_floor.c"))
    rows: dict[tuple[str, str], list[list[float]]] = {}
    for _ in range(max(1, n // 10)):
        for mode in ("sh", "direct"):
            for rcu in ("off", "on"):
                hold = Expedite(os.getpid())
                state = hold.acquire() if rcu == "on" else "off"
                try:
                    out = sh(str(exe), mnt, "10", mode)
                finally:
                    hold.release()
                key = (mode, rcu if state in ("on", "off") else state)
                lines = [[float(x) for x in ln.split()] for ln in out.splitlines()]
                rows.setdefault(key, []).extend(lines)
    print("\nC floor (bench/exec_floor.c), medians in ms")
    print("| child | rcu_expedited | window | FIFREEZE | gate -> exit | probe + FITHAW | runs |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for (mode, rcu), xs in rows.items():
        cols = [statistics.median(c) for c in zip(*xs, strict=True)]
        print(f"| {mode} | {rcu} | " + " | ".join(f"{c:.3f}" for c in cols) + f" | {len(xs)} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--hops", type=int, default=0, help="also N runs with every hop timed")
    ap.add_argument("--floor-c", type=int, default=0, help="also N runs of bench/exec_floor.c")
    ap.add_argument(
        "--before-src",
        help="also `quiesce exec` from this src/ (say, main's: git archive main src), "
        "interleaved with this checkout's, as quiesce-before",
    )
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="quiesce-bench-exec-"))
    img, mnt = work / "fs.img", work / "mnt"
    mnt.mkdir()
    loop = ""
    try:
        with open(img, "wb") as f:
            f.truncate(256 << 20)
        sh("mkfs.ext4", "-q", str(img))
        loop = sh("losetup", "-f", "--show", str(img))
        sh("mount", loop, str(mnt))
        methods = {
            "quiesce": quiesce_exec,
            **({"quiesce-before": _before(args.before_src)} if args.before_src else {}),
            "gated": gated,
            "gated-by-controller": gated_by_controller,
            "ungated": ungated,
            "guardian": guardian,
            "floor": floor,
        }
        got: dict[str, list[float]] = {m: [] for m in methods}
        for _ in range(args.n):
            for name, fn in methods.items():
                got[name].append(fn(str(mnt)))
        print(f"`quiesce exec M -- true` on idle ext4, {args.n} each, interleaved")
        print("| method | median ms | p90 ms |\n| --- | --- | --- |")
        med = {}
        for name, xs in got.items():
            xs.sort()
            med[name] = statistics.median(xs)
            print(f"| {name} | {med[name] * 1e3:.2f} | {xs[int(len(xs) * 0.9)] * 1e3:.2f} |")
        ok = "met" if med["quiesce"] <= 0.002 else "missed"
        for base in ("ungated", "guardian", "floor", *(["quiesce-before"] * bool(args.before_src))):
            print(f"quiesce / {base}: {med['quiesce'] / med[base]:.2f}x")
        print(f"target quiesce <= 2 ms: {ok}")
        if args.hops:
            hop_table(str(mnt), args.hops)
        if args.floor_c:
            c_floor(str(mnt), work, args.floor_c)
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            sh("umount", str(mnt))
        if loop:
            with contextlib.suppress(subprocess.CalledProcessError):
                sh("losetup", "-d", loop)
        img.unlink(missing_ok=True)
        (work / "exec_floor").unlink(missing_ok=True)
        mnt.rmdir()
        work.rmdir()


if __name__ == "__main__":
    main()
