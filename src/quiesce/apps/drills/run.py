"""Running the restore drill of a snapshot: which applications, the copy, each drill.

The applications come from the job's writers (PostgreSQL's ``data_directory`` as the
server reported it, SQLite's databases), from the snapshot's previous drill, or are
found on the snapshot (a PostgreSQL data directory holds ``PG_VERSION`` and
``global/pg_control``; a MariaDB one ``mysql/`` and ``ibdata1`` or ``aria_log_control``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from quiesce.apps.drills import mysql, postgresql, sqlite
from quiesce.apps.drills.base import (
    DEFAULT_TIMEOUT,
    AppDrill,
    AppTarget,
    DrillReport,
    WritableCopy,
    writable_copy,
)
from quiesce.errors import QuiesceError
from quiesce.state.journal import Journal

DRILLS: dict[str, Callable[..., AppDrill]] = {
    "postgresql": postgresql.drill,
    "mysql": mysql.drill,
    "sqlite": sqlite.drill,
}
DISCOVER_DEPTH = 3


def targets_from_writers(writers: Iterable[Any]) -> list[AppTarget]:
    """What the job's writers name. A writer that cannot say where its data is (a
    PostgreSQL role without pg_read_all_settings, MariaDB) is found on the snapshot:
    its kind is returned with an empty path."""
    out = []
    for w in writers:
        if w.kind == "sqlite":
            out += [AppTarget("sqlite", w.name, str(db)) for db in w.databases]
        elif w.kind == "postgresql":
            out.append(AppTarget("postgresql", w.name, w.info.get("data_directory", "")))
        elif w.kind == "mysql":
            out.append(AppTarget("mysql", w.name, str(w.info.get("datadir", ""))))
    return out


def targets_from_config(writers: Any) -> list[AppTarget]:
    """What a job's ``[writers]`` tables name without asking the servers (``quiesce
    backup``, ``quiesce verify --app --job``): SQLite's databases; PostgreSQL and
    MariaDB are found on the snapshot."""
    if writers is None:
        return []
    out = []
    for i, w in enumerate(writers.sqlite):
        out += [AppTarget("sqlite", w.name or f"sqlite[{i}]", db) for db in w.databases]
    for kind, tables in (("postgresql", writers.postgresql), ("mysql", writers.mysql)):
        out += [AppTarget(kind, w.name or f"{kind}[{i}]", "") for i, w in enumerate(tables)]
    return out


def targets_from_manifest(manifest: Any) -> list[AppTarget]:
    """The applications the snapshot's last drill checked."""
    drill = getattr(manifest, "drill", None) or {}
    return [AppTarget(a["kind"], a["name"], a["path"]) for a in drill.get("apps", [])]


def discover(copy: WritableCopy, depth: int = DISCOVER_DEPTH) -> list[AppTarget]:
    """PostgreSQL and MariaDB data directories on the snapshot (origin paths)."""
    found: list[AppTarget] = []
    for vol in copy.volumes:
        base = str(vol.path)
        for dirpath, dirs, files in os.walk(base):
            rel = os.path.relpath(dirpath, base)
            level = 0 if rel == "." else rel.count("/") + 1
            origin = os.path.normpath(os.path.join(vol.origin, rel))
            here = Path(dirpath)
            if "PG_VERSION" in files and (here / "global" / "pg_control").is_file():
                found.append(AppTarget("postgresql", "postgresql", origin))
                dirs[:] = []
            elif mysql.datadir_of(here):
                found.append(AppTarget("mysql", "mysql", origin))
                dirs[:] = []
            elif level >= depth:
                dirs[:] = []
    return found


def _resolve(targets: Sequence[AppTarget], copy: WritableCopy) -> list[AppTarget]:
    """Fill in the paths of writers that could not name theirs, from what is found."""
    if all(t.path for t in targets) and targets:
        return list(targets)
    found = discover(copy)
    out = [t for t in targets if t.path]
    named = {(t.kind, os.path.normpath(t.path)) for t in out}
    for t in targets:
        if t.path:
            continue
        for f in found:
            if f.kind == t.kind and (f.kind, f.path) not in named:
                out.append(AppTarget(t.kind, t.name, f.path))
                named.add((f.kind, f.path))
    if not targets:
        out = found
    return out


def drill_mounted(
    mounted: Sequence[tuple[str, Path]],
    targets: Sequence[AppTarget],
    *,
    snapshot: str | None,
    journal: Journal,
    scratch_root: str | Path = "/var/tmp",
    group_devs: Sequence[str] = (),
    timeout: float = DEFAULT_TIMEOUT,
) -> DrillReport:
    """Drill each application of a snapshot mounted read-only at ``mounted`` (origin
    mount point, path). Never raises for a failed drill: it is in the report."""
    report = DrillReport(snapshot)
    t0 = time.monotonic()
    try:
        with writable_copy(
            mounted, scratch_root=scratch_root, journal=journal, group_devs=group_devs
        ) as copy:
            apps = _resolve(targets, copy)
            if not apps:
                report.error = (
                    "no application to drill on the snapshot (no writer in the job, and no "
                    "PostgreSQL or MariaDB data directory found)"
                )
            for t in apps:
                left = max(timeout - (time.monotonic() - t0), 10.0)
                if not t.path:
                    report.apps.append(AppDrill(t.name, t.kind, "", detail="not on the snapshot"))
                    continue
                report.apps.append(DRILLS[t.kind](t, copy, timeout=left))
    except QuiesceError as e:
        report.error = e.message
    report.duration_s = time.monotonic() - t0
    return report


def drill_snapshot(
    manifest: Any,
    *,
    state: str | Path,
    targets: Sequence[AppTarget] | None = None,
    scratch_root: str | Path = "/var/tmp",
    mount_root: str | Path | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> DrillReport:
    """Mount ``manifest``'s snapshot read-only (held, journaled), drill it, unmount."""
    import contextlib

    from quiesce.backup.cleanup import UNDO
    from quiesce.backup.mount import DEFAULT_MOUNT_ROOT, mounted_snapshots
    from quiesce.providers.registry import get_provider

    snaps = manifest.snapshot_objects()
    provider = get_provider(manifest.provider).from_record(manifest.options)
    root = Path(mount_root or DEFAULT_MOUNT_ROOT) / ".drill"
    with Journal.open(state, job=manifest.job, undo=UNDO) as journal, contextlib.ExitStack() as st:
        mounted = st.enter_context(
            mounted_snapshots(
                snaps, job=manifest.job, journal=journal, root=root, provider=provider,
                holds=manifest.id,
            )
        )  # fmt: skip
        return drill_mounted(
            [(s.volume, m.path) for s, m in zip(snaps, mounted, strict=True)],
            targets if targets is not None else targets_from_manifest(manifest),
            snapshot=manifest.id,
            journal=journal,
            scratch_root=scratch_root,
            group_devs=[str(v.get("dev")) for v in manifest.volumes],
            timeout=timeout,
        )


def backup_drill(
    targets: Sequence[AppTarget] | None,
    *,
    scratch_root: str | Path,
    fallback: Sequence[AppTarget] = (),
    timeout: float = DEFAULT_TIMEOUT,
) -> Callable[[Any, Sequence[tuple[str, Path]], Journal], DrillReport]:
    """The drill the backup phase runs on its read-only mounts (``run_backup(drill=)``):
    ``targets`` from the run's writers, or None: the snapshot's previous drill, else
    ``fallback`` (the job's config), else what is found on it."""

    def run(manifest: Any, mounted: Sequence[tuple[str, Path]], journal: Journal) -> DrillReport:
        chosen = targets if targets is not None else targets_from_manifest(manifest)
        return drill_mounted(
            mounted,
            chosen or list(fallback),
            snapshot=manifest.id,
            journal=journal,
            scratch_root=scratch_root,
            group_devs=[str(v.get("dev")) for v in manifest.volumes],
            timeout=timeout,
        )

    return run


__all__ = [
    "backup_drill",
    "discover",
    "drill_mounted",
    "drill_snapshot",
    "targets_from_config",
    "targets_from_manifest",
    "targets_from_writers",
]
