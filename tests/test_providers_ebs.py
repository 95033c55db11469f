"""ebs provider: EC2 CreateSnapshots inside the freeze window.

There is no AWS here: EC2 is mocked in-process with moto (``mock_aws``), the only mock
in these tests. The filesystems, the freeze and the thaw are real (ext4 on loop
devices); the NVMe device -> volume id mapping reads a fake sysfs directory whose
``block/<dev>/device/serial`` files hold the moto volume ids as EBS would show them.
"""

from __future__ import annotations

from pathlib import Path

import boto3
import pytest
from moto import mock_aws

from quiesce import snapshot as snapshots
from quiesce.errors import UsageError
from quiesce.providers.ebs import disk_of, instance_id_from_sysfs, parse_tags, volume_id_from_sysfs

REGION = "eu-west-1"


def _fake_serial(sysfs: Path, dev: str, serial: str) -> None:
    d = sysfs / "block" / disk_of(dev) / "device"
    d.mkdir(parents=True)
    (d / "serial").write_text(serial.ljust(20) + "\n")  # NVMe pads the serial


def test_device_to_volume_mapping(tmp_path):
    _fake_serial(tmp_path, "/dev/nvme1n1", "vol0123456789abcdef0")
    _fake_serial(tmp_path, "/dev/nvme0n1", "S4EWNX0R123456")  # a local SSD, not EBS
    assert volume_id_from_sysfs("/dev/nvme1n1", tmp_path) == "vol-0123456789abcdef0"
    assert volume_id_from_sysfs("/dev/nvme1n1p2", tmp_path) == "vol-0123456789abcdef0"
    assert volume_id_from_sysfs("/dev/nvme0n1", tmp_path) is None
    assert volume_id_from_sysfs("/dev/nvme9n1", tmp_path) is None
    assert disk_of("/dev/xvdf1") == "xvdf"
    dmi = tmp_path / "devices/virtual/dmi/id"
    dmi.mkdir(parents=True)
    (dmi / "board_asset_tag").write_text("i-0abc1234def567890\n")
    assert instance_id_from_sysfs(tmp_path) == "i-0abc1234def567890"
    assert parse_tags("team=db, env=prod") == {"team": "db", "env": "prod"}
    with pytest.raises(UsageError):
        parse_tags("novalue")


@pytest.fixture
def ec2(monkeypatch):
    for k in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")  # saves seconds
    with mock_aws():
        yield boto3.client("ec2", region_name=REGION)


def _instance_with_volumes(ec2, n: int) -> tuple[str, list[str]]:
    inst = ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1)["Instances"][0]
    vols = []
    for i in range(n):
        v = ec2.create_volume(Size=1, AvailabilityZone=inst["Placement"]["AvailabilityZone"])
        ec2.attach_volume(VolumeId=v["VolumeId"], InstanceId=inst["InstanceId"],
                          Device=f"/dev/sd{'fgh'[i]}")  # fmt: skip
        vols.append(v["VolumeId"])
    return inst["InstanceId"], vols


def test_create_snapshots_of_the_group_only(ec2, loopfs, tmp_path):
    """Two of three data volumes are in the group; moto ignores ExcludeDataVolumeIds, so
    the provider must also remove the stray snapshot it did not ask for."""
    iid, vols = _instance_with_volumes(ec2, 3)
    a, b = loopfs("ext4"), loopfs("ext4")
    sysfs = tmp_path / "sys"
    _fake_serial(sysfs, a.device, vols[0].replace("-", ""))
    _fake_serial(sysfs, b.device, vols[1].replace("-", ""))
    options = {"region": REGION, "instance_id": iid, "sysfs_root": str(sysfs),
               "tags": "team=db", "wait_delay": 0.1}  # fmt: skip
    state = tmp_path / "state"
    man = snapshots.create([a.path, b.path], "ebs", job="aws", options=options, state_dir=state)

    assert man.window is not None and man.window["thawed_by"] == "controller"
    assert man.consistency == "atomic"  # the group frozen together: one instant
    got = {s.volume: s for s in man.snapshots}
    assert {v: got[v].extra["volume_id"] for v in got} == {a.path: vols[0], b.path: vols[1]}
    assert {s.extra["state"] for s in man.snapshots} == {"completed"}
    listed = ec2.describe_snapshots(Filters=[{"Name": "volume-id", "Values": vols}])["Snapshots"]
    assert sorted(s["SnapshotId"] for s in listed) == sorted(s.location for s in man.snapshots)
    for s in listed:
        tags = {t["Key"]: t["Value"] for t in s["Tags"]}
        assert tags == {"team": "db", "quiesce:snapshot": man.id}

    snapshots.delete(man.id, state)
    assert ec2.describe_snapshots(OwnerIds=["self"])["Snapshots"] == []
    assert snapshots.list_manifests(state) == []


def test_volume_not_attached_is_refused_before_the_freeze(ec2, loopfs, tmp_path):
    iid, _ = _instance_with_volumes(ec2, 1)
    fs = loopfs("ext4")
    sysfs = tmp_path / "sys"
    _fake_serial(sysfs, fs.device, "vol0000000000000000a")
    options = {"region": REGION, "instance_id": iid, "sysfs_root": str(sysfs)}
    with pytest.raises(UsageError, match="not an EBS volume of"):
        snapshots.create([fs.path], "ebs", options=options, state_dir=tmp_path / "s")
    assert ec2.describe_snapshots(OwnerIds=["self"])["Snapshots"] == []
