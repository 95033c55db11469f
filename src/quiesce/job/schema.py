"""Job files: the schema of a TOML job, and its validation.

A job names the volumes, the provider, hooks, writers, timeouts, the backup and the
fallback policy (docs/jobs.md). Validation (validate.py) reports every problem at once,
each with its TOML key path and a hint, before anything runs.
"""

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    PositiveFloat,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from quiesce.apps.writers import WriterConfig
from quiesce.apps.writers.mysql import MysqlConfig
from quiesce.apps.writers.postgresql import PostgresConfig
from quiesce.apps.writers.sqlite import SqliteConfig
from quiesce.backup.config import BackupConfig
from quiesce.errors import JobConfigError
from quiesce.providers.options import OPTIONS, ProviderOptions, options_model
from quiesce.providers.registry import PROVIDERS
from quiesce.state.retention import RetentionPolicy
from quiesce.util.redact import redact, redact_data

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# -- problems -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a job file: where (TOML key path), what, and what to do."""

    path: str
    message: str
    hint: str = ""

    def __str__(self) -> str:
        text = f"{self.path}: {self.message}" + (f" (hint: {self.hint})" if self.hint else "")
        return redact(text)

    def to_dict(self) -> dict[str, str]:
        """Redacted: a message may quote a value of the job file (a URL, a dsn)."""
        return redact_data({"path": self.path, "message": self.message, "hint": self.hint})


# -- the schema ---------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _argv(value: Any) -> Any:
    if isinstance(value, str):
        raise PydanticCustomError(
            "argv_string",
            "a command is a list of arguments, not a string: quiesce runs no shell",
        )
    return value


Argv = Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]
# A hook's own environment variables, on top of the clean base (apps.hooks.context):
# hooks inherit nothing else from quiesce, whose environment holds its passwords.
HookEnv = dict[str, str]


class CommandHookConfig(_Strict):
    command: Argv
    name: str | None = None
    timeout: PositiveFloat | None = None  # default: timeouts.hook
    env: HookEnv = {}
    depends_on: list[str] = []  # files the hook's application needs: proven on the group

    _check_argv = field_validator("command", mode="before")(_argv)


class SessionHookConfig(_Strict):
    command: Argv
    name: str | None = None
    ready_timeout: PositiveFloat | None = None  # default: timeouts.hook
    done_timeout: PositiveFloat | None = None
    env: HookEnv = {}
    depends_on: list[str] = []  # files the hook's application needs: proven on the group

    _check_argv = field_validator("command", mode="before")(_argv)


class HooksConfig(_Strict):
    pre_freeze: list[CommandHookConfig] = []
    post_thaw: list[CommandHookConfig] = []
    after_run: list[CommandHookConfig] = []  # last, on every outcome: notify, monitor
    session: list[SessionHookConfig] = []
    directory: str | None = None
    directory_timeout: PositiveFloat | None = None
    directory_env: HookEnv = {}  # the hook directory's scripts' own variables


class WritersConfig(_Strict):
    """``[writers]``: each writer's own model (apps/writers/<name>.py), taken as is by the
    writer's constructor."""

    sqlite: list[SqliteConfig] = []
    postgresql: list[PostgresConfig] = []
    mysql: list[MysqlConfig] = []


# A job's [writers] tables (and a fleet host's writer "type"s) by name.
WRITER_CONFIGS: dict[str, type[WriterConfig]] = {
    "sqlite": SqliteConfig,
    "postgresql": PostgresConfig,
    "mysql": MysqlConfig,
}


class TimeoutsConfig(_Strict):
    freeze: PositiveFloat = 30.0  # the guardian's deadline, from the first freeze
    lease: NonNegativeFloat = 5.0
    hook: PositiveFloat = 60.0  # default for each hook and writer step
    run: PositiveFloat = 3600.0  # the whole run (hooks are cut to what is left)
    # opt-in: end unprivileged processes whose writes keep a FIFREEZE waiting this long
    end_blockers_after: PositiveFloat | None = None


class ProviderConfig(BaseModel):
    """``type`` plus the provider's own options: every other key of the table, checked
    against that provider's option model (providers/options.py: unknown keys refused,
    TOML types strict). validate.py reports each bad key at its TOML path; this check
    makes a JobConfig built in Python refuse them too."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)
    type: str

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @property
    def settings(self) -> ProviderOptions:
        """The options as the provider's typed model."""
        return options_model(self.type).model_validate(self.options, strict=True)

    @model_validator(mode="after")
    def _check_options(self) -> "ProviderConfig":
        if self.type not in OPTIONS:
            return self  # validate.py lists the known providers
        try:
            OPTIONS[self.type].model_validate(self.options, strict=True)
        except ValidationError as e:
            said = "; ".join(f"provider.{_loc(err['loc'])}: {err['msg']}" for err in e.errors())
            raise ValueError(said) from None
        return self


def _loc(loc: Sequence[int | str]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


class JobConfig(_Strict):
    name: str | None = None
    volumes: Annotated[list[str], Field(min_length=1)]
    provider: ProviderConfig
    allow_self: bool = False
    syncfs: bool = True
    expedite: bool = True  # expedited RCU grace periods while the group freezes
    on_hook_failure: Literal["abort", "crash-consistent"] = "abort"
    state_dir: str | None = None
    timeouts: TimeoutsConfig = TimeoutsConfig()
    hooks: HooksConfig = HooksConfig()
    writers: WritersConfig = WritersConfig()
    backup: BackupConfig | None = None  # where the snapshot is backed up (restic/borg/tar)
    retention: RetentionPolicy = RetentionPolicy()
    metrics_file: str | None = None  # Prometheus textfile-collector output


@dataclass
class Job:
    """A validated job: its config, where it came from, and its name."""

    config: JobConfig
    name: str
    path: Path | None = None
    hook_dir_scripts: list[Path] = field(default_factory=list)


__all__ = [
    "NAME_RE",
    "PROVIDERS",
    "WRITER_CONFIGS",
    "CommandHookConfig",
    "HookEnv",
    "HooksConfig",
    "Job",
    "JobConfig",
    "JobConfigError",
    "MysqlConfig",
    "PostgresConfig",
    "Problem",
    "ProviderConfig",
    "SessionHookConfig",
    "SqliteConfig",
    "TimeoutsConfig",
    "WritersConfig",
]
