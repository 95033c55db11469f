"""The backup phase of a run: mount the snapshot, back it up, verify, unmount, prune.

Also what ``quiesce backup JOB.toml`` runs on the newest existing snapshot. Every
mount, loop device and scratch directory is journaled (state/journal.py) before it is made;
the snapshot is *held* (its mount entries name it) while the backup reads it, so
retention never deletes it underneath. A failed verification stops the pruning: the
older snapshots and backups are all that is known to be good.
"""

from __future__ import annotations

import contextlib
import random
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from quiesce.backup.cleanup import UNDO, cleanup, journal_repository
from quiesce.backup.config import BackupConfig
from quiesce.backup.mount import mounted_snapshots
from quiesce.backup.targets import make_target
from quiesce.backup.targets.base import BackupResult, ProgressFn, ProgressUpdate, Target
from quiesce.backup.verification import VerifyResult, verify
from quiesce.errors import DrillFailed, ExitCode, QuiesceError, UsageError, VerifyFailed
from quiesce.state.cleanup import held_snapshot_ids
from quiesce.state.journal import Journal
from quiesce.state.locks import job_lock
from quiesce.state.retention import RetentionPolicy, decide
from quiesce.state.statedir import state_dir
from quiesce.util.events import Event, EventFn, emit
from quiesce.util.redact import redact_data

# (manifest, [(origin mount point, read-only mount path)], journal) -> a DrillReport:
# apps/drills (a higher layer) passes it in, like state's undo actions.
DrillFn = Callable[[Any, Sequence[tuple[str, Path]], Journal], Any]


@dataclass
class BackupReport:
    """What the backup phase did; ``to_dict`` goes into the run's report as ``backup``."""

    job: str
    target: str
    snapshot: str | None = None  # the manifest id backed up
    ok: bool = True
    exit_code: int = ExitCode.OK
    phases: list[dict[str, Any]] = field(default_factory=list)
    mounts: list[dict[str, Any]] = field(default_factory=list)
    result: BackupResult | None = None
    verify: VerifyResult | None = None
    drill: Any = None  # apps.drills.DrillReport
    retention: dict[str, Any] | None = None
    already_backed_up: bool = False  # the target held a backup of this snapshot: reported
    cleanup: dict[str, Any] | None = None  # what crashed runs had left (removed first)
    warnings: list[str] = field(default_factory=list)
    error: dict[str, Any] | None = None
    duration_s: float = 0.0

    def set_error(self, e: QuiesceError) -> None:
        self.ok = False
        self.exit_code = e.exit_code
        self.error = e.to_dict()

    def to_dict(self) -> dict[str, Any]:
        """Redacted: the target's output, errors and repository may carry a password."""
        return redact_data(self._fields())

    def _fields(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "target": self.target,
            "snapshot": self.snapshot,
            "ok": self.ok,
            "exit_code": self.exit_code,
            "phases": self.phases,
            "mounts": self.mounts,
            "backup": self.result.to_dict() if self.result else None,
            "verify": self.verify.to_dict() if self.verify else None,
            "drill": self.drill.to_dict() if self.drill is not None else None,
            "retention": self.retention,
            "already_backed_up": self.already_backed_up,
            "cleanup": self.cleanup,
            "warnings": self.warnings,
            "error": self.error,
            "duration_s": round(self.duration_s, 6),
        }


class _Phases:
    def __init__(self, into: list[dict[str, Any]], events: EventFn | None = None) -> None:
        self.into = into
        self.events = events

    @contextlib.contextmanager
    def __call__(self, name: str, detail: str | None = None) -> Iterator[dict[str, Any]]:
        rec: dict[str, Any] = {"name": name, "start": time.time(), "ok": False}
        if detail:
            rec["detail"] = detail
        t0 = time.monotonic()
        emit(self.events, "start", name, detail=detail)
        try:
            yield rec
            rec["ok"] = True
        finally:
            rec["duration_s"] = round(time.monotonic() - t0, 6)
            rec["end"] = rec["start"] + rec["duration_s"]
            self.into.append(rec)
            emit(self.events, "end", name, ok=rec["ok"], duration_s=rec["duration_s"])


def _progress_events(events: EventFn | None, name: str) -> ProgressFn | None:
    """A target's or the verification's progress samples as ``progress`` events."""
    if events is None:
        return None

    def report(u: ProgressUpdate) -> None:
        events(Event(
            "progress", name, done=u.bytes_done, total=u.total_bytes, files=u.files_done,
            total_files=u.total_files,
        ))  # fmt: skip

    return report


def _both(a: ProgressFn | None, b: ProgressFn | None) -> ProgressFn | None:
    if a is None or b is None:
        return a or b

    def both(u: ProgressUpdate) -> None:
        a(u)
        b(u)

    return both


def newest_snapshot(job: str, state: str | Path | None = None) -> Any:
    """The newest manifest of ``job`` (snapshot/store.py), or a UsageError if there is none."""
    from quiesce import snapshot as snapshots

    mans = [m for m in snapshots.list_manifests(state) if m.job == job]
    if not mans:
        raise UsageError(
            f"job {job} has no snapshot to back up",
            "take one first: `quiesce run JOB.toml` (or `quiesce snapshot create`)",
        )
    return mans[-1]


def _created(man: Any) -> datetime:
    from quiesce.snapshot.store import created_at

    return created_at(man)


def _held(state: Path, manifests: list[Any]) -> set[str]:
    """Manifests a live run is reading, or that are mounted anywhere."""
    from quiesce import snapshot as snapshots

    held = set(held_snapshot_ids(state))
    for man in manifests:
        if any(snapshots.mounts_of(s) for s in man.snapshot_objects()):
            held.add(man.id)
    return held


def apply_snapshot_retention(
    job: str, policy: RetentionPolicy, state: Path, *, keep: frozenset[str] | set[str] = frozenset()
) -> dict[str, Any]:
    """Delete the job's snapshots that ``policy`` does not keep (never a held one).

    Only complete snapshots (``Manifest.complete``: backed up, verified, drilled, as
    configured) count towards the keep_* rules. An incomplete one is kept until a complete
    run is newer than it, then deleted; both are listed under ``incomplete``."""
    from quiesce import snapshot as snapshots

    mans = [m for m in snapshots.list_manifests(state) if m.job == job]
    in_use = _held(state, mans)  # mounted, or named by a live run's journal
    held = in_use | set(keep)
    complete = [m for m in mans if m.complete or m.id in keep]
    complete_ids = {m.id for m in complete}
    decision = decide({m.id: _created(m) for m in complete}, policy, held)
    newest = max((_created(m) for m in complete), default=None)
    incomplete: dict[str, list[str]] = {"kept": [], "deleted": []}
    doomed = list(decision.delete)
    for m in mans:
        if m.id in complete_ids:
            continue
        if m.id in held:
            decision.keep[m.id] = ["held"]
        elif newest is not None and _created(m) < newest:
            doomed.append(m.id)
            incomplete["deleted"].append(m.id)
        else:
            incomplete["kept"].append(m.id)  # until the next complete run
    deleted, failed = [], []
    for snap_id in doomed:
        try:
            snapshots.delete(snap_id, state)
            deleted.append(snap_id)
        except QuiesceError as e:  # mounted meanwhile, storage error: keep going
            failed.append(f"{snap_id}: {e.message}")
    return {
        "kept": decision.keep,
        "deleted": deleted,
        "failed": failed,
        "held": sorted(in_use),  # not the run's own new snapshot: it is simply kept
        "incomplete": incomplete,
    }


def _record_backup(
    manifest: Any, cfg: BackupConfig, report: BackupReport, state: Path
) -> str | None:
    """The backup's outcome into the manifest (what ``Manifest.complete`` reads). A
    failed retry never undoes an earlier success. Returns a warning if it cannot."""
    from quiesce import snapshot as snapshots

    before = getattr(manifest, "backup", None) or {}
    if not report.ok and before.get("ok"):
        return None
    manifest.backup = {
        "ok": report.ok,
        "verified": (report.verify.ok if report.verify else None),
        "verify": cfg.verify,
        "target": cfg.target,
        "backup_id": report.result.snapshot_id if report.result else None,
        "already_backed_up": report.already_backed_up,
        "error": (report.error or {}).get("message"),
    }
    try:
        snapshots.save_manifest(state, manifest)
    except (OSError, QuiesceError) as e:
        return f"could not record the backup in the manifest {manifest.id}: {e}"
    return None


def run_backup(
    manifest: Any,
    cfg: BackupConfig,
    *,
    job: str,
    state: str | Path | None = None,
    retention: RetentionPolicy | None = None,
    progress: ProgressFn | None = None,
    rng: random.Random | None = None,
    events: EventFn | None = None,
    force: bool = False,
    drill: DrillFn | None = None,
) -> BackupReport:
    """Back up the snapshot of ``manifest`` to ``cfg``'s target. Never raises for the
    run's own failures: they are in ``report.error`` (like job.run_job). ``events``
    hears each phase start and end, and the backup's and verification's progress.

    A snapshot the target already holds a backup of is not backed up again: that
    backup is reported (``already_backed_up``), unless ``force``. The target's pruning
    never removes the backup this call made or reported. ``drill`` (``verify`` holds
    ``app``) runs on the read-only mounts after the verification, before any pruning;
    a failed drill stops the pruning and ends with exit code 13."""
    state_path = state_dir(state)
    report = BackupReport(job=job, target=cfg.target, snapshot=getattr(manifest, "id", None))
    phase = _Phases(report.phases, events)
    t0 = time.monotonic()
    try:
        with job_lock(state_path, job, "backup"):
            with phase("cleanup"):
                left = cleanup(state_path)
                if left.removed or left.errors:
                    report.cleanup = left.to_dict()
                    report.warnings += [f"cleanup: {e}" for e in left.errors]
            try:
                _backup_and_verify(
                    manifest, cfg, job, state_path, report, phase,
                    _both(progress, _progress_events(events, "backup")),
                    _progress_events(events, "verify"), rng, force=force, drill=drill,
                )  # fmt: skip
            except QuiesceError as e:
                report.set_error(e)
            if hasattr(manifest, "backup"):
                problem = _record_backup(manifest, cfg, report, state_path)
                if problem:
                    report.warnings.append(problem)
            policy = retention or RetentionPolicy()
            if report.ok and (cfg.delete_snapshot or not policy.empty):
                with phase("retention"):
                    report.retention = _snapshot_retention(manifest, cfg, policy, job, state_path)
                    report.warnings += [f"retention: {f}" for f in report.retention["failed"]]
            if report.ok and cfg.prune and not policy.empty:
                with phase("prune", f"{cfg.target} forget/prune"):
                    target = make_target(cfg, job, state_path)
                    made = target.source_key(manifest.id, _created(manifest))
                    pruned = target.forget_prune(policy, keep={made})
                    report.retention = (report.retention or {}) | {"target": pruned.to_dict()}
    except QuiesceError as e:
        report.set_error(e)
    report.duration_s = time.monotonic() - t0
    return report


def _snapshot_retention(
    manifest: Any, cfg: BackupConfig, policy: RetentionPolicy, job: str, state: Path
) -> dict[str, Any]:
    """Delete the snapshot just backed up (``delete_snapshot``), then apply ``policy``
    to the job's other snapshots; the one just backed up is never pruned by policy."""
    from quiesce import snapshot as snapshots

    out: dict[str, Any] = {"kept": {}, "deleted": [], "failed": [], "held": []}
    if cfg.delete_snapshot:
        try:
            snapshots.delete(manifest.id, state)
            out["deleted"].append(manifest.id)
            out["deleted_backed_up"] = manifest.id  # delete_snapshot: the one just backed up
        except QuiesceError as e:
            out["failed"].append(f"{manifest.id}: {e.message}")
    if not policy.empty:
        more = apply_snapshot_retention(job, policy, state, keep={manifest.id})
        out["kept"] = more["kept"]
        out["deleted"] += more["deleted"]
        out["failed"] += more["failed"]
        out["held"] = more["held"]
        out["incomplete"] = more["incomplete"]
    return out


def _backup_and_verify(
    manifest: Any,
    cfg: BackupConfig,
    job: str,
    state: Path,
    report: BackupReport,
    phase: _Phases,
    progress: ProgressFn | None,
    verify_progress: ProgressFn | None,
    rng: random.Random | None,
    *,
    force: bool = False,
    drill: DrillFn | None = None,
) -> None:
    from quiesce.providers.registry import get_provider

    snaps = manifest.snapshot_objects()
    provider = get_provider(manifest.provider).from_record(manifest.options)
    target = make_target(cfg, job, state)
    if cfg.init:
        with phase("init"):
            target.init()
    if not force and _report_existing(target, manifest, report, phase):
        return
    with Journal.open(state, job=job, undo=UNDO) as journal, contextlib.ExitStack() as mounts:
        with phase("mount") as rec:
            mounted = mounts.enter_context(
                mounted_snapshots(
                    snaps,
                    job=job,
                    journal=journal,
                    root=cfg.mount_root,
                    provider=provider,
                    holds=manifest.id,
                )
            )
            rec["detail"] = ", ".join(str(m.path) for m in mounted)
        try:
            report.mounts = [m.to_dict() for m in mounted]
            for m in mounted:
                report.warnings += m.warnings
            root = Path(cfg.mount_root) / job
            names = [m.slug for m in mounted]
            # a SIGKILLed restic leaves its lock: rollback (or cleanup) removes it
            locked = journal_repository(journal, cfg, job, state) if cfg.repository else None
            with phase("backup", f"{cfg.target} of {len(names)} volume(s)"):
                report.result = target.backup(
                    root,
                    paths=names,
                    tags=[*cfg.tags, f"quiesce-snapshot={manifest.id}"],
                    host=cfg.host or socket.gethostname(),
                    time=_created(manifest),
                    progress=progress,
                    timeout=cfg.timeout,
                )
            if cfg.check != "none":
                with phase("verify", cfg.check):
                    report.verify = verify(
                        target, report.result, root, names, cfg.check,
                        sample_files=cfg.sample_files, temp_root=cfg.verify_dir,
                        journal=journal, rng=rng, progress=verify_progress,
                    )  # fmt: skip
                if not report.verify.ok:
                    shown = "; ".join(report.verify.mismatches[:3]) or report.verify.detail
                    report.set_error(
                        VerifyFailed(f"verification ({cfg.check}) of the backup failed: {shown}")
                    )
            if cfg.drill:
                _drill(manifest, snaps, mounted, journal, state, report, phase, drill)
            if locked is not None:
                journal.done(locked)
        finally:
            with phase("umount"):
                mounts.close()


def _drill(
    manifest: Any,
    snaps: Sequence[Any],
    mounted: Sequence[Any],
    journal: Journal,
    state: Path,
    report: BackupReport,
    phase: _Phases,
    drill: DrillFn | None,
) -> None:
    """The restore drill on the read-only mounts; its result goes into the manifest too
    (retention reads ``manifest.drill.ok``)."""
    from quiesce import snapshot as snapshots

    if drill is None:
        report.warnings.append(
            "verify = app: no restore drill was given to this backup (quiesce.job runs it)"
        )
        return
    with phase("drill", "applications recover on a copy of the snapshot"):
        pairs = [(s.volume, m.path) for s, m in zip(snaps, mounted, strict=True)]
        report.drill = drill(manifest, pairs, journal)
    manifest.drill = report.drill.to_dict()
    try:
        snapshots.save_manifest(state, manifest)
    except (OSError, QuiesceError) as e:
        report.warnings.append(f"cannot record the drill in the manifest {manifest.id}: {e}")
    if not report.drill.ok and report.ok:
        report.set_error(
            DrillFailed(f"the restore drill of {manifest.id} failed: {report.drill.summary()}")
        )


def _report_existing(target: Target, manifest: Any, report: BackupReport, phase: _Phases) -> bool:
    """If the target holds a backup of this snapshot, report it (newest) and say so."""
    if not target.lists_backups:
        return False
    with phase("existing", "a backup of this snapshot in the target"):
        try:
            found = target.backups_of(manifest.id, _created(manifest))
        except QuiesceError:  # no repository yet: the backup itself will say what is wrong
            return False
    if not found:
        return False
    newest = max(found, key=lambda s: s.time)
    report.already_backed_up = True
    report.result = BackupResult(
        target=target.name, snapshot_id=newest.id, bytes=0, files=0, duration_s=0.0,
        location=newest.paths[0] if target.name == "tar" and newest.paths else None,
        extra={"already_backed_up": True},
    )  # fmt: skip
    report.warnings.append(
        f"snapshot {manifest.id} was already backed up as {target.name} backup {newest.id}: "
        "reported that backup, made none (--force makes another)"
    )
    return True


__all__ = [
    "BackupReport",
    "DrillFailed",
    "DrillFn",
    "VerifyFailed",
    "apply_snapshot_retention",
    "make_target",
    "newest_snapshot",
    "run_backup",
]
