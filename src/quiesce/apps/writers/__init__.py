"""Built-in writers: quiescers for applications quiesce knows (SQLite, PostgreSQL, MariaDB).

Each writer is a :class:`quiesce.snapshot.Quiescer`: ``before_freeze()`` takes the
application's lock (raising :class:`WriterError` if it cannot) and ``after_thaw(ok)``
releases it. They work on their own with ``snapshots.create(..., quiescers=[...])``;
a job wraps them so that its ``on_hook_failure`` policy applies.
"""

from __future__ import annotations

import contextlib
import re
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, Self

from pydantic import BaseModel, ConfigDict
from pydantic_core import PydanticCustomError

from quiesce.errors import WriterError
from quiesce.snapshot.consistency import Claim
from quiesce.util.lazy import lazy_exports

if TYPE_CHECKING:
    from quiesce.apps.writers.mysql import MysqlWriter
    from quiesce.apps.writers.postgresql import PostgresWriter
    from quiesce.apps.writers.sqlite import SqliteWriter


ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class Finding(NamedTuple):
    """A problem a writer's settings have on this machine (a file that is not there): the
    key it concerns (relative to the writer's table), what is wrong, what to do."""

    key: str
    message: str
    hint: str = ""


def problem(message: str, hint: str) -> PydanticCustomError:
    """A validation error with a hint: the job's validation shows both at the TOML key."""
    return PydanticCustomError("job_problem", message, {"hint": hint})


def check_password_env(value: str | None) -> str | None:
    """``password_env`` names an environment variable (never holds the password)."""
    if value is not None and not ENV_NAME_RE.match(value):
        raise problem(
            f"{value!r} is not an environment variable's name",
            'the NAME of the variable that holds the password: password_env = "DB_PW"',
        )
    return value


class WriterConfig(BaseModel):
    """A writer's settings: one model per writer, next to it, taken by its constructor and
    used as is by the job schema, the job builder and the fleet agent. Unknown keys are
    refused and TOML types are strict. Passwords never go in it: ``password_env`` names a
    variable, read by whoever builds the writer (job/build.py, the fleet agent)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    name: str | None = None  # in the report; default: the writer's kind (a job: its table)

    def findings(self) -> list[Finding]:
        """What the machine says about these settings (files that must exist)."""
        return []

    @classmethod
    def of(cls, config: Self | None, options: dict[str, Any]) -> Self:
        """The model a constructor was given, or one validated from its keywords (laxly:
        a Python caller may pass a Path or an int where TOML needs a string or a float)."""
        if config is None:
            return cls.model_validate(options, strict=False)
        if options:
            raise TypeError(f"pass either a {cls.__name__} or keywords, not both")
        return config


class Writer:
    """Base: a name for the report, what the writer learned (``info``), and the server
    connection (``conn``) whose session holds the lock, if the writer has one."""

    kind: str = "writer"
    Config: ClassVar[type[WriterConfig]] = WriterConfig

    def __init__(self, name: str) -> None:
        self.name = name
        self.info: dict[str, Any] = {}
        self.conn: Any = None
        self._files: list[tuple[str, str]] | None = None

    def _close(self) -> None:
        """Close the session (which releases whatever it still holds); never raises."""
        conn, self.conn = self.conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def before_freeze(self) -> None:
        raise NotImplementedError

    def after_thaw(self, ok: bool) -> None:
        raise NotImplementedError

    def describe(self) -> tuple[str, str | None]:
        """What it does before the window, and after it (None: nothing), for --dry-run."""
        raise NotImplementedError

    def depends_on(self) -> list[tuple[str, str]]:
        """Every file the application needs for a restore, ``[(path, what)]``, asked from
        the application itself (a WriterError if it cannot say). The run and `quiesce
        check` prove each lies on the group. Cached: asked once per writer."""
        if self._files is None:
            self._files = self._ask_files()
        return self._files

    def _ask_files(self) -> list[tuple[str, str]]:
        raise NotImplementedError

    def readiness(self) -> list[str]:
        """What would stop ``before_freeze`` (connection, privileges, the lock), checked
        without changing anything; each a sentence. For `quiesce check`."""
        try:
            self.depends_on()
        except WriterError as e:
            return [e.message + (f" ({e.hint})" if e.hint else "")]
        return []

    def claims(self, frozen_ns: int | None) -> list[Claim]:
        """What this writer did, for the consistency level (after the window)."""
        raise NotImplementedError


def need_module(module: str, package: str) -> Any:
    """Import a client library, or say how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise WriterError(
            f"the {package} client library is not installed",
            f"pip install 'quiesce[writers]' (or: pip install {package})",
        ) from None


__getattr__ = lazy_exports(
    __name__,
    {
        "MysqlWriter": ".mysql:MysqlWriter",
        "PostgresWriter": ".postgresql:PostgresWriter",
        "SqliteWriter": ".sqlite:SqliteWriter",
    },
)

__all__ = [
    "ENV_NAME_RE",
    "Finding",
    "MysqlWriter",
    "PostgresWriter",
    "SqliteWriter",
    "Writer",
    "WriterConfig",
    "WriterError",
    "check_password_env",
    "need_module",
    "problem",
]
