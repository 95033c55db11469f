"""Built-in writers, the public module: ``from quiesce.writers import PostgresWriter``.

A writer is a quiescer for an application quiesce knows: ``before_freeze()`` takes its
lock (raising :class:`WriterError` if it cannot) and ``after_thaw(ok)`` releases it.
Each takes its config model (``SqliteWriter(SqliteConfig(databases=[...]))``) or the
model's keys as keywords. The implementation lives in :mod:`quiesce.apps.writers`;
names are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from quiesce.errors import WriterError
from quiesce.util.lazy import lazy_exports

if TYPE_CHECKING:
    from quiesce.apps.writers import Writer, WriterConfig
    from quiesce.apps.writers.mysql import MysqlConfig, MysqlWriter
    from quiesce.apps.writers.postgresql import PostgresConfig, PostgresWriter
    from quiesce.apps.writers.sqlite import SqliteConfig, SqliteWriter

__getattr__ = lazy_exports(
    __name__,
    {
        "MysqlConfig": "quiesce.apps.writers.mysql:MysqlConfig",
        "MysqlWriter": "quiesce.apps.writers.mysql:MysqlWriter",
        "PostgresConfig": "quiesce.apps.writers.postgresql:PostgresConfig",
        "PostgresWriter": "quiesce.apps.writers.postgresql:PostgresWriter",
        "SqliteConfig": "quiesce.apps.writers.sqlite:SqliteConfig",
        "SqliteWriter": "quiesce.apps.writers.sqlite:SqliteWriter",
        "Writer": "quiesce.apps.writers:Writer",
        "WriterConfig": "quiesce.apps.writers:WriterConfig",
    },
)

__all__ = [
    "MysqlConfig",
    "MysqlWriter",
    "PostgresConfig",
    "PostgresWriter",
    "SqliteConfig",
    "SqliteWriter",
    "Writer",
    "WriterConfig",
    "WriterError",
]


def __dir__() -> list[str]:
    return sorted(set(__all__) | set(globals()))
