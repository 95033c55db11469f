"""The lvm provider's pure parts, on the host (no device-mapper here; the real LVM runs are
in tests/vm). The ``lvs`` JSON below was captured from lvm2 2.03.16 in the 6.12 VM
(scenario_lvm_612.py prints it), after quiesce made a thick and a thin snapshot."""

from __future__ import annotations

from pathlib import Path

import pytest

from quiesce.errors import UnsafePlan, UsageError
from quiesce.freezing.plan import GroupMember
from quiesce.host.mounts import Mount, MountRoot, Volume
from quiesce.providers.base import FreezeMode
from quiesce.providers.lvm import (
    LvmProvider,
    dm_name_of,
    join_dm_name,
    kernel_nests_dm_freeze,
    mount_options_for,
    orphan_layers,
    parse_lvs_json,
    size_args,
    snapshot_bytes,
    snapshot_lv_name,
    split_dm_name,
)
from quiesce.providers.registry import get_provider

LVS_JSON = """\
  {
      "report": [
          {
              "lv": [
                  {"vg_name":"vgq", "lv_name":"a", "lv_attr":"owi-aos---", "lv_size":"67108864", "pool_lv":"", "origin":"", "lv_tags":"", "lv_time":"2026-11-26 07:58:58 +0000", "lv_kernel_major":"254", "lv_kernel_minor":"0", "vg_free":"411041792"},
                  {"vg_name":"vgq", "lv_name":"a-vm612-20261126T075930Z", "lv_attr":"swi-a-s---", "lv_size":"37748736", "pool_lv":"", "origin":"a", "lv_tags":"quiesce", "lv_time":"2026-11-26 07:59:32 +0000", "lv_kernel_major":"254", "lv_kernel_minor":"8", "vg_free":"411041792"},
                  {"vg_name":"vgq", "lv_name":"pool", "lv_attr":"twi-aotz--", "lv_size":"100663296", "pool_lv":"", "origin":"", "lv_tags":"", "lv_time":"2026-11-26 07:59:04 +0000", "lv_kernel_major":"254", "lv_kernel_minor":"3", "vg_free":"411041792"},
                  {"vg_name":"vgq", "lv_name":"x", "lv_attr":"Vwi-aotz--", "lv_size":"335544320", "pool_lv":"pool", "origin":"", "lv_tags":"", "lv_time":"2026-11-26 07:59:17 +0000", "lv_kernel_major":"254", "lv_kernel_minor":"5", "vg_free":"411041792"},
                  {"vg_name":"vgq", "lv_name":"x-vm612-20261126T075930Z", "lv_attr":"Vwi-a-tz-k", "lv_size":"335544320", "pool_lv":"pool", "origin":"x", "lv_tags":"quiesce", "lv_time":"2026-11-26 07:59:40 +0000", "lv_kernel_major":"254", "lv_kernel_minor":"9", "vg_free":"411041792"}
              ]
          }
      ]
  }
"""  # noqa: E501


def member(mount_point: str, dev: str, fstype: str = "ext4", source: str = "") -> GroupMember:
    """A resolved group member for a volume that only exists on paper (no fd)."""
    m = Mount(1, 0, dev, "/", mount_point, ("rw",), (), fstype, source or "/dev/x", ("rw",))
    vol = Volume(dev, fstype, m.source, [m])
    return GroupMember(vol, [MountRoot(mount_point, -1, m, vol)])


@pytest.mark.parametrize(
    ("release", "nests"),
    [
        ("6.1.0-56-amd64", False),  # measured in the VM: EBUSY
        ("6.7.12", False),
        ("6.8.0-31-generic", True),
        ("6.12.117+deb12-amd64", True),  # measured in the VM: nests
        ("6.18.44-fc-v657", True),
        ("7.2.13", True),
        ("5.10.0-30-amd64", False),
        ("not-a-version", False),
    ],
)
def test_kernel_nesting_decision(release: str, nests: bool) -> None:
    assert kernel_nests_dm_freeze(release) is nests


@pytest.mark.parametrize(
    ("dm", "vg_lv"),
    [
        ("vgq-a", ("vgq", "a")),
        ("my--vg-my--lv", ("my-vg", "my-lv")),
        ("vg-a-vm61-20261126T070847Z", ("vg", "a-vm61-20261126T070847Z")),
        ("nodash", None),
        ("-lv", None),
        ("vg-", None),
    ],
)
def test_split_dm_name(dm: str, vg_lv: tuple[str, str] | None) -> None:
    assert split_dm_name(dm) == vg_lv


def test_join_dm_name_is_the_inverse() -> None:
    assert join_dm_name("my-vg", "my-lv") == "my--vg-my--lv"
    assert join_dm_name("vgq", "b", "real") == "vgq-b-real"
    assert split_dm_name(join_dm_name("a-b", "c-d")) == ("a-b", "c-d")


def test_dm_name_from_sysfs(tmp_path: Path) -> None:
    d = tmp_path / "dev/block/254:1/dm"
    d.mkdir(parents=True)
    (d / "name").write_text("vgq-b\n")
    assert dm_name_of("254:1", sys_root=str(tmp_path)) == "vgq-b"
    assert dm_name_of("7:0", sys_root=str(tmp_path)) is None  # a loop device: no dm/


def test_parse_lvs_json_real_output() -> None:
    rows = {r.lv: r for r in parse_lvs_json(LVS_JSON)}
    a, x = rows["a"], rows["x"]
    snap, xsnap = rows["a-vm612-20261126T075930Z"], rows["x-vm612-20261126T075930Z"]
    assert (a.vg, a.dev, a.size, a.vg_free) == ("vgq", "254:0", 64 << 20, 411041792)
    assert not a.is_thin and not a.is_thick_snapshot and a.attr.startswith("o")
    assert snap.is_thick_snapshot and snap.origin == "a" and snap.tags == ("quiesce",)
    assert x.is_thin and x.pool == "pool" and x.dev == "254:5"
    assert xsnap.is_thin and xsnap.origin == "x" and xsnap.attr.endswith("k")  # skip flag
    assert not rows["pool"].is_thin  # the pool itself is not a thin volume


def test_parse_lvs_json_inactive_lv_has_no_dev() -> None:
    """lvs reports kernel major/minor -1 for an inactive LV (a thin snapshot before -K)."""
    text = LVS_JSON.replace('"lv_kernel_major":"254", "lv_kernel_minor":"9"',
                            '"lv_kernel_major":"-1", "lv_kernel_minor":"-1"')  # fmt: skip
    assert {r.lv: r.dev for r in parse_lvs_json(text)}["x-vm612-20261126T075930Z"] is None


def test_snapshot_names_are_valid_and_predictable() -> None:
    assert snapshot_lv_name("data", "nightly-20250520T101500Z") == "data-nightly-20250520T101500Z"
    assert snapshot_lv_name("data", "a b/c") == "data-a_b_c"
    assert len(snapshot_lv_name("x" * 100, "y" * 100)) <= 120


def test_size_arguments() -> None:
    assert size_args("20%ORIGIN") == ["--extents", "20%ORIGIN"]
    assert size_args("512M") == ["--size", "512M"]
    assert size_args("2") == ["--size", "2"]
    with pytest.raises(UsageError, match="bad LVM snapshot size"):
        size_args("lots")
    origin = parse_lvs_json(LVS_JSON)[0]
    assert snapshot_bytes("50%ORIGIN", origin) == 32 << 20
    assert snapshot_bytes("1G", origin) == 1 << 30
    assert snapshot_bytes("16", origin) == 16 << 20  # lvcreate's default unit is MiB
    assert snapshot_bytes("10%VG", origin) is None


def test_mount_options_per_filesystem() -> None:
    assert mount_options_for("xfs") == ["nouuid", "norecovery"]
    assert mount_options_for("ext4") == []


def test_orphan_layers_after_failed_lvcreate() -> None:
    """What 6.1 left after FIFREEZE + lvcreate -s: vgq-b-real, no LV owning it."""
    names = ["vgq-a", "vgq-b", "vgq-b-real"]
    assert orphan_layers(names, "vgq", "b", ["b-s1"], origin_is_origin=False) == ["vgq-b-real"]
    # the origin still has other snapshots: its -real layer is in use and is kept
    assert orphan_layers(names, "vgq", "b", ["b-s1"], origin_is_origin=True) == []
    names2 = ["vgq-b", "vgq-b--s1", "vgq-b--s1-cow", "vgq-b-real"]
    assert orphan_layers(names2, "vgq", "b", ["b-s1"], origin_is_origin=False) == names2[1:]


def test_freeze_mode_one_lv_is_provider_group_is_fifreeze() -> None:
    prov = LvmProvider()
    a, b = member("/srv/a", "254:0"), member("/srv/b", "254:1")
    assert prov.freeze_mode([a]) is FreezeMode.PROVIDER
    assert prov.freeze_mode([a, b]) is FreezeMode.FIFREEZE


def test_group_refused_on_old_kernel_before_touching_anything() -> None:
    """The kernel gate runs before any lvs/lvcreate: this host has no LVM at all."""
    prov = LvmProvider(kernel="6.1.0-56-amd64")
    with pytest.raises(UnsafePlan) as e:
        prov.check([member("/srv/a", "254:0"), member("/srv/b", "254:1")])
    assert ">= 6.8" in e.value.message and "6.1.0-56-amd64" in e.value.message
    assert e.value.hint


def test_bad_size_refused_in_check() -> None:
    with pytest.raises(UsageError, match="bad LVM snapshot size"):
        LvmProvider(size="huge").check([member("/srv/a", "254:0")])


def test_registered_as_builtin() -> None:
    assert get_provider("lvm") is LvmProvider


def test_snapshot_mount_of_an_lvm_snapshot_block_device(tmp_path: Path) -> None:
    """A loop device stands in for /dev/vg/<snap> (no device-mapper on this host): the
    manifest is what the lvm provider writes; ``snapshot mount`` should mount it ro."""
    from conftest import losetup, run

    from quiesce import snapshot as snapshots

    image = tmp_path / "snap.img"
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    run("mkfs.ext4", "-q", "-F", str(image))
    dev = losetup(image)
    target = tmp_path / "mnt"
    state = tmp_path / "state"
    snap = {
        "id": "t-20260101T000000Z/srv-a", "provider": "lvm", "volume": "/srv/a",
        "dev": "254:0", "fstype": "ext4", "created": 0.0, "location": dev,
        "extra": {"vg": "vgq", "lv": "a-t-20260101T000000Z", "origin": "vgq/a", "thin": False},
    }  # fmt: skip
    man = snapshots.Manifest.from_dict(dict(
        id="t-20260101T000000Z", job="t", provider="lvm", created="2026-01-01T00:00:00Z",
        volumes=[], snapshots=[snap], window=None, freeze_mode="provider",
        consistency="filesystem", consistency_reason="test", phases=[],
    ))  # fmt: skip
    (state / "snapshots").mkdir(parents=True)
    (state / "snapshots" / f"{man.id}.json").write_text(man.to_json())
    try:
        assert snapshots.mount(man.id, target, state_dir=state) == [str(target)]
        assert "ro" in run("findmnt", "-n", "-o", "OPTIONS", str(target)).stdout.split(",")
        # umount also detaches the read-only loop device the mount put over the snapshot
        assert snapshots.umount(str(target), state_dir=state) == [str(target)]
        # (by its backing: a name test matched /dev/loop1 in /dev/loop10's line when
        # another user had more loop devices: load run 3)
        assert f"({dev})" not in run("losetup", "-a").stdout
    finally:
        run("umount", str(target), check=False)
        for line in run("losetup", "-a").stdout.splitlines():  # a read-only loop over dev
            if f"({dev})" in line:
                run("losetup", "-d", line.split(":")[0], check=False)
        run("losetup", "-d", dev, check=False)
