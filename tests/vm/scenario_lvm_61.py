"""LVM on Debian's 6.1 kernel (runs inside the VM as root; see test_vm_tier.py).

1. One LV under a writer: ``snapshot create --provider lvm`` works without FIFREEZE
   (LVM's dm suspend freezes the fs), and the snapshot is clean and holds every record
   acknowledged before it.
2. A group of two LVs is refused before anything is touched (no new LV), naming the
   kernel requirement.
3. The raw kernel behaviour behind that: with FIFREEZE held, ``lvcreate -s`` fails with
   EBUSY; the provider removes the half-made LV (after the thaw, via abort()).
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
    writable,
)

from quiesce import snapshot as snapshots
from quiesce.errors import QuiesceError, UnsafePlan, UsageError
from quiesce.freezing.plan import make_plan
from quiesce.host import kernel
from quiesce.providers.lvm import LvmProvider, kernel_nests_dm_freeze

VG = "vgq"
STATE = "/tmp/quiesce-state"


def setup() -> None:
    modprobe("dm_mod", "dm_snapshot")
    pv = loop_image("pv", 400)
    sh("pvcreate", "-q", pv)
    sh("vgcreate", "-q", VG, pv)
    for lv in ("a", "b"):
        sh("lvcreate", "-q", "-y", "-L", "64M", "-n", lv, VG)
        mkfs_mount(f"/dev/{VG}/{lv}", "ext4", f"/tmp/q/{lv}")


def one_lv() -> None:
    writer = PairWriter(["/tmp/q/a/records.log"])
    writer.start()
    time.sleep(1.0)
    acked = writer.acked
    t0 = time.monotonic()
    man = snapshots.create(["/tmp/q/a"], "lvm", job="vm61", state_dir=STATE, timeout=120)
    result("lvm61_one_lv_create_s", f"{time.monotonic() - t0:.2f}")
    log("phases: " + ", ".join(f"{x['phase']} {x['duration_s']:.1f}s" for x in man.phases))
    time.sleep(0.5)
    writer.stop()
    expect(not writer.errors, f"writer had no errors ({writer.errors})")
    expect(man.freeze_mode == "provider", f"freeze mode is provider ({man.freeze_mode})")
    expect(man.window is None, "quiesce did not FIFREEZE (LVM froze the fs itself)")
    expect(man.consistency == "atomic", f"consistency {man.consistency}")
    (snap,) = man.snapshot_objects()
    log(f"snapshot {snap.id} at {snap.location}: {man.consistency_reason}")
    expect(snap.location.startswith(f"/dev/{VG}/a-vm61-"), f"predictable name {snap.location}")
    row = sh("lvs", "--noheadings", "-o", "lv_attr,origin,lv_tags", snap.location).stdout.split()
    expect(row[0].startswith("s") and row[1] == "a" and "quiesce" in row[2], f"lvs: {row}")
    # A snapshot of a filesystem that LVM froze needs no journal recovery.
    features = sh("dumpe2fs", "-h", snap.location).stdout
    expect("needs_recovery" not in features, "snapshot ext4 has no needs_recovery")
    sh("e2fsck", "-fn", snap.location)
    log("e2fsck -fn: clean")
    opts = ",".join(["ro", *LvmProvider().mount_options(snap)])
    os.makedirs("/tmp/q/snap-a", exist_ok=True)
    sh("mount", "-o", opts, snap.location, "/tmp/q/snap-a")
    try:
        check_records(records("/tmp/q/snap-a/records.log"), acked, "LV snapshot")
    finally:
        sh("umount", "/tmp/q/snap-a")
    with make_plan(["/tmp/q/a"]) as plan:
        try:
            LvmProvider().prepare(plan.members, man.id)
        except UsageError as e:
            expect("already exists" in e.message, f"same name refused: {e.message}")
        else:
            raise AssertionError("prepare accepted an existing snapshot LV name")
    listed = [s.location for s in LvmProvider().list_snapshots()]
    expect(snap.location in listed, f"list_snapshots finds it ({listed})")
    snapshots.delete(man.id, STATE)
    expect(snap.extra["lv"] not in lv_names(VG), "delete removed the LV")


def group_refused() -> None:
    expect(not kernel_nests_dm_freeze(os.uname().release), "6.1 does not nest dm freezes")
    before = lv_names(VG)
    manifests = [m.id for m in snapshots.list_manifests(STATE)]
    try:
        snapshots.create(["/tmp/q/a", "/tmp/q/b"], "lvm", job="vm61grp", state_dir=STATE)
    except UnsafePlan as e:
        log(f"refused: {e.message} (hint: {e.hint})")
        expect(">= 6.8" in e.message and os.uname().release in e.message, "names the kernel")
    else:
        raise AssertionError("a group of two LVs was not refused on 6.1")
    expect(lv_names(VG) == before, "no LV was created or left behind")
    expect([m.id for m in snapshots.list_manifests(STATE)] == manifests, "no manifest written")


def raw_fifreeze_then_lvcreate() -> None:
    """What the refusal protects against: FIFREEZE held across lvcreate -s on 6.1."""
    before = lv_names(VG)
    prov = LvmProvider()
    with make_plan(["/tmp/q/b"]) as plan:
        prov.check(plan.members)
        prov.prepare(plan.members, "raw61")
        fd = plan.members[0].fd
        kernel.fifreeze(fd, "/tmp/q/b", "ext4")
        try:
            t0 = time.monotonic()
            try:
                prov.snapshot(plan.members)
            except QuiesceError as e:
                result("lvm61_lvcreate_under_fifreeze_s", f"{time.monotonic() - t0:.2f}")
                log(f"lvcreate under FIFREEZE failed: {e.message}")
                stderr = getattr(e, "stderr", "")
                expect("busy" in stderr.lower(), f"the dm suspend got EBUSY: {stderr!r}")
            else:
                raise AssertionError("lvcreate -s under FIFREEZE succeeded on 6.1")
            log("dmsetup table while frozen:\n" + sh("dmsetup", "table").stdout)
            half = lv_names(VG) - before
            log(f"LVs left while still frozen: {sorted(half) or 'none'}")
            result("lvm61_half_made_lvs_in_window", ",".join(sorted(half)) or "none")
        finally:
            kernel.fithaw(fd, "/tmp/q/b", "ext4")
        prov.abort()
    expect(lv_names(VG) == before, "no half-made LV is left after the thaw and abort()")
    log("dmsetup table after abort:\n" + sh("dmsetup", "table").stdout)
    log("lvs -a:\n" + sh("lvs", "-a", "-o", "+lv_attr,devices").stdout)
    dm = sh("dmsetup", "info", "-c", "--noheadings", "-o", "name,suspended").stdout
    log(f"dm devices after abort(): {dm.split()}")
    states = dict(line.strip().split(":", 1) for line in dm.splitlines() if line.strip())
    expect(all(v == "Active" for v in states.values()), "no dm device left suspended")
    expect(sorted(n for n in states if n.startswith("vgq-b")) == ["vgq-b"], "no -real/-cow left")
    expect(writable("/tmp/q/b"), "/tmp/q/b is writable again (thawed, not suspended)")


def teardown() -> None:
    for mnt in ("/tmp/q/a", "/tmp/q/b"):
        sh("umount", mnt, check=False)
    sh("vgremove", "-q", "-f", VG, check=False)
    sh("losetup", "-D", check=False)


def main() -> None:
    setup()
    try:
        one_lv()
        group_refused()
        raw_fifreeze_then_lvcreate()
    finally:
        teardown()


if __name__ == "__main__":
    run_main(main)
