"""Layer backup: back up from the snapshot: mount it read-only at a stable path, hand it
to a target (restic, borg, tar), verify, unmount, prune; and restore.

The pieces, each usable alone: :mod:`.mount` (read-only mounts at stable paths),
:mod:`.targets` (restic / borg / tar behind :class:`~.targets.base.Target`),
:mod:`.verification`, :mod:`.restoring`, and :mod:`.phase` (the whole phase, as
``quiesce backup`` runs it). Names are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from quiesce.util.lazy import lazy_exports

if TYPE_CHECKING:
    from quiesce.backup.config import BackupConfig
    from quiesce.backup.phase import (
        BackupReport,
        VerifyFailed,
        make_target,
        newest_snapshot,
        run_backup,
    )
    from quiesce.backup.restoring import restore
    from quiesce.backup.targets.base import (
        BackupError,
        BackupResult,
        CheckResult,
        PruneResult,
        Target,
    )
    from quiesce.backup.verification import VerifyResult, verify

__getattr__ = lazy_exports(
    __name__,
    {
        "BackupConfig": ".config:BackupConfig",
        "BackupError": "quiesce.errors:BackupError",
        "BackupReport": ".phase:BackupReport",
        "BackupResult": ".targets.base:BackupResult",
        "CheckResult": ".targets.base:CheckResult",
        "PruneResult": ".targets.base:PruneResult",
        "Target": ".targets.base:Target",
        "VerifyFailed": "quiesce.errors:VerifyFailed",
        "VerifyResult": ".verification:VerifyResult",
        "make_target": ".phase:make_target",
        "newest_snapshot": ".phase:newest_snapshot",
        "restore": ".restoring:restore",
        "run_backup": ".phase:run_backup",
        "verify": ".verification:verify",
    },
)

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
    "restore",
    "run_backup",
    "verify",
]
