"""Getting a job's data back: one command for restic, borg and tar.

A backup holds each volume under its slug (``/srv/db`` -> ``srv-db``), so a restore
lays them out the same way every night. It only ever writes into a new or empty
directory, and a tar stream is checked against its sha256 before it is unpacked. The
volumes keep the snapshot's owners and modes; a directory the restore makes is 0711, so
that a database's own user can reach its data directory (``pg_ctl start`` as postgres).
Files a writer returned (PostgreSQL's ``backup_label``) are written from the snapshot's
manifest into the restored data directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from quiesce.backup.config import BackupConfig
from quiesce.backup.phase import make_target
from quiesce.backup.targets.base import Target, TargetSnapshot
from quiesce.errors import BackupError, UsageError
from quiesce.util.redact import redact_url


@dataclass
class RestoreResult:
    backup_id: str
    backup_time: str
    target: str
    dest: str
    volumes: list[str]  # the slugs restored, each a directory in dest
    files: int
    bytes: int
    duration_s: float
    app_files: list[str] = field(default_factory=list)  # "wrote P", "removed P" (writers')
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def pick(backups: Sequence[TargetSnapshot], wanted: str | None, job: str) -> TargetSnapshot:
    """The newest backup, or the one ``wanted`` names (its id, or a unique prefix of it)."""
    if not backups:
        raise UsageError(
            f"job {job} has no backup yet", "run `quiesce run JOB.toml` or `quiesce backup`"
        )
    if wanted is None:
        return max(backups, key=lambda b: b.time)
    exact = [b for b in backups if b.id == wanted]
    found = exact or [b for b in backups if b.id.startswith(wanted)]
    if len(found) != 1:
        what = "matches several backups" if found else "is not a backup of this job"
        raise UsageError(f"{wanted!r} {what}", "see the ids in the target's own listing")
    return found[0]


def _refuse_nonempty(dest: Path) -> None:
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise UsageError(
            f"{dest} is not an empty directory", "restore into a new or empty directory"
        )


def _clear(dest: Path, created: bool) -> None:
    if not dest.is_dir():
        return
    for p in dest.iterdir():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    if created:
        dest.rmdir()


def _tree_size(root: Path) -> tuple[int, int]:
    files = size = 0
    for dirpath, _dirs, names in os.walk(root):
        for n in names:
            files += 1
            size += os.lstat(os.path.join(dirpath, n)).st_size
    return files, size


def restore(
    cfg: BackupConfig,
    *,
    job: str,
    state: Path,
    dest: Path,
    backup_id: str | None = None,
    volumes: Sequence[str] = (),
    target: Target | None = None,
    pitr: bool = False,
) -> RestoreResult:
    """Restore one backup of ``job`` (default: the newest) into ``dest``. ``pitr``:
    write PostgreSQL's backup_label as itself (recovery then needs the WAL archive),
    not as ``backup_label.quiesce``."""
    _refuse_nonempty(dest)
    target = target or make_target(cfg, job, state)
    where = redact_url(cfg.repository or cfg.directory or "the target")
    try:
        if not target.exists():
            raise UsageError(
                f"job {job} has no backup yet: {where} does not exist",
                "run `quiesce run JOB.toml` or `quiesce backup JOB.toml` first",
            )
        backups = target.snapshots()
    except BackupError as e:
        e.hint = f"check {where} and its password (the message above is {cfg.target}'s)"
        raise
    chosen = pick(backups, backup_id, job)
    verify_file = getattr(target, "verify_file", None)
    if verify_file is not None:  # tar: the stream must match its sha256 first
        ok, detail = verify_file(chosen.id)
        if not ok:
            raise BackupError(f"the tar backup {chosen.id} is damaged: {detail}", "")
    t0 = time.monotonic()
    created = not dest.exists()
    try:
        target.restore(chosen.id, dest, [v.strip("/") for v in volumes])
        took = time.monotonic() - t0
        got = sorted(p.name for p in dest.iterdir()) if dest.is_dir() else []
        missing = [v for v in volumes if v.strip("/") not in got]
        if missing:
            raise UsageError(
                f"backup {chosen.id} has no volume {', '.join(missing)}",
                "a volume is named by its mount point with '/' as '-' (/srv/db is srv-db)",
            )
    except BaseException:
        _clear(dest, created)  # new or empty before: everything in it is ours
        raise
    if created:  # restic makes it 0700: the data's own users (postgres) must reach it
        os.chmod(dest, 0o711)
    written, warnings = _write_app_files(chosen, job, state, dest, got, pitr)
    files, size = _tree_size(dest)
    return RestoreResult(
        backup_id=chosen.id,
        backup_time=chosen.time.isoformat(timespec="seconds"),
        target=cfg.target,
        dest=str(dest),
        volumes=got,
        files=files,
        bytes=size,
        duration_s=took,
        app_files=written,
        warnings=warnings,
    )


def _snapshot_of(backup: TargetSnapshot, job: str, state: Path) -> str | None:
    """The manifest a backup was made from: its restic tag, else (borg, tar) the job's
    snapshot taken at the backup's time (the backup carries the snapshot's time)."""
    from quiesce import snapshot as snapshots

    for tag in backup.tags:
        if tag.startswith("quiesce-snapshot="):
            return tag.split("=", 1)[1]
    when = backup.time if backup.time.tzinfo else backup.time.astimezone()
    for m in snapshots.list_manifests(state):
        created = datetime.fromisoformat(str(m.created).replace("Z", "+00:00"))
        if m.job == job and abs((created - when).total_seconds()) < 1:
            return m.id
    return None


def _write_app_files(
    backup: TargetSnapshot, job: str, state: Path, dest: Path, restored: list[str], pitr: bool
) -> tuple[list[str], list[str]]:
    """Write the files the snapshot's writers returned (PostgreSQL's backup_label) into
    the restored volumes, where the writer's data directory is; owned like that
    directory, mode 0600; remove the origin's postmaster.pid. From the snapshot's
    manifest."""
    from quiesce import snapshot as snapshots

    snap_id = _snapshot_of(backup, job, state)
    if snap_id is None:
        return [], []
    try:
        man = snapshots.load(snap_id, state)
    except UsageError:
        return [], []  # no manifest (deleted since): nothing known to write
    written: list[str] = []
    warnings: list[str] = []
    for f in man.app_files:
        rel = Path(str(f.get("path", "")))
        if f.get("slug") not in restored:
            if f.get("slug") is None:
                warnings.append(
                    f"{f['name']} of {f['writer']} is in the manifest {man.id} only: "
                    "copy it into the restored data directory"
                )
            continue
        if not rel.parts or rel.is_absolute() or ".." in rel.parts:
            warnings.append(f"{f['name']}: bad path {rel} in the manifest {man.id}")
            continue
        path = dest / str(f["slug"]) / rel
        if f.get("pitr") and not pitr:  # inactive: the data directory starts as it is
            path = path.with_name(path.name + ".quiesce")
        if f.get("remove"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                written.append(f"removed {path}")
            continue
        try:
            parent = os.lstat(path.parent)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(path, flags, 0o600)
            try:
                os.write(fd, str(f["content"]).encode())
                os.fchown(fd, parent.st_uid, parent.st_gid)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            warnings.append(f"cannot write {path}: {e.strerror}")
            continue
        written.append(f"wrote {path}")
    return written, warnings


__all__ = ["RestoreResult", "pick", "restore"]
