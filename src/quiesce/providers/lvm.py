"""LVM snapshots: ``lvcreate --snapshot`` of each member's logical volume.

LVM suspends the device-mapper device with ``lockfs`` while it takes a snapshot, and that
freezes the filesystem by itself (docs/kernel.md §6). So one LV needs no FIFREEZE
from quiesce (:attr:`FreezeMode.PROVIDER`). A group of several LVs needs one frozen window
across all the ``lvcreate`` calls, which works only where the kernel lets dm's freeze nest
inside a held FIFREEZE (>= 6.8, see :func:`kernel_nests_dm_freeze`); on older kernels the
dm suspend fails with EBUSY and leaves a half-made LV, so such a group is refused before
anything is touched.
"""

from __future__ import annotations

import json
import platform
import re
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

from quiesce.errors import QuiesceError, ToolFailed, UnsafePlan, UsageError
from quiesce.freezing.plan import GroupMember
from quiesce.host import proc
from quiesce.providers.base import (
    FreezeMode,
    Provider,
    Snapshot,
    block_copy_mount_options,
    volume_slug,
)
from quiesce.providers.options import LvmOptions

TAG = "quiesce"  # every snapshot LV quiesce makes carries this tag; delete() insists on it
LVS_FIELDS = (
    "vg_name,lv_name,lv_attr,lv_size,pool_lv,origin,lv_tags,lv_time,"
    "lv_kernel_major,lv_kernel_minor,vg_free"
)
NESTING_SINCE = (6, 8)
TOOL_TIMEOUT = 60.0  # lvs, dmsetup, lvchange
# lvcreate, lvremove, lvchange and dmsetup remove suspend and reload device-mapper tables:
# killed half-way (as the runner's children are when quiesce dies) they can leave the
# origin LV suspended, its I/O hung. So they run with pdeathsig=None: they finish on their
# own if quiesce dies; only a timeout kills them.

_SIZE = re.compile(r"\d+(\.\d+)?[bBsSkKmMgGtTpPeE]?")
_EXTENTS = re.compile(r"\d+%(ORIGIN|VG|FREE|PVS)")
_LV_NAME_BAD = re.compile(r"[^A-Za-z0-9+_.-]")


def kernel_nests_dm_freeze(release: str) -> bool:
    """Whether a dm ``lockfs`` suspend (``lvcreate -s``) nests inside a held FIFREEZE.

    docs/kernel.md §3 and §6: since the block-device holder ops with
    ``FREEZE_MAY_NEST`` (~6.8) the dm freeze nests (verified in 6.12 source and in a 6.12
    VM); before that ``freeze_super`` returns EBUSY to the dm suspend (verified on 6.1).
    An unparseable release counts as old: refusing is safe, a half-made LV is not.
    """
    m = re.match(r"(\d+)\.(\d+)", release)
    return m is not None and (int(m.group(1)), int(m.group(2))) >= NESTING_SINCE


def split_dm_name(dm_name: str) -> tuple[str, str] | None:
    """``vg-lv`` as LVM names dm devices (a ``-`` inside a name is doubled) -> (vg, lv).

    Returns None for names LVM did not make that way (no single dash).
    """
    i = 0
    while i < len(dm_name):
        if dm_name[i] == "-":
            if dm_name[i + 1 : i + 2] == "-":
                i += 2
                continue
            vg, lv = dm_name[:i], dm_name[i + 1 :]
            if not vg or not lv:
                return None
            return vg.replace("--", "-"), lv.replace("--", "-")
        i += 1
    return None


def join_dm_name(vg: str, lv: str, layer: str = "") -> str:
    """The dm device name LVM gives ``vg/lv`` (and a layer: ``real``, ``cow``)."""
    return "-".join(x.replace("-", "--") for x in (vg, lv, layer) if x)


def orphan_layers(
    dm_names: Iterable[str], vg: str, origin: str, snaps: Sequence[str], origin_is_origin: bool
) -> list[str]:
    """dm devices that a failed ``lvcreate -s`` of ``vg/origin`` can leave behind with
    no LV to own them: the snapshots' devices and ``-cow`` layers, and the origin's
    ``-real`` layer unless the origin still has other snapshots (measured on 6.1:
    "Failed to revert logical volume ... Manual intervention required")."""
    present = set(dm_names)
    wanted = [join_dm_name(vg, s, layer) for s in snaps for layer in ("", "cow")]
    if not origin_is_origin:
        wanted.append(join_dm_name(vg, origin, "real"))
    return [n for n in wanted if n in present]


def dm_name_of(dev: str, sys_root: str = "/sys") -> str | None:
    """The device-mapper name of block device ``major:minor``, or None if it is not dm."""
    try:
        return Path(sys_root, "dev/block", dev, "dm/name").read_text().strip() or None
    except OSError:
        return None


@dataclass(frozen=True)
class LvInfo:
    """One row of ``lvs``."""

    vg: str
    lv: str
    attr: str
    size: int  # bytes
    pool: str
    origin: str
    tags: tuple[str, ...]
    time: str
    dev: str | None  # "major:minor" when active
    vg_free: int  # bytes

    @property
    def full_name(self) -> str:
        return f"{self.vg}/{self.lv}"

    @property
    def is_thin(self) -> bool:
        return self.attr[:1] == "V" and bool(self.pool)

    @property
    def is_thick_snapshot(self) -> bool:
        return self.attr[:1] in ("s", "S")


def _int(text: str) -> int:
    try:
        return int(float(text))
    except ValueError:
        return 0


def parse_lvs_json(text: str) -> list[LvInfo]:
    """Parse ``lvs --reportformat json --units b --nosuffix -o LVS_FIELDS``."""
    rows: list[LvInfo] = []
    for report in json.loads(text).get("report", []):
        for r in report.get("lv", []):
            major, minor = r.get("lv_kernel_major", ""), r.get("lv_kernel_minor", "")
            active = major not in ("", "-1") and minor not in ("", "-1")
            tags = r.get("lv_tags", "")
            rows.append(
                LvInfo(
                    vg=r["vg_name"],
                    lv=r["lv_name"],
                    attr=r.get("lv_attr", ""),
                    size=_int(r.get("lv_size", "0")),
                    pool=r.get("pool_lv", ""),
                    origin=r.get("origin", ""),
                    tags=tuple(t for t in tags.split(",") if t),
                    time=r.get("lv_time", ""),
                    dev=f"{major}:{minor}" if active else None,
                    vg_free=_int(r.get("vg_free", "0")),
                )
            )
    return rows


def snapshot_lv_name(lv: str, name: str) -> str:
    """A valid, predictable LV name for the snapshot of ``lv`` called ``name``."""
    safe = _LV_NAME_BAD.sub("_", name).lstrip("-") or "snap"
    return f"{lv}-{safe}"[:120]


def size_args(size: str) -> list[str]:
    """``lvcreate`` arguments for a thick snapshot size: ``20%ORIGIN`` or ``512M``."""
    if _EXTENTS.fullmatch(size):
        return ["--extents", size]
    if _SIZE.fullmatch(size):
        return ["--size", size]
    raise UsageError(
        f"bad LVM snapshot size {size!r}",
        "give an absolute size (512M, 2G) or extents (20%ORIGIN, 10%VG, 50%FREE)",
    )


def snapshot_bytes(size: str, origin: LvInfo) -> int | None:
    """Bytes a thick snapshot will take from the VG, where it can be known up front."""
    m = re.fullmatch(r"(\d+)%ORIGIN", size)
    if m:
        return origin.size * int(m.group(1)) // 100
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([bBsSkKmMgGtTpPeE]?)", size)
    if m:
        unit = m.group(2).lower() or "m"  # lvcreate's default unit is MiB
        power = {"b": 0, "s": None, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5, "e": 6}[unit]
        return int(float(m.group(1)) * (512 if power is None else 1024**power))
    return None


mount_options_for = block_copy_mount_options  # an LVM snapshot is a block-level copy


@dataclass
class _Planned:
    member: GroupMember
    origin: LvInfo
    snap_lv: str
    argv: list[str]


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        raise UsageError(f"{name} not found", "install lvm2")
    return path


class LvmProvider(Provider):
    """Options (:class:`LvmOptions`): ``size`` (thick snapshots: ``20%ORIGIN`` default, or
    ``512M``), ``kernel`` (release to decide nesting for; default: the running kernel),
    ``lvcreate_timeout``."""

    name = "lvm"

    Options: ClassVar[type[LvmOptions]] = LvmOptions
    config: LvmOptions

    def __init__(
        self, options: LvmOptions | Mapping[str, Any] | None = None, /, **kwargs: Any
    ) -> None:
        super().__init__(options, **kwargs)
        self.size = self.config.size
        self.kernel_release = self.config.kernel or platform.release()
        self.timeout = self.config.lvcreate_timeout
        self._planned: list[_Planned] = []
        self._name = ""
        self._lvremove = ""
        self._dmsetup = ""
        self._failed: list[_Planned] = []  # what a failed snapshot() made, to clean up
        self._leftovers: list[str] = []  # what could not be removed yet (LVs, dm devices)

    # -- resolve -------------------------------------------------------------------------
    def lvs(self, *select: str) -> list[LvInfo]:
        argv = [_tool("lvs"), "--reportformat", "json", "--units", "b", "--nosuffix"]
        argv += ["-o", LVS_FIELDS, *select]
        p = proc.run_tool(*argv, timeout=TOOL_TIMEOUT)
        if p.returncode != 0:
            raise QuiesceError(
                f"lvs failed: {_first_cause(p.stderr) if p.stderr.strip() else p.returncode}",
                "check that lvm2 works: run `lvs` as root",
            )
        return parse_lvs_json(p.stdout)

    def _origins(
        self, members: Sequence[GroupMember], rows: Sequence[LvInfo] | None = None
    ) -> list[LvInfo]:
        """Each member's LV, or a UsageError naming the first member that is not one."""
        by_dev = {lv.dev: lv for lv in (self.lvs() if rows is None else rows) if lv.dev}
        found: list[LvInfo] = []
        for m in members:
            dm = dm_name_of(m.volume.dev)
            lv = by_dev.get(m.volume.dev)
            if dm is None or lv is None:
                what = f"device-mapper device {dm}" if dm else f"{m.volume.source}"
                raise UsageError(
                    f"{m.name} is not on an LVM logical volume (it is on {what}, {m.volume.dev})",
                    "the lvm provider snapshots LVs; choose the provider for this storage",
                )
            if split_dm_name(dm) != (lv.vg, lv.lv):
                raise QuiesceError(f"{m.name}: dm name {dm} does not match LV {lv.full_name}")
            if lv.is_thick_snapshot:
                raise UsageError(
                    f"{m.name} is on {lv.full_name}, which is itself a thick snapshot",
                    "LVM cannot snapshot a thick snapshot; snapshot its origin instead",
                )
            found.append(lv)
        return found

    # -- Provider interface --------------------------------------------------------------
    def freeze_mode(self, members: Sequence[GroupMember]) -> FreezeMode:
        if len(members) <= 1:
            return FreezeMode.PROVIDER  # lvcreate's dm suspend freezes the fs itself
        return FreezeMode.FIFREEZE  # one window across several lvcreate calls (check() gates)

    def check(self, members: Sequence[GroupMember]) -> None:
        if not members:
            raise UsageError("no volumes to snapshot")
        size_args(self.size)
        if len(members) > 1 and not kernel_nests_dm_freeze(self.kernel_release):
            names = ", ".join(m.name for m in members)
            raise UnsafePlan(
                f"a group of {len(members)} volumes ({names}) needs one freeze held across "
                f"several lvcreate --snapshot calls, which needs Linux >= "
                f"{NESTING_SINCE[0]}.{NESTING_SINCE[1]}; this kernel is {self.kernel_release}, "
                "where LVM's device-mapper suspend fails with EBUSY under a held FIFREEZE",
                "snapshot each LV on its own (not one instant), or boot a kernel >= 6.8",
            )
        self._origins(members)

    def prepare(self, members: Sequence[GroupMember], name: str) -> None:
        """Resolve every LV, pick names, check VG space and build the lvcreate command
        lines, so that snapshot() only runs them."""
        self._name = name
        rows = self.lvs()
        origins = self._origins(members, rows)
        existing = {lv.full_name for lv in rows}
        lvcreate = _tool("lvcreate")
        self._lvremove = _tool("lvremove")
        self._dmsetup = _tool("dmsetup")
        planned: list[_Planned] = []
        need: dict[str, int] = {}
        for m, lv in zip(members, origins, strict=True):
            snap_lv = snapshot_lv_name(lv.lv, name)
            if f"{lv.vg}/{snap_lv}" in existing:
                raise UsageError(
                    f"LV {lv.vg}/{snap_lv} already exists",
                    "choose another snapshot name, or delete the old snapshot first",
                )
            argv = [lvcreate, "--snapshot", "--name", snap_lv, "--addtag", TAG]
            if not lv.is_thin:
                argv += size_args(self.size)
                want = snapshot_bytes(self.size, lv)
                if want is not None:
                    need[lv.vg] = need.get(lv.vg, 0) + want
                    if need[lv.vg] > lv.vg_free:
                        raise UsageError(
                            f"VG {lv.vg} has {lv.vg_free // 2**20} MiB free; the snapshot(s) "
                            f"need {need[lv.vg] // 2**20} MiB ({self.size} each)",
                            "free space in the VG (vgextend) or pass a smaller size",
                        )
            argv.append(lv.full_name)
            planned.append(_Planned(m, lv, snap_lv, argv))
        self._planned = planned

    def snapshot(self, members: Sequence[GroupMember]) -> list[Snapshot]:
        """Run the prepared lvcreate commands. On a failure, remove everything this call
        made (the failed one may be half made) before raising; what cannot be removed
        inside the window is retried by abort() after the thaw."""
        done: list[_Planned] = []
        snaps: list[Snapshot] = []
        for p in self._planned:
            try:
                res = proc.run_tool(*p.argv, timeout=self.timeout, pdeathsig=None)
                failed = res.returncode != 0
                why = res.stderr.strip()
            except proc.ToolTimedOut:
                failed, why = True, f"timed out after {self.timeout:g}s"
            if failed:
                self._failed = [*done, p]
                self._leftovers = self._clean_up(self._failed)
                raise ToolFailed(
                    f"lvcreate --snapshot of {p.origin.full_name} failed: {_first_cause(why)}"
                    + (
                        f"; not removed yet: {', '.join(self._leftovers)}"
                        if self._leftovers
                        else ""
                    ),
                    "see `lvs -a`, `dmsetup ls` and dmesg; EBUSY means something else holds "
                    "a freeze of that filesystem",
                    stderr=why,
                )
            done.append(p)
            snaps.append(self._snapshot_record(p))
        return snaps

    def abort(self) -> None:
        """After the thaw: remove what a failed snapshot() left behind. Never raises."""
        if self._failed and self._leftovers:
            try:
                self._leftovers = self._clean_up(self._failed)
            except Exception as e:  # abort() must not raise
                self._leftovers.append(f"(cleanup error: {e})")

    def _clean_up(self, made: Sequence[_Planned]) -> list[str]:
        """lvremove the snapshot LVs of ``made``, then dmsetup remove the dm layers a
        failed lvcreate orphaned. Returns what is still there."""
        left = [
            f"{q.origin.vg}/{q.snap_lv}"
            for q in made
            if not self._remove(f"{q.origin.vg}/{q.snap_lv}")
        ]
        try:
            rows = {(r.vg, r.lv): r for r in self.lvs()}
        except QuiesceError:
            return [*left, "dm layers not checked (lvs failed)"]
        dmsetup = self._dmsetup or _tool("dmsetup")
        p = proc.run_tool(dmsetup, "info", "-c", "--noheadings", "-o", "name", timeout=TOOL_TIMEOUT)
        names = p.stdout.split() if p.returncode == 0 else []
        for q in made:
            origin = rows.get((q.origin.vg, q.origin.lv))
            is_origin = origin is not None and origin.attr[:1] in ("o", "O")
            for dm in orphan_layers(names, q.origin.vg, q.origin.lv, [q.snap_lv], is_origin):
                rm = proc.run_tool(dmsetup, "remove", dm, timeout=TOOL_TIMEOUT, pdeathsig=None)
                if rm.returncode != 0:
                    left.append(f"dm device {dm}")
        return left

    def _snapshot_record(self, p: _Planned) -> Snapshot:
        lv = p.origin
        return Snapshot(
            id=f"{self._name}/{volume_slug(p.member.name)}",
            provider=self.name,
            volume=p.member.name,
            dev=p.member.volume.dev,
            fstype=p.member.volume.fstype,
            created=time.time(),
            location=f"/dev/{lv.vg}/{p.snap_lv}",
            extra={
                "vg": lv.vg,
                "lv": p.snap_lv,
                "origin": lv.full_name,
                "thin": lv.is_thin,
                "size": None if lv.is_thin else self.size,
            },
        )

    def _remove(self, full_name: str) -> bool:
        """lvremove -f an LV this provider made; True once it is gone."""
        lvremove = self._lvremove or _tool("lvremove")
        p = proc.run_tool(lvremove, "-f", full_name, timeout=self.timeout, pdeathsig=None)
        return p.returncode == 0 or "Failed to find logical volume" in p.stderr

    def after_thaw(self, snaps: list[Snapshot]) -> None:
        """Thin snapshots are created with the activation-skip flag: activate them (-K)
        so that their device exists for mounting."""
        for s in snaps:
            if s.extra.get("thin"):
                target = f"{s.extra['vg']}/{s.extra['lv']}"
                lvchange = [_tool("lvchange"), "-ay", "-K", target]
                p = proc.run_tool(*lvchange, timeout=TOOL_TIMEOUT, pdeathsig=None)
                if p.returncode != 0:
                    raise QuiesceError(
                        f"lvchange -ay -K {target} failed: {p.stderr.strip()}",
                        f"the snapshot exists but is inactive; run `lvchange -ay -K {target}`",
                    )

    def mount_options(self, snap: Snapshot) -> list[str]:
        return mount_options_for(snap.fstype)

    def delete(self, snap: Snapshot) -> None:
        """lvremove -f, but only of an LV that is a snapshot quiesce tagged."""
        vg, lv = snap.extra.get("vg"), snap.extra.get("lv")
        if not vg or not lv:
            raise UsageError(f"snapshot {snap.id} has no VG/LV in its record")
        rows = [r for r in self.lvs() if (r.vg, r.lv) == (vg, lv)]
        if not rows:
            raise UsageError(f"LV {vg}/{lv} does not exist", "it was already deleted")
        if TAG not in rows[0].tags or not rows[0].origin:
            raise UsageError(
                f"LV {vg}/{lv} is not a snapshot made by quiesce (no '{TAG}' tag or no origin)",
                "quiesce deletes only the snapshots it made",
            )
        if not self._remove(f"{vg}/{lv}"):
            raise QuiesceError(f"lvremove -f {vg}/{lv} failed", "see `lvs -a` and dmesg")

    def list_snapshots(self) -> list[Snapshot]:
        """Every snapshot LV carrying the quiesce tag (what ``snapshot list`` can cross-check)."""
        out: list[Snapshot] = []
        for r in self.lvs():
            if TAG not in r.tags or not r.origin:
                continue
            out.append(
                Snapshot(
                    id=f"{r.vg}/{r.lv}",
                    provider=self.name,
                    volume="",
                    dev=r.dev or "",
                    fstype="",
                    created=_lv_time(r.time),
                    location=f"/dev/{r.vg}/{r.lv}",
                    extra={
                        "vg": r.vg,
                        "lv": r.lv,
                        "origin": f"{r.vg}/{r.origin}",
                        "thin": r.is_thin,
                    },
                )
            )
        return out


def _first_cause(stderr: str) -> str:
    """The line of lvcreate's stderr that says what went wrong (not "Aborting.")."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for ln in lines:
        if "failed" in ln.lower() or "busy" in ln.lower():
            return ln
    return lines[-1] if lines else "no message"


def _lv_time(text: str) -> float:
    """``lv_time`` ("2025-05-20 10:15:00 +0000") as unix time; 0 if unknown."""
    try:
        return datetime.strptime(text, "%Y-%m-%d %H:%M:%S %z").timestamp()
    except ValueError:
        return 0.0


__all__ = [
    "LvInfo",
    "LvmProvider",
    "kernel_nests_dm_freeze",
    "mount_options_for",
    "parse_lvs_json",
    "split_dm_name",
]
