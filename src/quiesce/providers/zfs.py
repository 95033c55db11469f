"""ZFS snapshots: one ``zfs snapshot a@n b@n ...`` for the whole group.

ZFS has no FIFREEZE (EOPNOTSUPP; docs/kernel.md §2, openzfs/zfs#260) and needs none:
a snapshot is atomic, and all snapshots named in one ``zfs snapshot`` command are taken in
the same transaction group, one instant. That holds within one pool only, so a group that
spans pools gets one command per pool and its records say it is not one instant.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from quiesce.errors import QuiesceError, UsageError
from quiesce.freezing.plan import GroupMember
from quiesce.host import proc
from quiesce.providers.base import FreezeMode, Provider, Snapshot, volume_slug
from quiesce.providers.options import ZfsOptions

JOB_PROPERTY = "quiesce:name"  # user property set on every snapshot quiesce makes
LIST_FIELDS = ("name", "creation", "used", "referenced", JOB_PROPERTY)

_SNAP_NAME_BAD = re.compile(r"[^A-Za-z0-9_.:-]")


def snapshot_suffix(name: str) -> str:
    """A valid ZFS snapshot component for ``name`` (letters, digits, ``_.:-``)."""
    return _SNAP_NAME_BAD.sub("_", name) or "snap"


def parse_zfs_list(text: str, fields: Sequence[str] = LIST_FIELDS) -> list[dict[str, str]]:
    """Parse ``zfs list -H -p -o FIELDS``: tab-separated, one row a line, ``-`` = unset."""
    rows = []
    for line in text.splitlines():
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) != len(fields):
            raise ValueError(f"zfs list: expected {len(fields)} columns, got {line!r}")
        rows.append(dict(zip(fields, cols, strict=True)))
    return rows


def pool_of(dataset: str) -> str:
    return dataset.split("/", 1)[0].split("@", 1)[0]


def group_by_pool(datasets: Sequence[str]) -> dict[str, list[str]]:
    """Datasets per pool, in the caller's order: one ``zfs snapshot`` command each."""
    out: dict[str, list[str]] = {}
    for ds in datasets:
        out.setdefault(pool_of(ds), []).append(ds)
    return out


@dataclass
class _Planned:
    member: GroupMember
    dataset: str
    snap: str  # dataset@suffix


def _tool() -> str:
    path = shutil.which("zfs") or shutil.which("zfs", path="/usr/sbin:/sbin")
    if path is None:
        raise UsageError("zfs not found", "install zfsutils-linux and load the zfs module")
    return path


class ZfsProvider(Provider):
    """Snapshots each member's dataset; never freezes (FreezeMode.NONE)."""

    name = "zfs"

    Options: ClassVar[type[ZfsOptions]] = ZfsOptions
    config: ZfsOptions

    def __init__(
        self, options: ZfsOptions | Mapping[str, Any] | None = None, /, **kwargs: Any
    ) -> None:
        super().__init__(options, **kwargs)
        self.timeout = self.config.timeout
        self._planned: list[_Planned] = []
        self._commands: list[list[str]] = []
        self._name = ""

    def freeze_mode(self, members: Sequence[GroupMember]) -> FreezeMode:
        return FreezeMode.NONE  # FIFREEZE on ZFS is EOPNOTSUPP, and the snapshot is atomic

    def check(self, members: Sequence[GroupMember]) -> None:
        if not members:
            raise UsageError("no volumes to snapshot")
        for m in members:
            if m.volume.fstype != "zfs":
                raise UsageError(
                    f"{m.name} is {m.volume.fstype}, not a ZFS dataset",
                    "the zfs provider snapshots ZFS datasets; choose the provider for this storage",
                )
        _tool()

    def list_rows(self, *targets: str) -> list[dict[str, str]]:
        """``zfs list -H -p -t snapshot`` rows (of ``targets`` only, if given)."""
        argv = [_tool(), "list", "-H", "-p", "-t", "snapshot", "-o", ",".join(LIST_FIELDS)]
        p = proc.run_tool(*argv, *targets, timeout=self.timeout)
        errors = [ln for ln in p.stderr.splitlines() if ln.strip()]
        if p.returncode != 0 and not (targets and all("does not exist" in e for e in errors)):
            raise QuiesceError(f"zfs list failed: {p.stderr.strip()}", "is the pool imported?")
        return parse_zfs_list(p.stdout)  # the named ones that exist

    def prepare(self, members: Sequence[GroupMember], name: str) -> None:
        """Pick the snapshot names, refuse ones that exist, build the commands."""
        self._name = name
        suffix = snapshot_suffix(name)
        self._planned = [
            _Planned(m, m.volume.source, f"{m.volume.source}@{suffix}") for m in members
        ]
        datasets = [p.dataset for p in self._planned]
        clash = [r["name"] for r in self.list_rows(*(p.snap for p in self._planned))]
        if clash:
            raise UsageError(
                f"snapshot {', '.join(clash)} already exists",
                "choose another snapshot name, or delete the old snapshot first",
            )
        zfs = _tool()
        self._commands = [
            [zfs, "snapshot", "-o", f"{JOB_PROPERTY}={name}", *(f"{d}@{suffix}" for d in dss)]
            for dss in group_by_pool(datasets).values()
        ]
        # One command is one instant; one per pool is not (read by the manifest writer).
        self.group_atomic = len(self._commands) == 1

    def snapshot(self, members: Sequence[GroupMember]) -> list[Snapshot]:
        """One ``zfs snapshot`` per pool: every dataset of a pool in one instant."""
        now = time.time()
        for argv in self._commands:
            res = proc.run_tool(*argv, timeout=self.timeout)
            if res.returncode != 0:
                raise QuiesceError(
                    f"zfs snapshot failed: {res.stderr.strip() or res.returncode}",
                    "see `zfs list -t snapshot` and `zpool status`",
                )
        one_instant = len(self._commands) == 1
        pools = group_by_pool([p.dataset for p in self._planned])
        snaps = []
        for p in self._planned:
            together = [f"{d}@{p.snap.split('@', 1)[1]}" for d in pools[pool_of(p.dataset)]]
            snaps.append(
                Snapshot(
                    id=f"{self._name}/{volume_slug(p.member.name)}",
                    provider=self.name,
                    volume=p.member.name,
                    dev=p.member.volume.dev,
                    fstype="zfs",
                    created=now,
                    location=p.snap,
                    extra={
                        "dataset": p.dataset,
                        "snapshot": p.snap,
                        "atomic_with": together,
                        "one_instant": one_instant,
                        "consistency_reason": (
                            "one zfs snapshot command: every dataset in one transaction group"
                            if one_instant
                            else "one zfs snapshot command per pool: atomic within each pool, "
                            "not one instant across pools"
                        ),
                    },
                )
            )
        return snaps

    def delete(self, snap: Snapshot) -> None:
        """``zfs destroy`` of a snapshot (never a dataset: the name must contain ``@``)."""
        target = snap.location
        if "@" not in target:
            raise UsageError(f"{target!r} is not a ZFS snapshot name", "expected pool/fs@snap")
        rows = self.list_rows(target)
        if not rows:
            raise UsageError(f"snapshot {target} does not exist", "it was already deleted")
        if rows[0].get(JOB_PROPERTY, "-") == "-":
            raise UsageError(
                f"snapshot {target} was not made by quiesce (no {JOB_PROPERTY} property)",
                "quiesce deletes only the snapshots it made",
            )
        p = proc.run_tool(_tool(), "destroy", target, timeout=self.timeout)
        if p.returncode != 0:
            raise QuiesceError(f"zfs destroy {target} failed: {p.stderr.strip()}")

    def list_snapshots(self) -> list[Snapshot]:
        """Every snapshot carrying the quiesce property."""
        out = []
        for r in self.list_rows():
            job = r.get(JOB_PROPERTY, "-")
            if job == "-":
                continue
            dataset = r["name"].split("@", 1)[0]
            out.append(
                Snapshot(
                    id=f"{job}/{dataset.replace('/', '_')}",
                    provider=self.name,
                    volume="",
                    dev="",
                    fstype="zfs",
                    created=float(r["creation"]),
                    location=r["name"],
                    extra={"dataset": dataset, "snapshot": r["name"], "used": int(r["used"])},
                )
            )
        return out

    def mount_options(self, snap: Snapshot) -> list[str]:
        return []  # ZFS snapshots are read-only; mount with -t zfs pool/fs@snap
