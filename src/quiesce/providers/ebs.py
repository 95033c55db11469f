"""ebs: AWS EBS multi-volume snapshots of this instance (EC2 ``CreateSnapshots``).

``CreateSnapshots`` takes crash-consistent snapshots of several volumes of one instance
at one point in time; with the group frozen around the call they are filesystem-
consistent. Everything slow happens outside the window: ``prepare`` imports boto3,
resolves credentials, maps each mounted device to its volume id and builds the request;
``snapshot`` is the one API call; ``after_thaw`` waits for ``completed`` (a waiter, never
inside the window).

Device -> volume: on Nitro instances an EBS volume is an NVMe device whose serial
(``/sys/block/nvme1n1/device/serial``) is the volume id without its dash
(``vol0123...`` -> ``vol-0123...``). Xen ``xvdX``/``sdX`` devices are matched against the
instance's block device mappings. The instance id comes from ``--option instance_id`` or
the DMI board asset tag that Nitro instances carry.

Options (:class:`EbsOptions`): ``region``, ``profile``, ``instance_id``, ``tags`` (dict or
``k=v,k2=v2``), ``description``, ``copy_tags`` (copy the volumes' tags), ``wait`` (default
true), ``wait_delay`` (s, default 15), ``wait_attempts`` (default 80), ``sysfs_root``.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from quiesce.errors import QuiesceError, UsageError
from quiesce.freezing.plan import GroupMember
from quiesce.providers.base import FreezeMode, Provider, Snapshot, volume_slug
from quiesce.providers.options import EbsOptions

_NVME_PART = re.compile(r"^(nvme\d+n\d+)p\d+$")
_SD_PART = re.compile(r"^((?:xv|s)d[a-z]+)\d+$")
_VOL_SERIAL = re.compile(r"^vol-?([0-9a-f]{8,17})$")


def parse_tags(value: Any) -> dict[str, str]:
    """Tags from a dict or ``k=v,k2=v2``."""
    if value is None or value == "":
        return {}
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    tags = {}
    for part in str(value).split(","):
        key, sep, val = part.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"bad tag {part!r}", "write tags as key=value,key2=value2")
        tags[key.strip()] = val.strip()
    return tags


def disk_of(device: str) -> str:
    """``/dev/nvme1n1p2`` -> ``nvme1n1``; ``/dev/xvdf1`` -> ``xvdf``."""
    name = device.removeprefix("/dev/")
    for pat in (_NVME_PART, _SD_PART):
        m = pat.match(name)
        if m:
            return m.group(1)
    return name


def volume_id_from_sysfs(device: str, sysfs_root: str | Path = "/sys") -> str | None:
    """The EBS volume id of an NVMe block device, from its serial; None if not EBS."""
    serial_file = Path(sysfs_root) / "block" / disk_of(device) / "device" / "serial"
    try:
        serial = serial_file.read_text().strip()
    except OSError:
        return None
    m = _VOL_SERIAL.match(serial)
    return f"vol-{m.group(1)}" if m else None


def instance_id_from_sysfs(sysfs_root: str | Path = "/sys") -> str | None:
    """Nitro instances carry their instance id as the DMI board asset tag."""
    try:
        tag = (Path(sysfs_root) / "devices/virtual/dmi/id/board_asset_tag").read_text().strip()
    except OSError:
        return None
    return tag if tag.startswith("i-") else None


def _sd_name(name: str) -> str:
    return "sd" + name[3:] if name.startswith("xvd") else name


class EbsProvider(Provider):
    name: ClassVar[str] = "ebs"

    Options: ClassVar[type[EbsOptions]] = EbsOptions
    config: EbsOptions

    def __init__(
        self, options: EbsOptions | Mapping[str, Any] | None = None, /, **kwargs: Any
    ) -> None:
        super().__init__(options, **kwargs)
        self._client: Any = None
        self._errors: tuple[type[BaseException], ...] = ()
        self._request: dict[str, Any] = {}
        self._by_volume: dict[str, Snapshot] = {}
        self._strays: list[str] = []
        self._made: list[str] = []

    @property
    def sysfs_root(self) -> str:
        return str(self.config.sysfs_root)

    def freeze_mode(self, members: Sequence[GroupMember]) -> FreezeMode:
        return FreezeMode.FIFREEZE

    def _connect(self) -> Any:
        if self._client is None:
            try:
                import boto3
                import botocore.exceptions as bex
            except ImportError:
                raise UsageError(
                    "the ebs provider needs boto3", "pip install 'quiesce[ebs]'"
                ) from None
            session = boto3.session.Session(
                region_name=self.config.region, profile_name=self.config.profile
            )
            creds = session.get_credentials()
            if creds is None:
                raise UsageError(
                    "no AWS credentials found",
                    "use an instance profile, or set AWS_PROFILE / AWS_ACCESS_KEY_ID",
                )
            creds.get_frozen_credentials()  # resolve (and refresh) now, not in the window
            if session.region_name is None:
                raise UsageError("no AWS region", "--option region=eu-west-1 or AWS_REGION")
            self._client = session.client("ec2")
            self._errors = (bex.BotoCoreError, bex.ClientError)
        return self._client

    def _aws(self, what: str, call: Any, **kw: Any) -> Any:
        try:
            return call(**kw)
        except self._errors as e:
            raise QuiesceError(f"AWS {what} failed: {e}", "check the IAM permissions") from None

    def check(self, members: Sequence[GroupMember]) -> None:
        for m in members:
            if not m.volume.source.startswith("/dev/"):
                raise UsageError(f"{m.name} is on {m.volume.source}, not a block device")

    def prepare(self, members: Sequence[GroupMember], name: str) -> None:
        client = self._connect()
        instance_id = self.config.instance_id or instance_id_from_sysfs(self.sysfs_root)
        if not instance_id:
            raise UsageError(
                "cannot tell which EC2 instance this is", "--option instance_id=i-0123..."
            )
        pages = self._aws(
            "DescribeInstances",
            client.get_paginator("describe_instances").paginate(InstanceIds=[instance_id])
            .build_full_result,
        )  # fmt: skip
        inst = next((i for r in pages["Reservations"] for i in r["Instances"]), None)
        if inst is None:
            raise UsageError(f"instance {instance_id} not found")
        attached = {
            b["Ebs"]["VolumeId"]: b["DeviceName"]
            for b in inst.get("BlockDeviceMappings", [])
            if "Ebs" in b
        }
        by_dev_name = {_sd_name(Path(d).name): v for v, d in attached.items()}
        root_volume = next(
            (v for v, d in attached.items() if d == inst.get("RootDeviceName")), None
        )
        self._by_volume = {}
        for m in members:
            vol = volume_id_from_sysfs(m.volume.source, self.sysfs_root)
            vol = vol or by_dev_name.get(_sd_name(disk_of(m.volume.source)))
            if vol is None or vol not in attached:
                raise UsageError(
                    f"{m.name} ({m.volume.source}) is not an EBS volume of {instance_id}",
                    "the ebs provider snapshots EBS volumes attached to this instance",
                )
            self._by_volume[vol] = Snapshot(
                id=f"{name}/{volume_slug(m.name)}",
                provider=self.name,
                volume=m.name,
                dev=m.volume.dev,
                fstype=m.volume.fstype,
                created=0.0,
                location="",
                extra={"volume_id": vol, "instance_id": instance_id},
            )
        tags = {"quiesce:snapshot": name, **self.config.tags}
        spec: dict[str, Any] = {
            "InstanceId": instance_id,
            "ExcludeBootVolume": root_volume not in self._by_volume,
        }
        others = sorted(v for v in attached if v not in self._by_volume and v != root_volume)
        if others:
            spec["ExcludeDataVolumeIds"] = others
        self._request = {
            "InstanceSpecification": spec,
            "Description": self.config.description or f"quiesce {name}",
            "TagSpecifications": [
                {
                    "ResourceType": "snapshot",
                    "Tags": [{"Key": k, "Value": v} for k, v in tags.items()],
                }
            ],
        }
        if self.config.copy_tags:
            self._request["CopyTagsFromSource"] = "volume"

    def snapshot(self, members: Sequence[GroupMember]) -> list[Snapshot]:
        resp = self._aws("CreateSnapshots", self._client.create_snapshots, **self._request)
        now = time.time()
        out = []
        for s in resp.get("Snapshots", []):
            self._made.append(s["SnapshotId"])
            snap = self._by_volume.get(s["VolumeId"])
            if snap is None:
                self._strays.append(s["SnapshotId"])  # not ours: removed after the thaw
                continue
            snap.location, snap.created = s["SnapshotId"], now
            snap.extra["state"] = s.get("State")
            out.append(snap)
        missing = [v for v, snap in self._by_volume.items() if not snap.location]
        if missing:
            raise QuiesceError(f"CreateSnapshots returned no snapshot of {', '.join(missing)}")
        self._made = list(self._strays)
        return out

    def after_thaw(self, snaps: list[Snapshot]) -> None:
        for sid in self._strays:
            self._aws("DeleteSnapshot", self._client.delete_snapshot, SnapshotId=sid)
        self._strays = self._made = []
        if not snaps or not self.config.wait:
            return
        ids = [s.location for s in snaps]
        waiter = self._client.get_waiter("snapshot_completed")
        config = {
            "Delay": self.config.wait_delay,
            "MaxAttempts": self.config.wait_attempts,
        }
        try:
            waiter.wait(SnapshotIds=ids, WaiterConfig=config)
        except Exception as e:  # botocore.exceptions.WaiterError
            raise QuiesceError(
                f"the EBS snapshots did not complete: {e}", "see the EC2 console"
            ) from None
        pages = self._aws(
            "DescribeSnapshots",
            self._client.get_paginator("describe_snapshots").paginate(SnapshotIds=ids)
            .build_full_result,
        )  # fmt: skip
        state = {s["SnapshotId"]: s for s in pages["Snapshots"]}
        for snap in snaps:
            info = state.get(snap.location, {})
            snap.extra["state"] = info.get("State")
            snap.extra["progress"] = info.get("Progress")

    def abort(self) -> None:
        for sid in self._made:
            with contextlib.suppress(Exception):  # best effort while unwinding
                self._client.delete_snapshot(SnapshotId=sid)
        self._made = self._strays = []

    def delete(self, snap: Snapshot) -> None:
        client = self._connect()
        try:
            client.delete_snapshot(SnapshotId=snap.location)
        except self._errors as e:
            code = getattr(e, "response", {}).get("Error", {}).get("Code")
            if code != "InvalidSnapshot.NotFound":
                raise QuiesceError(f"AWS DeleteSnapshot {snap.location} failed: {e}") from None
