"""Backup targets behind one interface: restic, borg, tar; :func:`make_target` builds
the one a job's ``[backup]`` section names."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from quiesce.backup.config import BackupConfig
    from quiesce.backup.targets.base import Target


def make_target(cfg: BackupConfig, job: str, state: Path) -> Target:
    """The target object for a job's ``[backup]`` section."""
    if cfg.target == "restic":
        from quiesce.backup.targets.restic import from_config as restic

        return restic(cfg, job, cache_dir=state / "cache" / "restic")
    if cfg.target == "borg":
        from quiesce.backup.targets.borg import from_config as borg

        return borg(cfg, job, base_dir=state / "borg")
    from quiesce.backup.targets.tar import from_config as tar

    return tar(cfg, job)


__all__ = ["make_target"]
