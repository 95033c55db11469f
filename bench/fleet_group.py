#!/usr/bin/env python3
"""How short is a fleet group's window, against one host's own window, in the same run?

On the fleet ground (quiesce_testing.ground: N hosts, sshd in its own mount namespace
each, own loop filesystem), under the hopping writer, with the coordinator driven
directly (the same code the quiesce.fleet.group module calls; Ansible's task overhead is
outside the window):

  baseline  one host alone, its own provider (a copy of its volume), hold 0:
            that host's window (first FIFREEZE to last FITHAW);
  mode a    all N hosts armed for one instant, each its own provider, for each hold;
  mode b    all N hosts frozen, one command on the controller (copies every host's file).

Prints each trial's window, skew, proven overlap and whether the snapshots' cut is
consistent, and the medians' ratios. Targets (3 hosts): mode a window <= 5x the
baseline; mode b window <= 2 s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from quiesce.cli.demo.fleet import _copy_provider
from quiesce.integrations.fleet.coordinator import Member, run_group
from quiesce_testing.ground import Fleet, Host
from quiesce_testing.ground_writer import check_cut


def member(f: Fleet, h: Host) -> Member:
    ssh = ["ssh", "-p", str(h.port), "-i", str(f.key), "-o", "BatchMode=yes",
           "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
           "-o", "LogLevel=ERROR", f"root@{h.address}"]  # fmt: skip
    prov = _copy_provider(h.dir / "snaps", h.data.mountpoint)
    return Member(h.name, ssh, [h.data.mountpoint], sys.executable, None, prov)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hosts", type=int, default=3)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--holds", default="0.05,0.1,0.2")
    a = ap.parse_args()
    holds = [float(x) for x in a.holds.split(",")]
    out: dict[str, Any] = {}
    with Fleet(a.hosts) as f:
        for h in f.hosts:
            (h.dir / "snaps").mkdir()
        ms = [member(f, h) for h in f.hosts]
        w = f.start_writer("bench.log")
        w.wait_for(20)
        n = 0

        def trial(members: list[Member], **kw: Any) -> dict[str, Any]:
            nonlocal n
            n += 1
            name = f"b{n}"
            rep = run_group(members, name=name, **kw)
            if rep["kept"] and kw.get("mode", "hosts") == "hosts" and len(members) > 1:
                copies = [
                    (h.dir / "snaps" / f"{name}-{h.name}" / "bench.log").read_bytes()
                    for h in f.hosts
                ]
                rep["cut_consistent"] = check_cut(copies).consistent
            w.wait_for(5)
            return rep

        base = [trial(ms[:1], hold_s=0.0) for _ in range(a.trials)]
        out["baseline_window_s"] = statistics.median(r["window_s"] for r in base)
        for hold in holds:
            reps = [trial(ms, hold_s=hold) for _ in range(a.trials)]
            ok = [r for r in reps if r["consistent"]]
            out[f"a_hold_{hold:g}"] = {
                "consistent": f"{len(ok)}/{len(reps)}",
                "cuts_ok": all(r.get("cut_consistent", False) for r in ok),
                "window_s": statistics.median(r["window_s"] for r in reps if r["window_s"]),
                "skew_s": statistics.median(r["skew_s"] for r in reps if r["skew_s"] is not None),
                "overlap_s": [round(r["overlap_s"], 4) for r in reps if r["overlap_s"] is not None],
            }
            out[f"a_hold_{hold:g}"]["ratio"] = (
                out[f"a_hold_{hold:g}"]["window_s"] / out["baseline_window_s"]
            )
        dest = f.base / "array"
        dest.mkdir()
        copy = "; ".join(
            f"nsenter --mount=/proc/{h.pid}/ns/mnt -- cat {h.data.mountpoint}/bench.log "
            f"> {dest}/{h.name}"
            for h in f.hosts
        )
        reps = [trial(ms, mode="command", command=["sh", "-c", copy]) for _ in range(a.trials)]
        out["b"] = {
            "consistent": f"{sum(r['consistent'] for r in reps)}/{len(reps)}",
            "window_s": statistics.median(r["window_s"] for r in reps if r["window_s"]),
            "skew_s": statistics.median(r["skew_s"] for r in reps if r["skew_s"] is not None),
        }
        w.stop()
    out["load"] = Path("/proc/loadavg").read_text().split()[:3]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
