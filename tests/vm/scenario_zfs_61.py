"""ZFS on Debian's 6.1 kernel with the DKMS-built module (runs inside the VM as root).

A pool on a file with two datasets under one writer that appends record n to both in
turn: ``snapshot create --provider zfs`` takes both snapshots in ONE ``zfs snapshot``
command without any freeze, the snapshots show one instant, list and delete work, and
FIFREEZE on ZFS is EOPNOTSUPP.
"""

from __future__ import annotations

import errno
import os
import time

from scenario_common import (
    PairWriter,
    check_records,
    expect,
    log,
    modprobe,
    records,
    result,
    run_main,
    sh,
)

from quiesce import snapshot as snapshots
from quiesce.errors import UsageError
from quiesce.freezing.plan import GroupMember
from quiesce.host import kernel
from quiesce.host.mounts import MountTable, resolve
from quiesce.providers.base import Snapshot
from quiesce.providers.zfs import LIST_FIELDS, ZfsProvider

POOL = "qz"
STATE = "/tmp/quiesce-state"


def setup() -> None:
    t0 = time.monotonic()
    modprobe("zfs")
    result("zfs_modprobe_s", f"{time.monotonic() - t0:.2f}")
    with open("/tmp/zpool.img", "wb") as f:
        f.truncate(256 << 20)
    sh("zpool", "create", "-f", "-m", "none", POOL, "/tmp/zpool.img")
    for ds in ("one", "two"):
        sh("zfs", "create", "-o", f"mountpoint=/tmp/q/{ds}", f"{POOL}/{ds}")


def fifreeze_unsupported() -> None:
    fd = kernel.open_dir("/tmp/q/one")
    try:
        code = kernel.freeze_errno(fd)
    finally:
        os.close(fd)
    expect(code == errno.EOPNOTSUPP, f"FIFREEZE on zfs: {errno.errorcode.get(code, code)}")


def group_snapshot() -> None:
    writer = PairWriter(["/tmp/q/one/records.log", "/tmp/q/two/records.log"])
    writer.start()
    time.sleep(1.0)
    acked = writer.acked
    prov = ZfsProvider()
    t0 = time.monotonic()
    man = snapshots.create(["/tmp/q/one", "/tmp/q/two"], prov, job="vmzfs", state_dir=STATE)
    result("zfs_group_create_s", f"{time.monotonic() - t0:.2f}")
    calls = prov._commands  # what snapshot() ran
    time.sleep(0.3)
    writer.stop()
    expect(not writer.errors, f"writer had no errors ({writer.errors})")
    expect(man.freeze_mode == "none" and man.window is None, "no freeze (ZFS has none)")
    expect(len(calls) == 1 and calls[0][1] == "snapshot", f"one zfs snapshot command: {calls}")
    snaps = man.snapshot_objects()
    names = sorted(s.location for s in snaps)
    expect(sorted(calls[0][-2:]) == names, f"both snapshots in that command: {names}")
    expect(all(s.extra["one_instant"] for s in snaps), "records say: one instant")
    log(f"consistency {man.consistency}: {man.consistency_reason}")
    expect(man.consistency == "atomic", "atomic")

    seen = {}
    for s in snaps:
        ds = s.extra["dataset"]
        path = f"/tmp/q/{ds.split('/')[-1]}/.zfs/snapshot/{s.location.split('@')[1]}/records.log"
        seen[ds] = records(path)
        check_records(seen[ds], acked, f"snapshot {s.location}")
    n1, n2 = len(seen[f"{POOL}/one"]), len(seen[f"{POOL}/two"])
    result("zfs_records", f"{n1},{n2}")
    expect(0 <= n1 - n2 <= 1, f"one instant across both datasets: {n1} vs {n2} records")

    listed = {s.location for s in prov.list_snapshots()}
    expect(set(names) <= listed, f"list_snapshots finds both ({sorted(listed)})")
    raw = sh("zfs", "list", "-H", "-p", "-t", "snapshot", "-o", ",".join(LIST_FIELDS)).stdout
    log(f"zfs list -H -p:\n{raw.rstrip()}")

    # a second snapshot under the same name is refused in prepare, before the window
    table = MountTable.read()
    targets = [resolve(p, table) for p in ("/tmp/q/one", "/tmp/q/two")]
    try:
        ZfsProvider().prepare([GroupMember(t.volume, [t]) for t in targets], man.id)
    except UsageError as e:
        expect("already exists" in e.message, f"same name refused: {e.message}")
    else:
        raise AssertionError("prepare accepted an existing snapshot name")
    finally:
        for t in targets:
            t.close()

    # delete refuses what quiesce did not make, and never destroys a dataset
    sh("zfs", "snapshot", f"{POOL}/one@manual")
    for loc in (f"{POOL}/one@manual", f"{POOL}/one"):
        foreign = Snapshot("x/y", "zfs", "/tmp/q/one", "", "zfs", 0.0, loc)
        try:
            prov.delete(foreign)
        except UsageError as e:
            log(f"delete {loc} refused: {e.message}")
        else:
            raise AssertionError(f"delete of {loc} was not refused")
    expect(f"{POOL}/one@manual" in sh("zfs", "list", "-H", "-t", "snapshot").stdout, "kept")

    snapshots.delete(man.id, STATE)
    left = sh("zfs", "list", "-H", "-p", "-t", "snapshot", "-o", "name").stdout.split()
    expect(left == [f"{POOL}/one@manual"], f"delete destroyed both snapshots (left: {left})")


def main() -> None:
    setup()
    try:
        fifreeze_unsupported()
        group_snapshot()
    finally:
        sh("zpool", "destroy", "-f", POOL, check=False)


if __name__ == "__main__":
    run_main(main)
