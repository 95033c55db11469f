"""Back up from the snapshot: mount it read-only at a stable path, hand it to a target
(restic, borg, tar), verify, unmount, prune.

The pieces, each usable alone: :mod:`.mount` (read-only mounts at stable paths),
:mod:`.restic` / :mod:`.borg` / :mod:`.tar` (targets behind :class:`.base.Target`),
:mod:`.verify`, and :mod:`.phase` (the whole phase, as ``quiesce backup`` runs it).
"""

from quiesce.backup.config import BackupConfig
from quiesce.backup.phase import (
    BackupReport,
    VerifyFailed,
    make_target,
    newest_snapshot,
    run_backup,
)
from quiesce.backup.targets.base import BackupError, BackupResult, CheckResult, PruneResult, Target
from quiesce.backup.verify import VerifyResult, verify

__all__ = [
    "BackupConfig",
    "BackupError",
    "BackupReport",
    "BackupResult",
    "CheckResult",
    "PruneResult",
    "Target",
    "VerifyFailed",
    "VerifyResult",
    "make_target",
    "newest_snapshot",
    "run_backup",
    "verify",
]
