"""What the backup commands need from a job file.

``job.load_job`` validates the whole file (``[backup]``, ``[retention]`` and
``metrics_file`` included); this module hands the backup phase, ``quiesce systemd``
and the metrics the part of it they use.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quiesce.backup.config import BackupConfig
from quiesce.state.retention import RetentionPolicy


@dataclass
class BackupJob:
    """What the backup phase, ``quiesce systemd`` and the metrics need from a job."""

    name: str
    path: Path
    volumes: list[str]
    provider: str
    provider_options: dict[str, Any]
    state_dir: str | None
    run_timeout: float | None
    backup: BackupConfig | None
    retention: RetentionPolicy
    metrics_file: str | None
    config: Any = None  # job.JobConfig


def load_backup_job(path: str | Path) -> BackupJob:
    """Validate the whole job file (volumes are not probed: the backup reads a snapshot);
    raise job.JobConfigError with every problem."""
    from quiesce.job.validate import load_job

    job = load_job(path, check_volumes=False)
    c = job.config
    return BackupJob(
        name=job.name,
        path=Path(path),
        volumes=list(c.volumes),
        provider=c.provider.type,
        provider_options=c.provider.options,
        state_dir=c.state_dir,
        run_timeout=c.timeouts.run,
        backup=c.backup,
        retention=c.retention,
        metrics_file=c.metrics_file,
        config=c,
    )


__all__ = ["BackupJob", "load_backup_job"]
