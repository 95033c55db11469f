"""SQLite: checkpoint the WAL, then hold a write lock (BEGIN IMMEDIATE) across the window.

With the lock held no connection can commit, so the snapshot holds exactly the
committed state (the database file plus its -wal, which SQLite replays on open).
Readers go on. Writers wait in their busy handler: give them a ``busy_timeout``
longer than the window plus the hooks, or they see SQLITE_BUSY.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, get_args
from urllib.parse import quote

from pydantic import Field, PositiveFloat

from quiesce.apps.writers import Finding, Writer, WriterConfig
from quiesce.errors import WriterError

Checkpoint = Literal["PASSIVE", "FULL", "RESTART", "TRUNCATE"]
CHECKPOINT_MODES: tuple[str, ...] = get_args(Checkpoint)


class SqliteConfig(WriterConfig):
    """``[[writers.sqlite]]``: the database files, and how long to wait for their lock."""

    databases: Annotated[list[str], Field(min_length=1)]
    busy_timeout: PositiveFloat = 10.0
    checkpoint: Checkpoint = "TRUNCATE"
    name: str | None = None

    def findings(self) -> list[Finding]:
        return [
            Finding(f"databases[{j}]", f"{db} does not exist", "give the database file's path")
            for j, db in enumerate(self.databases)
            if not Path(db).is_file()
        ]


class SqliteWriter(Writer):
    kind = "sqlite"
    Config = SqliteConfig

    def __init__(self, config: SqliteConfig | Sequence[str | Path], /, **options: Any) -> None:
        """``SqliteWriter(SqliteConfig(...))``, or the databases and the config's keys
        (``SqliteWriter(["/srv/app.db"], busy_timeout=30)``)."""
        if not isinstance(config, SqliteConfig):
            if isinstance(options.get("checkpoint"), str):
                options["checkpoint"] = options["checkpoint"].upper()
            options["databases"] = [str(d) for d in config]
        cfg = SqliteConfig.of(config if isinstance(config, SqliteConfig) else None, options)
        super().__init__(cfg.name or "sqlite")
        self.config = cfg
        self.databases = [Path(d) for d in cfg.databases]
        self.busy_timeout = cfg.busy_timeout
        self.checkpoint = cfg.checkpoint
        self.conns: list[sqlite3.Connection] = []

    def _lock(self, db: Path) -> sqlite3.Connection:
        # mode=rw: never create a database that is not there.
        uri = f"file:{quote(str(db))}?mode=rw"
        try:
            conn = sqlite3.connect(
                uri, uri=True, timeout=self.busy_timeout, isolation_level=None,
                check_same_thread=False,
            )  # fmt: skip
        except sqlite3.Error as e:
            raise WriterError(f"sqlite: cannot open {db}: {e}") from None
        try:
            mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
            info: dict[str, object] = {"journal_mode": mode}
            if mode == "wal":
                busy, log, done = conn.execute(
                    f"PRAGMA wal_checkpoint({self.checkpoint})"
                ).fetchone()
                info["checkpoint"] = {"busy": bool(busy), "wal_frames": log, "checkpointed": done}
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            conn.close()
            raise WriterError(
                f"sqlite: cannot lock {db}: {e}",
                "a writer held the database longer than busy_timeout; raise it in the job",
            ) from None
        self.info[str(db)] = info
        return conn

    def describe(self) -> tuple[str, str | None]:
        dbs = ", ".join(str(d) for d in self.databases)
        return (
            f"{self.checkpoint} WAL checkpoint, then BEGIN IMMEDIATE on {dbs}",
            "ROLLBACK (release the write lock)",
        )

    def before_freeze(self) -> None:
        try:
            for db in self.databases:
                self.conns.append(self._lock(db))
        except BaseException:
            self.after_thaw(False)
            raise

    def after_thaw(self, ok: bool) -> None:
        conns, self.conns = self.conns, []
        for conn in reversed(conns):
            try:
                conn.execute("ROLLBACK")  # we changed nothing: just drop the lock
            except sqlite3.Error:
                pass
            finally:
                conn.close()
