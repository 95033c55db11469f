"""Getting a job's data back: one command for restic, borg and tar.

A backup holds each volume under its slug (``/srv/db`` -> ``srv-db``), so a restore
lays them out the same way every night. It only ever writes into a new or empty
directory, and a tar stream is checked against its sha256 before it is unpacked.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from quiesce.backup.config import BackupConfig
from quiesce.backup.phase import make_target
from quiesce.backup.targets.base import BackupError, Target, TargetSnapshot
from quiesce.errors import UsageError
from quiesce.sys.redact import redact_url


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
) -> RestoreResult:
    """Restore one backup of ``job`` (default: the newest) into ``dest``."""
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
    )


__all__ = ["RestoreResult", "pick", "restore"]
