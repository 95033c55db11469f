"""The backup-related keys of a job file: ``[backup]``, ``[retention]``, ``metrics_file``.

job.py owns the job schema. Until its ``JobConfig`` carries these keys itself (see
:data:`JOB_FIELDS` for what to add), this module validates them on its own and the
rest of the file with ``JobConfig``, reporting every problem at once in job.py's style
(``JobConfigError``: key path, message, hint).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from ..errors import UsageError
from ..retention import RetentionPolicy
from .config import BackupConfig, semantic_problems


class BackupSections(BaseModel):
    """The keys this package adds to a job (top level of the TOML file)."""

    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)

    backup: BackupConfig | None = None
    retention: RetentionPolicy = RetentionPolicy()
    metrics_file: str | None = None


# What JobConfig (job.py) should declare so that `quiesce run` sees these sections:
#   backup: BackupConfig | None = None
#   retention: RetentionPolicy = RetentionPolicy()
#   metrics_file: str | None = None
JOB_FIELDS = tuple(BackupSections.model_fields)


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
    """Validate the whole job file; raise job.JobConfigError with every problem."""
    from .. import job as jobmod

    p = Path(path)
    try:
        raw = tomllib.loads(p.read_bytes().decode())
    except OSError as e:
        raise UsageError(
            f"cannot read job file {path}: {e.strerror}", "give the path of a TOML job file"
        ) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise jobmod.JobConfigError(
            str(path),
            [jobmod.Problem("(toml)", f"not valid TOML: {e}", "check the syntax near that line")],
        ) from None
    problems = jobmod._file_problems(p, "(job file)")
    ours: BackupSections | None = None
    try:
        ours = BackupSections.model_validate({k: raw[k] for k in JOB_FIELDS if k in raw})
    except ValidationError as e:
        errs = [dict(err) for err in e.errors()]
        problems += [_problem(err) for err in errs]
        section = raw.get("backup")
        if isinstance(section, dict) and not any(
            err["type"] == "value_error" and tuple(err["loc"]) == ("backup",) for err in errs
        ):
            problems += [jobmod.Problem("backup", m, "") for m in semantic_problems(section)]
    native = set(JOB_FIELDS) <= set(jobmod.JobConfig.model_fields)
    rest = raw if native else {k: v for k, v in raw.items() if k not in JOB_FIELDS}
    config = None
    try:
        config = jobmod.JobConfig.model_validate(rest)
    except ValidationError as e:
        problems += [
            jobmod._problem_from(dict(err))
            for err in e.errors()
            if err["loc"] and err["loc"][0] not in JOB_FIELDS
        ]
    if problems or config is None or ours is None:
        raise jobmod.JobConfigError(str(path), problems)
    name = config.name or (p.stem if jobmod.NAME_RE.match(p.stem) else "job")
    return BackupJob(
        name=name,
        path=p,
        volumes=list(config.volumes),
        provider=config.provider.type,
        provider_options=config.provider.options,
        state_dir=config.state_dir,
        run_timeout=config.timeouts.run,
        backup=ours.backup,
        retention=ours.retention,
        metrics_file=ours.metrics_file,
        config=config,
    )


def _problem(err: dict[str, Any]) -> Any:
    """A pydantic error of our sections, in job.py's words."""
    from .. import job as jobmod

    loc = tuple(err.get("loc", ()))
    if err.get("type") == "extra_forbidden" and loc:
        model: type[BaseModel] = BackupConfig if loc[0] == "backup" else RetentionPolicy
        import difflib

        allowed = sorted(model.model_fields)
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return jobmod.Problem(
            jobmod._key_path(loc), "unknown key", hint + "allowed here: " + ", ".join(allowed)
        )
    if err.get("type") == "value_error":
        msg = str(err.get("msg", "")).removeprefix("Value error, ")
        return jobmod.Problem(jobmod._key_path(loc) or "backup", msg, "")
    return jobmod._problem_from(err)


__all__ = ["JOB_FIELDS", "BackupJob", "BackupSections", "load_backup_job"]
