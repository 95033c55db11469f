"""Order a group of volumes for freezing and find the hazards that make a plan unsafe.

Order rule (docs/kernel.md §5): a filesystem whose block device is a loop file on
another filesystem freezes *before* that backing filesystem and thaws *after* it; the
reverse order deadlocks in the kernel. Otherwise children freeze before parents.
"""

from __future__ import annotations

import contextlib
import heapq
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from quiesce.errors import UnsafePlan, UnsupportedFilesystem
from quiesce.host.mounts import MountRoot, MountTable, Volume, loop_backing_file, resolve

# Filesystems with no freeze_fs/freeze_super (docs/kernel.md §2).
UNFREEZABLE = frozenset(
    {
        "tmpfs", "ramfs", "overlay", "nfs", "nfs4", "vfat", "msdos", "exfat", "ntfs", "ntfs3",
        "squashfs", "erofs", "iso9660", "udf", "hfsplus", "proc", "sysfs", "devtmpfs", "devpts",
        "cgroup", "cgroup2", "zfs", "9p", "virtiofs", "ocfs2", "securityfs", "debugfs",
        "tracefs", "bpf", "pstore", "mqueue", "hugetlbfs", "autofs", "binfmt_misc", "configfs",
        "efivarfs", "fusectl",
    }
)  # fmt: skip


def is_unfreezable(fstype: str) -> bool:
    return fstype in UNFREEZABLE or fstype == "fuse" or fstype.startswith("fuse.")


@dataclass(frozen=True)
class Hazard:
    """Something about a plan that could hang the machine or quiesce itself."""

    kind: str  # "self", "root", "backing-outside-group"
    dev: str
    message: str
    refuse: bool  # refused unless allow_self


def freeze_order(
    nodes: Sequence[str],
    must_precede: Mapping[str, set[str]],
    depth: Mapping[str, int],
) -> list[str]:
    """Topological order of ``nodes``: ``a`` before every ``b`` in ``must_precede[a]``.

    Among the nodes that are free to go, deeper mounts go first (children before parents),
    then the caller's order. Raises ValueError on a cycle (impossible for loop devices).
    """
    index = {n: i for i, n in enumerate(nodes)}
    indegree = dict.fromkeys(nodes, 0)
    for a in nodes:
        for b in must_precede.get(a, ()):
            if b in indegree and b != a:
                indegree[b] += 1
    ready = [(-depth.get(n, 0), index[n], n) for n in nodes if indegree[n] == 0]
    heapq.heapify(ready)
    out: list[str] = []
    while ready:
        _, _, n = heapq.heappop(ready)
        out.append(n)
        for b in must_precede.get(n, ()):
            if b in indegree and b != n:
                indegree[b] -= 1
                if indegree[b] == 0:
                    heapq.heappush(ready, (-depth.get(b, 0), index[b], b))
    if len(out) != len(nodes):
        raise ValueError("cycle in loop-device dependencies")
    return out


def backing_chain(dev: str, backing_of: Mapping[str, str]) -> list[str]:
    """Every volume below ``dev`` through loop backing files (nearest first)."""
    chain: list[str] = []
    seen = {dev}
    cur = backing_of.get(dev)
    while cur is not None and cur not in seen:
        chain.append(cur)
        seen.add(cur)
        cur = backing_of.get(cur)
    return chain


@dataclass
class GroupMember:
    """One volume of the plan and every user path that named it."""

    volume: Volume
    targets: list[MountRoot]
    skip: str | None = None  # why it is not frozen (read-only superblock)

    @property
    def fd(self) -> int:
        return self.targets[0].fd

    @property
    def name(self) -> str:
        return self.targets[0].mount.mount_point

    @property
    def paths(self) -> list[str]:
        return [t.path for t in self.targets]


@dataclass
class Plan:
    """Volumes in freeze order, with hazards. Holds open fds: close it (or use ``with``)."""

    members: list[GroupMember]
    hazards: list[Hazard] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    allow_self: bool = False
    # dev -> devs that must freeze after it (the volumes holding its loop backing file)
    must_precede: dict[str, set[str]] = field(default_factory=dict)

    def inners(self, dev: str) -> set[str]:
        """Devs that must stay frozen until ``dev`` is thawed (loop images stored on it)."""
        return {d for d, after in self.must_precede.items() if dev in after}

    def __enter__(self) -> Plan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for m in self.members:
            for t in m.targets:
                t.close()

    @property
    def refused(self) -> list[Hazard]:
        return [h for h in self.hazards if h.refuse and not self.allow_self]

    def check(self) -> None:
        """Raise UnsafePlan for refused hazards (all of them in one message)."""
        refused = self.refused
        if refused:
            raise UnsafePlan("; ".join(h.message for h in refused), hazards=refused)

    def to_dict(self) -> dict[str, object]:
        return {
            "order": [
                {
                    "mount_point": m.name,
                    "paths": m.paths,
                    "dev": m.volume.dev,
                    "fstype": m.volume.fstype,
                    "source": m.volume.source,
                    "action": "skip" if m.skip else "freeze",
                    "skip_reason": m.skip,
                }
                for m in self.members
            ],
            "hazards": [
                {"kind": h.kind, "dev": h.dev, "message": h.message,
                 "refused": h.refuse and not self.allow_self}
                for h in self.hazards
            ],
            "warnings": self.warnings,
        }  # fmt: skip


def own_paths() -> dict[str, str]:
    """Files quiesce itself needs while running: a frozen volume under any of them hangs it."""
    paths = {
        "its Python": os.path.realpath(sys.executable),
        "its environment": os.path.realpath(sys.prefix),
        "its standard library": os.path.realpath(sys.base_prefix),
        "the quiesce package": os.path.dirname(os.path.realpath(__file__)),
    }
    with contextlib.suppress(OSError):
        paths["its working directory"] = os.getcwd()
    for fd, label in ((1, "its standard output"), (2, "its standard error")):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("/"):
            paths[label] = f"/proc/self/fd/{fd}"
    return paths


def _self_hazards(table: MountTable, devs: set[str]) -> list[Hazard]:
    """One hazard per group volume that quiesce itself needs while it runs."""
    labels: dict[str, list[str]] = {}
    for label, path in own_paths().items():
        vol = table.volume_of_path(path)
        if vol is not None and vol.dev in devs:
            shown = os.readlink(path) if path.startswith("/proc/self/fd/") else path
            labels.setdefault(vol.dev, []).append(f"{label} ({shown})")
    return [
        Hazard(
            "self",
            dev,
            f"{table.volumes[dev].mount_point} holds {', '.join(found)}; "
            "freezing it could hang quiesce",
            refuse=True,
        )
        for dev, found in labels.items()
    ]


def _unfreezable_error(target: MountRoot, table: MountTable) -> UnsupportedFilesystem:
    fstype = target.mount.fstype
    hint = None
    if fstype == "overlay":
        upper = target.mount.super_option("upperdir")
        vol = table.volume_of_path(upper) if upper else None
        if vol is not None:
            hint = (
                f"an overlay cannot be frozen; freeze the filesystem that holds its upper "
                f"directory instead: {vol.mount_point} ({vol.fstype})"
            )
    elif fstype == "zfs":
        hint = "ZFS has no freeze; use the zfs provider (an atomic `zfs snapshot`)"
    return UnsupportedFilesystem(
        f"{target.path} is {fstype}, which cannot be frozen", hint, fstype=fstype
    )


def group_by_volume(targets: Sequence[MountRoot]) -> list[GroupMember]:
    """One member per filesystem (two bind mounts of one superblock are one volume), in
    the order the paths were given."""
    members: dict[str, GroupMember] = {}
    for t in targets:
        if t.volume.dev in members:
            members[t.volume.dev].targets.append(t)
        else:
            members[t.volume.dev] = GroupMember(t.volume, [t])
    return list(members.values())


def resolve_group(paths: Sequence[str], table: MountTable) -> list[GroupMember]:
    """Resolve every path (fds kept open) and group them by volume; on a bad path the
    fds opened so far are closed and its error raised."""
    targets: list[MountRoot] = []
    try:
        for p in paths:
            targets.append(resolve(p, table))
    except BaseException:
        for t in targets:
            t.close()
        raise
    return group_by_volume(targets)


def waves(plan: Plan, members: Sequence[GroupMember]) -> list[list[int]]:
    """Indices of ``members`` (in plan order) in waves: a volume goes one wave after the
    last volume that must freeze before it (a loop image's fs before the fs holding the
    image); volumes in one wave have no order between them and freeze concurrently."""
    index = {m.volume.dev: i for i, m in enumerate(members)}
    level = [0] * len(members)
    for i, m in enumerate(members):
        for dev in plan.inners(m.volume.dev):
            j = index.get(dev)
            if j is not None and j < i:
                level[i] = max(level[i], level[j] + 1)
    out: list[list[int]] = [[] for _ in range(max(level, default=-1) + 1)]
    for i, lv in enumerate(level):
        out[lv].append(i)
    return out


def make_plan(
    paths: Sequence[str], *, allow_self: bool = False, table: MountTable | None = None
) -> Plan:
    """Resolve ``paths`` to volumes and order them. Touches nothing but opens fds."""
    if not paths:
        from quiesce.errors import UsageError

        raise UsageError("no paths given", "name at least one mount point")
    table = table or MountTable.read()
    targets: list[MountRoot] = []
    try:
        for p in paths:
            t = resolve(p, table)
            targets.append(t)
            if is_unfreezable(t.mount.fstype):
                raise _unfreezable_error(t, table)
    except BaseException:
        for t in targets:
            t.close()
        raise

    members = {m.volume.dev: m for m in group_by_volume(targets)}

    backing_of: dict[str, str] = {}
    for vol in table.volumes.values():
        backing = loop_backing_file(vol.source)
        if backing:
            holder = table.volume_of_path(backing)
            if holder is not None and holder.dev != vol.dev:
                backing_of[vol.dev] = holder.dev

    devs = list(members)
    must_precede = {d: {b for b in backing_chain(d, backing_of) if b in members} for d in devs}
    depth = {d: table.depth(members[d].volume) for d in devs}
    ordered = [members[d] for d in freeze_order(devs, must_precede, depth)]

    plan = Plan(ordered, allow_self=allow_self, must_precede=must_precede)
    for m in ordered:
        if m.volume.read_only:
            m.skip = "mounted read-only: it cannot change, so it is already consistent"
            plan.warnings.append(f"{m.name} is mounted read-only; not frozen (nothing can change)")
        if m.volume.is_root_fs:
            plan.hazards.append(
                Hazard(
                    "root",
                    m.volume.dev,
                    "/ is the root filesystem: freezing it stalls every process that writes",
                    refuse=True,
                )
            )
    plan.hazards.extend(_self_hazards(table, set(members)))
    for dev, holder_dev in backing_of.items():
        if holder_dev in members and dev not in members:
            inner = table.volumes[dev]
            plan.warnings.append(
                f"{inner.mount_point} ({inner.fstype}) is a loop image stored on "
                f"{members[holder_dev].name} but is not in the group: its copy in the snapshot is "
                "only crash-consistent; add it to the group"
            )
    return plan
