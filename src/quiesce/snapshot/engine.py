"""Snapshots of a group: the phases around one provider call, and their manifests.

``create`` runs plan -> provider check -> provider prepare -> application quiescers ->
window (freeze, provider snapshot, thaw; or only the snapshot for atomic providers) ->
quiescers released -> provider after_thaw -> manifest. A failure anywhere unwinds what
the run did, in reverse (thaw, release, delete the half-made snapshot), and re-raises the
typed error. The manifest is the record of one snapshot: written after the thaw into a
state directory that is never on a volume of the group.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from quiesce.errors import QuiesceError, UnsafePlan, UnsupportedFilesystem, UsageError
from quiesce.freezing.freezer import Freezer, Window
from quiesce.freezing.plan import GroupMember, Plan, make_plan
from quiesce.providers.base import Consistency, FreezeMode, Provider, Snapshot, get_provider
from quiesce.state.journal import DEFAULT_STATE_DIR, STATE_DIR_ENV, Journal
from quiesce.state.journal import state_dir as journal_state_dir
from quiesce.sys import kernel, proc
from quiesce.sys.mounts import MountTable, loop_backing_file, resolve
from quiesce.sys.units import human_duration

STATE_ENV = STATE_DIR_ENV
MANIFEST_VERSION = 1
_JOB_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class Quiescer(Protocol):
    """An application hook: quiesce the app before the window, release it after."""

    def before_freeze(self) -> None: ...

    def after_thaw(self, ok: bool) -> None: ...


@dataclass
class Manifest:
    """What one ``create`` made: enough to list, mount and delete it later."""

    id: str
    job: str
    provider: str
    created: str  # UTC ISO 8601
    volumes: list[dict[str, Any]]
    snapshots: list[dict[str, Any]]
    window: dict[str, Any] | None  # Window.to_dict() + start_ns/end_ns; None if not frozen
    freeze_mode: str
    consistency: str  # application | filesystem | crash
    consistency_reason: str
    phases: list[dict[str, Any]]
    options: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    version: int = MANIFEST_VERSION

    @property
    def window_s(self) -> float | None:
        return self.window.get("window_s") if self.window else None

    def snapshot_objects(self) -> list[Snapshot]:
        return [Snapshot(**s) for s in self.snapshots]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        return cls.from_dict(json.loads(text))


# -- the state directory -----------------------------------------------------------------


state_dir_path = journal_state_dir  # the argument, else $QUIESCE_STATE_DIR, else the default


def _manifest_dir(state: Path) -> Path:
    return state / "snapshots"


def _manifest_path(state: Path, snap_id: str) -> Path:
    if not _ID_RE.fullmatch(snap_id):
        raise UsageError(f"{snap_id!r} is not a snapshot id", "see `quiesce snapshot list`")
    return _manifest_dir(state) / f"{snap_id}.json"


def _existing_ancestor(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _refuse_state_on_group(state: Path, members: Sequence[GroupMember]) -> None:
    """The manifest is written there: a group volume would be frozen or snapshotted."""
    table = MountTable.read()
    vol = table.volume_of_path(str(_existing_ancestor(state)))
    for m in members:
        if vol is not None and vol.dev == m.volume.dev:
            raise UnsafePlan(
                f"the state directory {state} is on {m.name}, a volume of the group",
                f"set {STATE_ENV} (or --state-dir) to a directory on another filesystem",
            )


def _write_manifest(state: Path, man: Manifest) -> Path:
    """Atomically (temp file + rename), after the thaw."""
    d = _manifest_dir(state)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = d / f"{man.id}.json"
    tmp = d / f".{man.id}.json.tmp"
    with open(tmp, "w") as f:
        f.write(man.to_json() + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def save_manifest(state_dir: str | Path | None, man: Manifest) -> Path:
    """Write (or rewrite) a manifest in the state directory, atomically."""
    return _write_manifest(state_dir_path(state_dir), man)


def list_manifests(state_dir: str | Path | None = None) -> list[Manifest]:
    """Every manifest in the state directory, oldest first (unreadable files skipped)."""
    d = _manifest_dir(state_dir_path(state_dir))
    out = []
    for p in sorted(d.glob("*.json")) if d.is_dir() else []:
        with contextlib.suppress(OSError, ValueError, TypeError):
            out.append(Manifest.from_json(p.read_text()))
    return sorted(out, key=lambda m: (m.created, m.id))


def load(snap_id: str, state_dir: str | Path | None = None) -> Manifest:
    state = state_dir_path(state_dir)
    path = _manifest_path(state, snap_id)
    try:
        return Manifest.from_json(path.read_text())
    except FileNotFoundError:
        raise UsageError(
            f"no snapshot {snap_id!r} in {_manifest_dir(state)}", "see `quiesce snapshot list`"
        ) from None
    except (ValueError, TypeError) as e:
        raise QuiesceError(f"manifest {path} is unreadable: {e}") from None


# -- create ------------------------------------------------------------------------------


class _Phases:
    def __init__(self) -> None:
        self.done: list[dict[str, Any]] = []

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.monotonic()
        ok = False
        try:
            yield
            ok = True
        finally:
            self.done.append(
                {"phase": name, "duration_s": round(time.monotonic() - t0, 6), "ok": ok}
            )


def _make_provider(provider: str | Provider, options: dict[str, Any] | None) -> Provider:
    if isinstance(provider, Provider):
        if options:
            provider.options.update(options)
        return provider
    return get_provider(provider)(**(options or {}))


def _plain_plan(paths: Sequence[str]) -> Plan:
    """A plan without freeze checks, for providers that never freeze (ZFS cannot)."""
    table = MountTable.read()
    members: dict[str, GroupMember] = {}
    try:
        for p in paths:
            t = resolve(p, table)
            if t.volume.dev in members:
                members[t.volume.dev].targets.append(t)
            else:
                members[t.volume.dev] = GroupMember(t.volume, [t])
    except BaseException:
        Plan(list(members.values())).close()
        raise
    return Plan(list(members.values()))


def _plan_for(paths: Sequence[str], allow_self: bool, prov: Provider) -> Plan:
    try:
        return make_plan(list(paths), allow_self=allow_self)
    except UnsupportedFilesystem:
        plan = _plain_plan(paths)
        if prov.freeze_mode(plan.members) is FreezeMode.FIFREEZE:
            plan.close()
            raise
        return plan


def _unique_id(job: str, state: Path, now: datetime) -> str:
    base = f"{job}-{now.strftime('%Y%m%dT%H%M%SZ')}"
    d = _manifest_dir(state)
    snap_id, n = base, 1
    while (d / f"{snap_id}.json").exists():
        n += 1
        snap_id = f"{base}-{n}"
    return snap_id


def _window_dict(window: Window, snapshot_s: float) -> dict[str, Any]:
    """Window.to_dict(), its monotonic bounds, and how long the provider call took."""
    return window.to_dict() | {
        "start_ns": window.start_ns,
        "end_ns": window.end_ns,
        "snapshot_s": round(snapshot_s, 9),
    }


def _consistency(
    mode: FreezeMode,
    prov: Provider,
    plan: Plan,
    window: Window | None,
    snaps: list[Snapshot],
    snapshot_s: float,
    hooks: int,
) -> tuple[str, str]:
    """The level actually achieved, and why."""
    app = f"; {hooks} application hook(s) quiesced the applications first" if hooks else ""
    level = Consistency.APPLICATION if hooks else Consistency.FILESYSTEM
    if window is not None:
        others = [v.mount_point for v in window.volumes if v.thawed_by == "someone-else"]
        if window.thawed_by != "controller" or others:
            who = ", ".join(others) or "the group"
            return Consistency.CRASH, f"{who} was thawed by someone else during the window"
        frozen = [v.mount_point for v in window.volumes if v.state == "thawed"]
        skipped = [v.mount_point for v in window.volumes if v.state == "skipped"]
        reason = (
            f"{len(frozen)} volume(s) frozen together with FIFREEZE for "
            f"{human_duration(window.duration)} "
            f"around the {prov.name} snapshot: one instant, no journal recovery needed"
        )
        if skipped:
            reason += f" ({', '.join(skipped)} mounted read-only: not frozen, cannot change)"
        return level, reason + app
    how = (
        f"the {prov.name} storage froze the filesystem itself while taking the snapshot"
        if mode is FreezeMode.PROVIDER
        else f"the {prov.name} snapshot is atomic and was taken without a freeze"
    )
    if len(snaps) > 1 and not prov.group_atomic:
        reason = (
            f"{len(snaps)} snapshots taken back to back over {human_duration(snapshot_s)}: each is "
            f"filesystem-consistent ({how}), but the group is not one atomic instant"
        )
        return (Consistency.APPLICATION, reason + app) if hooks else (Consistency.CRASH, reason)
    return level, how + app


def _annotate(e: BaseException, note: str) -> None:
    if isinstance(e, QuiesceError):
        e.message += f"; {note}"
        e.args = (e.message,)
    else:
        e.add_note(f"quiesce: {note}")


def _window_note(window: Window) -> str:
    states = {v.mount_point: v.state for v in window.volumes}
    if all(s in ("thawed", "skipped") for s in states.values()):
        return f"the group was thawed (window {human_duration(window.duration)})"
    return "volume states after the thaw: " + ", ".join(f"{k} {v}" for k, v in states.items())


def _take(
    prov: Provider,
    plan: Plan,
    mode: FreezeMode,
    made: list[Snapshot],
    *,
    timeout: float,
    lease: float,
    syncfs: bool,
) -> tuple[Window | None, float]:
    """The window. Everything the provider returned lands in ``made`` before the thaw."""
    members = plan.members
    if mode is not FreezeMode.FIFREEZE:
        if mode is FreezeMode.PROVIDER and syncfs:
            for m in members:
                with contextlib.suppress(OSError):
                    kernel.syncfs(m.fd)
        t0 = time.monotonic()
        made.extend(prov.snapshot(members))
        return None, time.monotonic() - t0
    freezer = Freezer(plan, timeout=timeout, lease=lease, syncfs=syncfs)
    freezer.freeze()
    t0 = time.monotonic()
    try:
        made.extend(prov.snapshot(members))
    except BaseException as e:
        t1 = time.monotonic()
        window = freezer.thaw(raise_errors=False)
        _annotate(
            e, f"{_window_note(window)} after the snapshot failed in {human_duration(t1 - t0)}"
        )
        raise
    t1 = time.monotonic()
    return freezer.thaw(), t1 - t0


def _discard(prov: Provider, made: list[Snapshot], errors: list[str]) -> None:
    for snap in reversed(made):
        try:
            prov.delete(snap)
        except Exception as e:  # keep unwinding
            errors.append(f"could not delete {snap.location}: {e}")
    try:
        prov.abort()
    except Exception as e:
        errors.append(f"{prov.name} cleanup failed: {e}")


def _release(started: list[Quiescer], ok: bool, errors: list[str]) -> None:
    for q in reversed(started):
        try:
            q.after_thaw(ok)
        except Exception as e:
            errors.append(f"{type(q).__name__}.after_thaw failed: {e}")


def create(
    paths: Sequence[str],
    provider: str | Provider,
    *,
    job: str = "adhoc",
    options: dict[str, Any] | None = None,
    timeout: float = 30.0,
    lease: float = 5.0,
    syncfs: bool = True,
    allow_self: bool = False,
    state_dir: Path | None = None,
    quiescers: Sequence[Quiescer] = (),
) -> Manifest:
    """Snapshot the filesystems mounted at ``paths`` as one group; return the manifest."""
    if not _JOB_RE.fullmatch(job):
        raise UsageError(
            f"bad job name {job!r}", "use letters, digits, '.', '_' and '-' (at most 64)"
        )
    prov = _make_provider(provider, options)
    state = state_dir_path(state_dir)
    phases = _Phases()
    with phases("plan"):
        plan = _plan_for(paths, allow_self, prov)
    with plan:
        members = plan.members
        with phases("check"):
            mode = prov.freeze_mode(members)
            _refuse_state_on_group(state, members)
            if mode is FreezeMode.FIFREEZE:
                plan.check()
            prov.check(members)
        now = datetime.now(UTC)
        snap_id = _unique_id(job, state, now)
        started: list[Quiescer] = []
        made: list[Snapshot] = []
        errors: list[str] = []
        fresh_state = not state.exists()
        journal = Journal.open(state, job=job)  # outside the group: checked above
        prov.journal = journal
        try:
            with phases("prepare"):
                prov.prepare(members, snap_id)
            with phases("before_freeze"):
                for q in quiescers:
                    started.append(q)
                    q.before_freeze()
            with phases("window"):
                window, snapshot_s = _take(
                    prov, plan, mode, made, timeout=timeout, lease=lease, syncfs=syncfs
                )
            with phases("after_thaw"):
                _release(started, True, errors)
                started = []
            with phases("provider_after_thaw"):
                prov.after_thaw(made)
            level, reason = _consistency(mode, prov, plan, window, made, snapshot_s, len(quiescers))
            man = Manifest(
                id=snap_id,
                job=job,
                provider=prov.name,
                created=now.isoformat(timespec="seconds").replace("+00:00", "Z"),
                volumes=[_volume_dict(m) for m in members],
                snapshots=[s.to_dict() for s in made],
                window=_window_dict(window, snapshot_s) if window is not None else None,
                freeze_mode=str(mode),
                consistency=str(level),
                consistency_reason=reason,
                phases=phases.done,
                options=_json_safe(prov.options),
                warnings=[*plan.warnings, *(window.warnings if window else []), *errors],
            )
            _write_manifest(state, man)
            for entry in journal.open_entries():  # the manifest owns them now
                journal.commit(entry.id)
        except BaseException as e:
            _release(started, False, errors)
            _discard(prov, made, errors)
            errors += journal.rollback()
            if errors:
                _annotate(e, "while unwinding: " + "; ".join(errors))
            journal.close()
            if fresh_state:  # a failed first run leaves no empty state directory behind
                for d in (journal.path.parent, state):
                    with contextlib.suppress(OSError):
                        d.rmdir()
            raise
        finally:
            journal.close()
            prov.journal = None
    if errors:  # the snapshot is good, but an application was not released cleanly
        raise QuiesceError(
            "; ".join(errors),
            "the snapshot was kept; check the application that was quiesced",
            manifest=man,
        )
    return man


def _volume_dict(m: GroupMember) -> dict[str, Any]:
    v = m.volume
    return {
        "mount_point": m.name,
        "paths": m.paths,
        "dev": v.dev,
        "fstype": v.fstype,
        "source": v.source,
        "skipped": m.skip,
    }


def _json_safe(options: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(options, default=str))


# -- mount, umount, delete ---------------------------------------------------------------


def _provider_for(man: Manifest) -> Provider:
    return get_provider(man.provider)(**man.options)


def _run(*cmd: str) -> None:
    proc.check_tool(*cmd, hint="see the kernel log (dmesg) for the filesystem's own message")


def _slug(snap: Snapshot) -> str:
    return snap.id.split("/", 1)[-1]


def _is_block_device(path: Path) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def mounts_of(snap: Snapshot, table: MountTable | None = None) -> list[str]:
    """Where ``snap`` is mounted now (a loop mount of its image, a bind mount of its dir)."""
    table = table or MountTable.read()
    loc = Path(snap.location)
    found: list[str] = []
    if _is_block_device(loc):
        rdev = os.stat(loc).st_rdev
        dev = f"{os.major(rdev)}:{os.minor(rdev)}"
        found.extend(m.mount_point for m in table.mounts if m.dev == dev)
    elif not loc.is_absolute():  # a dataset snapshot (pool/fs@snap): mounted by name
        # ZFS's own automounts under .zfs/snapshot/ come and go; `zfs destroy` unmounts them.
        found.extend(
            m.mount_point
            for m in table.mounts
            if m.source == snap.location and "/.zfs/snapshot/" not in m.mount_point
        )
    elif loc.is_file():
        real = os.path.realpath(loc)
        for m in table.mounts:
            backing = loop_backing_file(m.source)
            if backing is not None and backing.removesuffix(" (deleted)") == real:
                found.append(m.mount_point)
    elif loc.is_dir():
        vol = table.volume_of_path(str(loc))
        st = os.stat(loc)
        for m in table.mounts:
            if vol is None or m.dev != vol.dev:
                continue
            with contextlib.suppress(OSError):
                mst = os.stat(m.mount_point)
                if (mst.st_dev, mst.st_ino) == (st.st_dev, st.st_ino):
                    found.append(m.mount_point)
    return found


def mount(snap_id: str, directory: str | Path, state_dir: str | Path | None = None) -> list[str]:
    """Mount a snapshot read-only (nosuid, nodev, noexec) at ``directory``; several
    volumes go to ``directory/<volume-slug>``. Returns the mount points."""
    man = load(snap_id, state_dir)
    prov = _provider_for(man)
    snaps = man.snapshot_objects()
    base = Path(os.path.abspath(directory))
    table = MountTable.read()
    done: list[str] = []
    seen: set[str] = set()
    for snap in snaps:
        if snap.location in seen:
            continue
        seen.add(snap.location)
        loc = Path(snap.location)
        block = _is_block_device(loc)
        dataset = not loc.is_absolute() and "@" in snap.location
        if not (block or dataset or loc.is_file() or loc.is_dir()):
            raise UsageError(
                f"{snap.id} ({man.provider}: {snap.location}) cannot be mounted on this host",
                "mount it with the storage's own tools",
            )
        where = mounts_of(snap, table)
        if where:
            raise UsageError(f"{snap.id} is already mounted at {where[0]}")
        target = base if len(snaps) == 1 else base / _slug(snap)
        target.mkdir(parents=True, exist_ok=True)
        opts = ",".join(["ro", "nosuid", "nodev", "noexec", *prov.mount_options(snap)])
        try:
            if block or dataset:  # an LV snapshot /dev/vg/lv, a ZFS pool/fs@snap
                _run("mount", "-t", snap.fstype, "-o", opts, snap.location, str(target))
            elif loc.is_file():
                _run("mount", "-t", snap.fstype, "-o", f"loop,{opts}", str(loc), str(target))
            else:
                _run("mount", "--bind", "-o", opts, str(loc), str(target))
        except QuiesceError:
            for t in reversed(done):
                _umount_one(t, table)
            raise
        done.append(str(target))
    return done


def _umount_one(target: str, table: MountTable) -> None:
    source = next((m.source for m in table.mounts if m.mount_point == target), None)
    _run("umount", target)
    # mount -o loop sets autoclear; detach explicitly if the device outlived the umount.
    if source and source.startswith("/dev/loop") and loop_backing_file(source):
        still = MountTable.read()
        if not any(m.source == source for m in still.mounts):
            subprocess.run(["losetup", "-d", source], capture_output=True)


def umount(target: str, state_dir: str | Path | None = None) -> list[str]:
    """Unmount a snapshot: by id (every mount of it) or by the directory it is mounted on.
    Refuses a directory where no quiesce snapshot is mounted."""
    table = MountTable.read()
    manifests = list_manifests(state_dir)
    by_id = {m.id: m for m in manifests}
    if target in by_id:
        points = [p for s in by_id[target].snapshot_objects() for p in mounts_of(s, table)]
        if not points:
            raise UsageError(f"snapshot {target} is not mounted")
    else:
        path = os.path.realpath(target)
        ours = {p for man in manifests for s in man.snapshot_objects() for p in mounts_of(s, table)}
        if path not in ours:
            raise UsageError(
                f"no quiesce snapshot is mounted at {target}",
                "give the directory from `quiesce snapshot mount`, or the snapshot id",
            )
        points = [path]
    for p in sorted(set(points), key=len, reverse=True):
        _umount_one(p, table)
    return points


def delete(snap_id: str, state_dir: str | Path | None = None, *, forget: bool = False) -> Manifest:
    """Delete a snapshot from the storage (unless ``forget``), then its manifest.
    Refuses while any part of it is mounted."""
    state = state_dir_path(state_dir)
    man = load(snap_id, state)
    snaps = man.snapshot_objects()
    table = MountTable.read()
    for snap in snaps:
        where = mounts_of(snap, table)
        if where:
            raise UsageError(
                f"{snap.id} is mounted at {where[0]}",
                f"unmount it first: quiesce snapshot umount {where[0]}",
            )
    if not forget:
        prov = _provider_for(man)
        left = list(snaps)
        for snap in snaps:
            try:
                prov.delete(snap)
            except BaseException:
                man.snapshots = [s.to_dict() for s in left]
                _write_manifest(state, man)
                raise
            left.remove(snap)
    _manifest_path(state, snap_id).unlink()
    return man


__all__ = [
    "DEFAULT_STATE_DIR",
    "STATE_ENV",
    "Manifest",
    "Quiescer",
    "create",
    "delete",
    "list_manifests",
    "load",
    "mount",
    "mounts_of",
    "save_manifest",
    "state_dir_path",
    "umount",
]
