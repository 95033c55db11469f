"""The ``[backup]`` section of a job file.

Strict like the rest of the job schema (job.py): unknown keys and wrong types are
problems with their key path. Password *values* never appear in a job file: it names a
file or an environment variable that holds one.

    [backup]
    target = "restic"                  # restic | borg | tar
    repository = "/srv/backup/restic"  # restic/borg repository (tar: `directory`)
    password_file = "/etc/quiesce/restic.pass"
    tags = ["nightly"]
    verify = "sample"                  # none | repository | sample | full | app
    # or a list: verify = ["sample", "app"] (one backup check, plus the restore drill)
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, model_validator

from quiesce.snapshot.readonly import DEFAULT_MOUNT_ROOT
from quiesce.util.redact import register_url_secrets

Verify = Literal["none", "repository", "sample", "full", "app"]
BACKUP_CHECKS = ("none", "repository", "sample", "full")


class BackupConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    target: Literal["restic", "borg", "tar"]
    # restic / borg
    repository: str | None = None
    password_file: str | None = None
    password_env: str | None = None  # the NAME of an environment variable holding it
    init: bool = False  # create the repository on first use
    host: str | None = None  # default: this machine's hostname
    tags: list[Annotated[str, Field(min_length=1)]] = []
    archive: str = "{job}-{time}"  # borg archive name; tar file name stem
    compression: str | None = None  # borg: "zstd,3"; tar: "zstd" (default) or "gzip"
    exclude: list[str] = []
    extra_args: list[str] = []  # appended to the target's backup command
    # tar
    directory: str | None = None  # tar: where the .tar.zst and .sha256 files go
    command: list[Annotated[str, Field(min_length=1)]] | None = None  # tar: stream to stdin
    sha256_dir: str | None = None  # tar with `command`: where the .sha256 goes
    # the phase
    mount_root: str = DEFAULT_MOUNT_ROOT  # stable paths: <mount_root>/<job>/<volume>
    verify: Verify | list[Verify] = "sample"  # "app": the restore drill (apps/drills)
    sample_files: PositiveInt = 20
    verify_dir: str = "/var/tmp"  # restores for verification go to a temp dir here
    prune: bool = True  # pass [retention] to the target's forget --prune / prune
    timeout: PositiveFloat | None = None  # the backup command's own deadline (seconds)
    delete_snapshot: bool = False  # delete the snapshot after a good backup

    @property
    def verify_modes(self) -> list[str]:
        return [self.verify] if isinstance(self.verify, str) else list(self.verify)

    @property
    def check(self) -> str:
        """How the backup itself is checked (``none`` if only the drill is asked for)."""
        return next((m for m in self.verify_modes if m != "app"), "none")

    @property
    def drill(self) -> bool:
        """``app`` in ``verify``: the restore drill runs on the snapshot."""
        return "app" in self.verify_modes

    @model_validator(mode="after")
    def _target_needs(self) -> BackupConfig:
        problems = semantic_problems(self.model_dump())
        if problems:
            raise ValueError("; ".join(problems))
        register_url_secrets(self.repository)  # shown as *** from now on, wherever it is
        return self


def semantic_problems(raw: dict[str, Any]) -> list[str]:
    """What a target needs beyond the types (also run on a table that has type errors,
    so that one report lists everything)."""
    target = raw.get("target")
    problems = []
    if target in ("restic", "borg") and not raw.get("repository"):
        problems.append(f"the {target} target needs `repository`")
    if target == "tar":
        if bool(raw.get("directory")) == bool(raw.get("command")):
            problems.append("the tar target needs exactly one of `directory` or `command`")
        if raw.get("compression") not in (None, "zstd", "gzip"):
            problems.append("tar compression must be 'zstd' or 'gzip'")
        if raw.get("command") and _backup_check(raw.get("verify", "sample")) in ("sample", "full"):
            problems.append(
                "a tar stream sent to a command cannot be read back: use verify = "
                "'none' or 'repository', or write to `directory`"
            )
    modes = raw.get("verify", "sample")
    if isinstance(modes, list):
        checks = [m for m in modes if m in BACKUP_CHECKS]
        if not modes or len(set(modes)) != len(modes) or len(checks) > 1 or "none" in modes:
            problems.append(
                "verify: a list holds at most one of 'repository', 'sample', 'full' and "
                '\'app\', each once (e.g. verify = ["sample", "app"])'
            )
    if raw.get("password_file") and raw.get("password_env"):
        problems.append("give either `password_file` or `password_env`, not both")
    return problems


def _backup_check(verify: object) -> object:
    if isinstance(verify, list):
        return next((m for m in verify if m != "app"), "none")
    return verify


__all__ = ["BACKUP_CHECKS", "DEFAULT_MOUNT_ROOT", "BackupConfig", "Verify", "semantic_problems"]
