"""SQLite: checkpoint the WAL, then hold a write lock (BEGIN IMMEDIATE) across the window.

With the lock held no connection can commit, so the snapshot holds exactly the
committed state. Under the lock a second connection checkpoints (PASSIVE: a checkpoint
needs no write lock): when every WAL frame is then in the database file, that file alone
holds every commit and the level is ``clean`` (a restore replays nothing); a reader that
pins old frames leaves some in the -wal, which SQLite replays on open: ``atomic``.
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
from quiesce.snapshot.consistency import Claim, Consistency

Checkpoint = Literal["PASSIVE", "FULL", "RESTART", "TRUNCATE"]
CHECKPOINT_MODES: tuple[str, ...] = get_args(Checkpoint)
_BESIDE = (("-wal", "WAL"), ("-shm", "WAL index"), ("-journal", "rollback journal"))


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

    def _lock(self, db: Path, *, checkpoint: bool = True) -> sqlite3.Connection:
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
            if mode == "wal" and checkpoint:
                busy, log, done = conn.execute(
                    f"PRAGMA wal_checkpoint({self.checkpoint})"
                ).fetchone()
                info["checkpoint"] = {"busy": bool(busy), "wal_frames": log, "checkpointed": done}
            conn.execute("BEGIN IMMEDIATE")
            if mode == "wal" and checkpoint:
                # under the lock no commit lands in the WAL any more: copy what is there
                # into the database file, and count what could not be
                info["wal_bytes_held"] = _size(Path(f"{db}-wal"))
                info["wal_frames_pending"] = self._backfill(db)
        except sqlite3.Error as e:
            conn.close()
            raise WriterError(
                f"sqlite: cannot lock {db}: {e}",
                "a writer held the database longer than busy_timeout; raise it in the job",
            ) from None
        if checkpoint:
            self.info[str(db)] = info
        return conn

    def _backfill(self, db: Path) -> int | None:
        """A PASSIVE checkpoint from a second connection while this one holds the write
        lock (a checkpoint needs no write lock): every WAL frame goes into the database
        file unless a reader still needs it. Returns the frames left out of the database
        file (None if it cannot tell). Through SQLite, never by opening -shm ourselves:
        closing any fd of that file drops this process's POSIX locks, the write lock too."""
        uri = f"file:{quote(str(db))}?mode=rw"
        try:
            other = sqlite3.connect(uri, uri=True, timeout=0.5, isolation_level=None)
        except sqlite3.Error:
            return None
        try:
            _busy, log, done = other.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error:
            return None
        finally:
            other.close()
        return None if log < 0 else max(log - done, 0)

    def _ask_files(self) -> list[tuple[str, str]]:
        """Each database and the journal files SQLite keeps beside it."""
        files = []
        for db in self.databases:
            files.append((str(db), "database"))
            files += [(f"{db}{sfx}", what) for sfx, what in _BESIDE]
        return files

    def readiness(self) -> list[str]:
        """Each database opens read-write and its write lock can be taken (and is
        dropped at once: nothing written)."""
        problems = []
        for db in self.databases:
            try:
                self._lock(db, checkpoint=False).close()
            except WriterError as e:
                problems.append(e.message)
        return problems

    def claims(self, frozen_ns: int | None) -> list[Claim]:
        """CLEAN for a database whose WAL was empty under the held lock (or that has no
        WAL: the lock keeps the rollback journal away); ATOMIC otherwise."""
        out = []
        for db in self.databases:
            info = self.info.get(str(db), {})
            pending = info.get("wal_frames_pending")
            if info.get("journal_mode") != "wal":
                says = f"write lock held across the window on {db} ({info.get('journal_mode')})"
                out.append(Claim(f"writer {self.name}", Consistency.CLEAN, says, held=True))
            elif pending == 0:
                says = (
                    f"write lock held across the window on {db}, every WAL frame already in "
                    "the database file: nothing to replay"
                )
                out.append(Claim(f"writer {self.name}", Consistency.CLEAN, says, held=True))
            else:
                said = f"{pending} WAL frame(s)" if pending is not None else "the WAL (not read)"
                says = (
                    f"write lock held across the window on {db}; {said} not yet in the "
                    "database file: SQLite replays them on open"
                )
                out.append(Claim(f"writer {self.name}", Consistency.ATOMIC, says, held=True))
        return out

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


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
