"""The zfs provider's pure parts, on the host (this kernel cannot load ZFS; the real ZFS
runs are in tests/vm). The ``zfs list -H -p`` text is in the format zfs 2.1.11 printed in
the 6.1 VM: tab-separated, raw numbers, ``-`` for an unset property."""

from __future__ import annotations

import pytest

from quiesce.errors import UsageError
from quiesce.freezing.plan import GroupMember
from quiesce.host.mounts import Mount, MountRoot, Volume
from quiesce.providers.base import FreezeMode, Snapshot
from quiesce.providers.registry import get_provider
from quiesce.providers.zfs import (
    LIST_FIELDS,
    ZfsProvider,
    group_by_pool,
    parse_zfs_list,
    pool_of,
    snapshot_suffix,
)

ZFS_LIST = (  # two rows as printed in the VM, plus one snapshot quiesce did not make
    "qz/one@vmzfs-20261126T075816Z\t1795679897\t0\t25088\tvmzfs-20261126T075816Z\n"
    "qz/one@manual\t1795679901\t0\t25088\t-\n"
    "qz/two@vmzfs-20261126T075816Z\t1795679897\t0\t25088\tvmzfs-20261126T075816Z\n"
)


def member(mount_point: str, fstype: str, source: str, dev: str = "0:50") -> GroupMember:
    m = Mount(1, 0, dev, "/", mount_point, ("rw",), (), fstype, source, ("rw",))
    vol = Volume(dev, fstype, source, [m])
    return GroupMember(vol, [MountRoot(mount_point, -1, m, vol)])


def test_parse_zfs_list() -> None:
    rows = parse_zfs_list(ZFS_LIST)
    assert [r["name"] for r in rows] == [
        "qz/one@vmzfs-20261126T075816Z",
        "qz/one@manual",
        "qz/two@vmzfs-20261126T075816Z",
    ]
    assert rows[0]["creation"] == "1795679897" and rows[0]["referenced"] == "25088"
    assert rows[1]["quiesce:name"] == "-"  # not made by quiesce
    assert parse_zfs_list("") == []


def test_parse_zfs_list_refuses_a_wrong_column_count() -> None:
    with pytest.raises(ValueError, match="expected 5 columns"):
        parse_zfs_list("qz/one@x\t1\n", LIST_FIELDS)


def test_pools_and_one_command_per_pool() -> None:
    assert pool_of("tank/a/b") == "tank" and pool_of("tank@s") == "tank"
    assert group_by_pool(["tank/a", "rpool/b", "tank/c"]) == {
        "tank": ["tank/a", "tank/c"],
        "rpool": ["rpool/b"],
    }


def test_snapshot_suffix_is_a_valid_component() -> None:
    assert snapshot_suffix("nightly-20250520T101500Z") == "nightly-20250520T101500Z"
    assert snapshot_suffix("a b/c@d") == "a_b_c_d"


def test_never_freezes() -> None:
    prov = ZfsProvider()
    assert prov.freeze_mode([member("/tank/a", "zfs", "tank/a")]) is FreezeMode.NONE


def test_check_refuses_a_non_zfs_volume() -> None:
    with pytest.raises(UsageError, match="not a ZFS dataset"):
        ZfsProvider().check([member("/srv/x", "ext4", "/dev/loop3", "7:3")])


def test_delete_never_destroys_a_dataset() -> None:
    """A location without '@' is refused before any zfs command runs."""
    snap = Snapshot("x/tank-a", "zfs", "/tank/a", "0:50", "zfs", 0.0, "tank/a")
    with pytest.raises(UsageError, match="not a ZFS snapshot name"):
        ZfsProvider().delete(snap)


def test_registered_as_builtin() -> None:
    assert get_provider("zfs") is ZfsProvider
