"""Built-in writers: quiescers for applications quiesce knows (SQLite, PostgreSQL, MariaDB).

Each writer is a :class:`quiesce.snapshot.Quiescer`: ``before_freeze()`` takes the
application's lock (raising :class:`WriterError` if it cannot) and ``after_thaw(ok)``
releases it. They work on their own with ``snapshots.create(..., quiescers=[...])``;
a job wraps them so that its ``on_hook_failure`` policy applies.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from quiesce.errors import ExitCode, QuiesceError
from quiesce.snapshot.consistency import Claim
from quiesce.sys.lazy import lazy_exports

if TYPE_CHECKING:
    from quiesce.apps.writers.mysql import MysqlWriter
    from quiesce.apps.writers.postgresql import PostgresWriter
    from quiesce.apps.writers.sqlite import SqliteWriter


class WriterError(QuiesceError):
    """A built-in writer could not quiesce (or release) its application."""

    exit_code = ExitCode.HOOK
    default_hint = "check that the server is running and that the job's connection settings work"


class Writer:
    """Base: a name for the report, what the writer learned (``info``), and the server
    connection (``conn``) whose session holds the lock, if the writer has one."""

    kind: str = "writer"

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
    "MysqlWriter",
    "PostgresWriter",
    "SqliteWriter",
    "Writer",
    "WriterError",
    "need_module",
]
