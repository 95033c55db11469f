"""Cleanup with the backup layer's undo too: a ``repository`` journal entry (a backup
target a run was writing to) has the stale locks that the run's SIGKILLed restic left
removed, so the next run does not fail with "repository is already locked".

A run journals its repository before the target runs (:func:`journal_repository`);
``quiesce cleanup`` and the backup phase use this module's :func:`cleanup`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quiesce.backup.config import BackupConfig
from quiesce.backup.targets import make_target
from quiesce.snapshot import cleanup as snapshot_cleanup
from quiesce.snapshot.cleanup import UNDO as SNAPSHOT_UNDO
from quiesce.state.cleanup import CleanupReport
from quiesce.state.journal import Journal
from quiesce.state.undo import UndoFn
from quiesce.util.redact import redact_url


def journal_repository(journal: Journal, cfg: BackupConfig, job: str, state: Path) -> int:
    """Record the target a run is about to write to (restic, borg), before it runs."""
    return journal.intent(
        "repository",
        tool=cfg.target,
        location=redact_url(cfg.repository or cfg.directory or ""),
        config=cfg.model_dump(),
        job=job,
        state=str(state),
    )


def undo_repository(e: dict[str, Any]) -> None:
    """Remove the stale locks this host's dead processes left in the repository."""
    cfg = BackupConfig.model_validate(e["config"], strict=False)
    make_target(cfg, e["job"], Path(e["state"])).remove_stale_locks()


UNDO: dict[str, UndoFn] = {**SNAPSHOT_UNDO, "repository": undo_repository}


def cleanup(state: str | Path | None = None, *, dry_run: bool = False) -> CleanupReport:
    """:func:`quiesce.snapshot.cleanup.cleanup` that also unlocks repositories. The
    target's configuration (it may name a password variable) is not reported."""
    rep = snapshot_cleanup.cleanup(state, dry_run=dry_run, undo=UNDO)
    for r in rep.removed:
        r.pop("config", None)
    return rep


__all__ = ["UNDO", "cleanup", "journal_repository", "undo_repository"]
