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
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from quiesce.errors import QuiesceError, ReleaseFailed, UnsupportedFilesystem, UsageError
from quiesce.freezing.blockwatch import ending_blockers
from quiesce.freezing.freezer import Freezer, Window
from quiesce.freezing.plan import GroupMember, Plan, make_plan, resolve_group
from quiesce.host import kernel
from quiesce.host.mounts import MountTable
from quiesce.providers.base import FreezeMode, Provider, Snapshot
from quiesce.providers.options import ProviderOptions
from quiesce.providers.registry import get_provider
from quiesce.snapshot.cleanup import UNDO
from quiesce.snapshot.consistency import Consistency, consistency, prove_on_group
from quiesce.snapshot.manifest import Manifest, WindowRecord
from quiesce.snapshot.quiescers import (
    Quiescer,
    QuiescerStack,
    claim_of,
    files_of,
)
from quiesce.snapshot.store import _unique_id, _write_manifest, state_dir_path
from quiesce.state.journal import Journal
from quiesce.state.statedir import checked_state_dir, refuse_state_on_group
from quiesce.util.events import EventFn, HeldEvents, emit
from quiesce.util.units import human_duration

_JOB_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


# the engine's phases as progress events name them (the others are not announced)
_ANNOUNCED = {
    "prepare": "prepare snapshot",
    "before_freeze": "quiesce applications",
    "window": "take snapshot",  # syncfs, re-clone, freeze, snapshot, thaw: the window is inside
    "after_thaw": "release applications",
}


class _Phases:
    def __init__(self, events: EventFn | None = None) -> None:
        self.done: list[dict[str, Any]] = []
        self.events = events

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.monotonic()
        ok = False
        shown = _ANNOUNCED.get(name)
        if shown:
            emit(self.events, "start", shown)
        try:
            yield
            ok = True
        finally:
            duration = time.monotonic() - t0
            self.done.append({"phase": name, "duration_s": round(duration, 6), "ok": ok})
            if shown:
                emit(self.events, "end", shown, ok=ok, duration_s=duration)


def _make_provider(
    provider: str | Provider, options: ProviderOptions | Mapping[str, Any] | None
) -> Provider:
    """The provider, its options validated (unknown keys refused) before anything runs."""
    if isinstance(provider, Provider):
        if options:
            raise UsageError(
                f"options given twice: to the {provider.name} provider and to create()",
                "give them to the provider's constructor only",
            )
        return provider
    return get_provider(provider)(options)


def _plain_plan(paths: Sequence[str]) -> Plan:
    """A plan without freeze checks, for providers that never freeze (ZFS cannot)."""
    return Plan(resolve_group(paths, MountTable.read()))


def _plan_for(paths: Sequence[str], allow_self: bool, prov: Provider) -> Plan:
    try:
        return make_plan(list(paths), allow_self=allow_self)
    except UnsupportedFilesystem:
        plan = _plain_plan(paths)
        if prov.freeze_mode(plan.members) is FreezeMode.FIFREEZE:
            plan.close()
            raise
        return plan


def _window_dict(window: Window, snapshot_s: float) -> WindowRecord:
    """Window.to_dict(), its monotonic bounds, and how long the provider call took."""
    record = cast(WindowRecord, window.to_dict())
    record["start_ns"] = window.start_ns
    record["end_ns"] = window.end_ns
    record["snapshot_s"] = round(snapshot_s, 9)
    return record


def _annotate(e: BaseException, note: str) -> None:
    if isinstance(e, QuiesceError):
        e.add_context(note)
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
    expedite: bool = True,
    end_blockers_after: float | None = None,
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
    freezer = Freezer(plan, timeout=timeout, lease=lease, syncfs=syncfs, expedite=expedite)
    freezer.arm()  # the guardian, the pre-freeze flush
    try:
        prov.before_freeze(members)  # e.g. reflink: re-clone what the flush wrote
    except BaseException:
        freezer.disarm()
        raise
    devs = [m.volume.dev for m in members if not m.skip]
    with ending_blockers(devs, end_blockers_after) as watch:  # opt-in; off: a no-op
        freezer.freeze()
    t0 = time.monotonic()
    try:
        made.extend(prov.snapshot(members))
    except BaseException as e:
        t1 = time.monotonic()
        window = freezer.thaw(raise_errors=False)
        window.warnings += watch.ended
        _annotate(
            e, f"{_window_note(window)} after the snapshot failed in {human_duration(t1 - t0)}"
        )
        raise
    t1 = time.monotonic()
    window = freezer.thaw()
    window.warnings += watch.ended  # held in memory through the window
    return window, t1 - t0


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


def _released(quiesced: QuiescerStack, ok: bool) -> list[str]:
    return [f"{type(q).__name__}.after_thaw failed: {e}" for q, e in quiesced.release(ok)]


def create(
    paths: Sequence[str],
    provider: str | Provider,
    *,
    job: str = "adhoc",
    options: ProviderOptions | Mapping[str, Any] | None = None,
    timeout: float = 30.0,
    lease: float = 5.0,
    syncfs: bool = True,
    allow_self: bool = False,
    state_dir: Path | None = None,
    quiescers: Sequence[Quiescer] = (),
    expedite: bool = True,
    events: EventFn | None = None,
    end_blockers_after: float | None = None,
    depends_on: Mapping[str, Sequence[tuple[str, str]]] | None = None,
) -> Manifest:
    """Snapshot the filesystems mounted at ``paths`` as one group; return the manifest.

    Every file a quiescer depends on (its ``depends_on()``, and ``depends_on``:
    ``{who: [(path, what)]}`` for the caller's own, e.g. a job's hooks) must lie on the
    group, or nothing is made (:class:`~quiesce.snapshot.consistency.OutsideGroup`).

    ``events`` hears each phase start and end; those of the freeze window are held in
    memory and delivered after the thaw (whoever renders them may write to a frozen
    volume). ``end_blockers_after``: the opt-in blocker policy
    (:mod:`quiesce.freezing.blockwatch`), off by default."""
    if not _JOB_RE.fullmatch(job):
        raise UsageError(
            f"bad job name {job!r}", "use letters, digits, '.', '_' and '-' (at most 64)"
        )
    prov = _make_provider(provider, options)
    state = state_dir_path(state_dir)
    held = HeldEvents(events)
    phases = _Phases(held)
    with phases("plan"):
        plan = _plan_for(paths, allow_self, prov)
    with plan:
        members = plan.members
        with phases("check"):
            mode = prov.freeze_mode(members)
            checked_state_dir(state)  # root's alone, or nothing is made
            refuse_state_on_group(state, members)
            if mode is FreezeMode.FIFREEZE:
                plan.check()
            prov.check(members)
            declared = {_who(q): files_of(q) for q in quiescers} | dict(depends_on or {})
            proven = prove_on_group(declared, members)
        now = datetime.now(UTC)
        snap_id = _unique_id(job, state, now)
        quiesced = QuiescerStack()
        made: list[Snapshot] = []
        errors: list[str] = []
        fresh_state = not state.exists()
        journal = Journal.open(state, job=job, undo=UNDO)  # outside the group: checked above
        prov.journal = journal
        try:
            with phases("prepare"):
                prov.prepare(members, snap_id)
            with phases("before_freeze"):
                quiesced.quiesce(quiescers)
            with held.hold(), phases("window"):
                window, snapshot_s = _take(
                    prov,
                    plan,
                    mode,
                    made,
                    timeout=timeout,
                    lease=lease,
                    syncfs=syncfs,
                    expedite=expedite,
                    end_blockers_after=end_blockers_after,
                )
            if window is not None and window.duration is not None:
                detail = f"volumes were frozen for {human_duration(window.duration)}"
                emit(held, "note", "freeze window", detail=detail, duration_s=window.duration)
            with phases("after_thaw"):
                errors += _released(quiesced, True)
            with phases("provider_after_thaw"):
                prov.after_thaw(made)
            frozen_ns = window.start_ns if window is not None else None
            claims = [c for q in quiescers for c in claim_of(q, frozen_ns)]
            level, reason = consistency(
                mode, prov, plan, window, made, snapshot_s, claims, proven
            )  # fmt: skip
            man = Manifest(
                id=snap_id,
                job=job,
                provider=prov.name,
                # milliseconds: two runs within one second must still be ordered (which
                # complete run is newer than an incomplete one decides its retention)
                created=now.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                volumes=[_volume_dict(m) for m in members],
                snapshots=list(made),
                window=_window_dict(window, snapshot_s) if window is not None else None,
                freeze_mode=mode,
                consistency=Consistency(level),
                consistency_reason=reason,
                phases=phases.done,
                options=_json_safe(prov.options),
                warnings=[*plan.warnings, *(window.warnings if window else []), *errors],
            )
            _write_manifest(state, man)
            for entry in journal.open_entries():  # the manifest owns them now
                journal.commit(entry.id)
        except BaseException as e:
            errors += _released(quiesced, False)
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
        raise ReleaseFailed("; ".join(errors), manifest=man)
    return man


def _who(q: Quiescer) -> str:
    name = getattr(q, "who", None) or getattr(q, "name", None)
    return str(name) if name else type(q).__name__


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


__all__ = ["create"]
