"""Restore drills: each application started on a throwaway writable copy of a snapshot
(an overlay over its read-only mount), left to recover, checked with its own tool, and
removed (``[backup] verify = "app"``, ``quiesce verify --app SNAPSHOT``; docs/jobs.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from quiesce.util.lazy import lazy_exports

if TYPE_CHECKING:
    from quiesce.apps.drills.base import AppDrill, AppTarget, DrillReport
    from quiesce.apps.drills.run import (
        backup_drill,
        drill_mounted,
        drill_snapshot,
        targets_from_config,
        targets_from_manifest,
        targets_from_writers,
    )

__getattr__ = lazy_exports(
    __name__,
    {
        "AppDrill": ".base:AppDrill",
        "AppTarget": ".base:AppTarget",
        "DrillReport": ".base:DrillReport",
        "backup_drill": ".run:backup_drill",
        "drill_mounted": ".run:drill_mounted",
        "drill_snapshot": ".run:drill_snapshot",
        "targets_from_config": ".run:targets_from_config",
        "targets_from_manifest": ".run:targets_from_manifest",
        "targets_from_writers": ".run:targets_from_writers",
    },
)

__all__ = [
    "AppDrill",
    "AppTarget",
    "DrillReport",
    "backup_drill",
    "drill_mounted",
    "drill_snapshot",
    "targets_from_config",
    "targets_from_manifest",
    "targets_from_writers",
]
