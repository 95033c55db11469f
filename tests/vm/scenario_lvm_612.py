"""LVM on Debian's 6.12 kernel (runs inside the VM as root; see test_vm_tier.py).

A group of two LVs (a thick-provisioned ext4 LV and a thin XFS LV) under one writer that
appends record n to both in turn: ``snapshot create --provider lvm`` holds one FIFREEZE
across both ``lvcreate -s`` calls (dm's freeze nests inside it on >= 6.8), and both
snapshots are clean, hold every record acknowledged before, and show one instant.
"""

from __future__ import annotations

import os
import time

from scenario_common import (
    PairWriter,
    check_records,
    expect,
    log,
    loop_image,
    lv_names,
    mkfs_mount,
    modprobe,
    records,
    result,
    run_main,
    sh,
)

from quiesce import snapshot as snapshots
from quiesce.providers.lvm import LVS_FIELDS, LvmProvider, kernel_nests_dm_freeze

VG = "vgq"
STATE = "/tmp/quiesce-state"


def setup() -> None:
    modprobe("dm_mod", "dm_snapshot", "dm_thin_pool")
    pv = loop_image("pv", 600)
    sh("pvcreate", "-q", pv)
    sh("vgcreate", "-q", VG, pv)
    sh("lvcreate", "-q", "-y", "-L", "64M", "-n", "a", VG)
    mkfs_mount(f"/dev/{VG}/a", "ext4", "/tmp/q/a")
    sh("lvcreate", "-q", "-y", "-L", "96M", "-T", f"{VG}/pool")
    sh("lvcreate", "-q", "-y", "-V", "320M", "-T", f"{VG}/pool", "-n", "x")
    mkfs_mount(f"/dev/{VG}/x", "xfs", "/tmp/q/x")


def group_of_two() -> None:
    expect(kernel_nests_dm_freeze(os.uname().release), "6.12 nests dm freezes")
    writer = PairWriter(["/tmp/q/a/records.log", "/tmp/q/x/records.log"])
    writer.start()
    time.sleep(1.0)
    acked = writer.acked
    t0 = time.monotonic()
    man = snapshots.create(
        ["/tmp/q/a", "/tmp/q/x"],
        "lvm",
        job="vm612",
        state_dir=STATE,
        timeout=120,
        options={"size": "50%ORIGIN"},
    )
    result("lvm612_group_create_s", f"{time.monotonic() - t0:.2f}")
    log("phases: " + ", ".join(f"{x['phase']} {x['duration_s']:.1f}s" for x in man.phases))
    time.sleep(0.5)
    writer.stop()
    expect(not writer.errors, f"writer had no errors ({writer.errors})")
    expect(man.freeze_mode == "fifreeze", f"freeze mode is fifreeze ({man.freeze_mode})")
    expect(man.window is not None, "quiesce held one FIFREEZE window")
    assert man.window is not None
    result("lvm612_window_s", f"{man.window['window_s']:.3f}")
    states = [v["state"] for v in man.window["volumes"]]
    expect(states == ["thawed", "thawed"], f"both frozen and thawed by quiesce ({states})")
    expect(man.consistency == "atomic", f"consistency {man.consistency}")
    log(f"consistency: {man.consistency_reason}")
    snaps = {s.volume: s for s in man.snapshot_objects()}
    a, x = snaps["/tmp/q/a"], snaps["/tmp/q/x"]
    expect(not a.extra["thin"] and x.extra["thin"], "thick snapshot of a, thin snapshot of x")
    expect(os.path.exists(x.location), f"thin snapshot activated: {x.location}")

    features = sh("dumpe2fs", "-h", a.location).stdout
    expect("needs_recovery" not in features, "ext4 snapshot has no needs_recovery")
    sh("e2fsck", "-fn", a.location)
    log("e2fsck -fn: clean")
    prov = LvmProvider()
    seen = {}
    for snap, mnt in ((a, "/tmp/q/snap-a"), (x, "/tmp/q/snap-x")):
        opts = ",".join(["ro", *prov.mount_options(snap)])
        os.makedirs(mnt, exist_ok=True)
        sh("mount", "-o", opts, snap.location, mnt)
        try:
            seen[mnt] = records(f"{mnt}/records.log")
        finally:
            sh("umount", mnt)
        check_records(seen[mnt], acked, f"snapshot of {snap.volume} ({opts})")
    # A frozen XFS has a covered but not clean log (docs/kernel.md §7): xfs_repair -n
    # on the untouched snapshot reports the log; after a trivial replay it is clean.
    repair = sh("xfs_repair", "-n", x.location, check=False)
    result("lvm612_xfs_repair_n_untouched_exit", repair.returncode)
    log(f"xfs_repair -n on the untouched XFS snapshot: exit {repair.returncode}")
    sh("mount", "-o", "nouuid", x.location, "/tmp/q/snap-x")
    expect(
        len(records("/tmp/q/snap-x/records.log")) == len(seen["/tmp/q/snap-x"]), "same after replay"
    )
    sh("umount", "/tmp/q/snap-x")
    repair = sh("xfs_repair", "-n", x.location, check=False)
    expect(repair.returncode == 0, f"xfs_repair -n after log replay: clean {repair.stdout[-600:]}")
    na, nx = len(seen["/tmp/q/snap-a"]), len(seen["/tmp/q/snap-x"])
    result("lvm612_records", f"{na},{nx}")
    expect(0 <= na - nx <= 1, f"one instant across both LVs: {na} vs {nx} records")

    # Real output for the host-side unit tests (tests/test_providers_lvm_unit.py).
    fields = LVS_FIELDS
    raw = sh("lvs", "--reportformat", "json", "--units", "b", "--nosuffix", "-o", fields).stdout
    log(f"lvs --reportformat json sample:\n{raw}")
    snapshots.delete(man.id, STATE)
    left = lv_names(VG)
    expect(a.extra["lv"] not in left and x.extra["lv"] not in left, "delete removed both")


def teardown() -> None:
    for mnt in ("/tmp/q/a", "/tmp/q/x"):
        sh("umount", mnt, check=False)
    sh("vgremove", "-q", "-f", VG, check=False)
    sh("losetup", "-D", check=False)


def main() -> None:
    setup()
    try:
        group_of_two()
    finally:
        teardown()


if __name__ == "__main__":
    run_main(main)
