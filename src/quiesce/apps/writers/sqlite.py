"""SQLite: checkpoint the WAL, then hold a write lock (BEGIN IMMEDIATE) across the window.

With the lock held no connection can commit, so the snapshot holds exactly the
committed state. When the WAL is also empty under the lock (a TRUNCATE checkpoint that
no commit followed before the lock), the database file alone holds it: the level is
``clean`` (a restore opens with nothing to replay). Otherwise the -wal holds commits
that SQLite replays on open: ``atomic``.
Readers go on. Writers wait in their busy handler: give them a ``busy_timeout``
longer than the window plus the hooks, or they see SQLITE_BUSY.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

from quiesce.apps.writers import Writer, WriterError
from quiesce.snapshot.consistency import Claim, Consistency

CHECKPOINT_MODES = ("PASSIVE", "FULL", "RESTART", "TRUNCATE")
_BESIDE = (("-wal", "WAL"), ("-shm", "WAL index"), ("-journal", "rollback journal"))


class SqliteWriter(Writer):
    kind = "sqlite"

    def __init__(
        self,
        databases: Sequence[str | Path],
        *,
        busy_timeout: float = 10.0,
        checkpoint: str = "TRUNCATE",
        name: str | None = None,
    ) -> None:
        super().__init__(name or "sqlite")
        if checkpoint.upper() not in CHECKPOINT_MODES:
            raise ValueError(f"checkpoint must be one of {CHECKPOINT_MODES}")
        self.databases = [Path(d) for d in databases]
        self.busy_timeout = busy_timeout
        self.checkpoint = checkpoint.upper()
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
            for attempt in range(1, 4 if mode == "wal" and checkpoint else 2):
                if mode == "wal" and checkpoint:
                    busy, log, done = conn.execute(
                        f"PRAGMA wal_checkpoint({self.checkpoint})"
                    ).fetchone()
                    info["checkpoint"] = {
                        "busy": bool(busy), "wal_frames": log, "checkpointed": done,
                    }  # fmt: skip
                conn.execute("BEGIN IMMEDIATE")
                if mode != "wal":
                    break
                # under the lock no commit can land in the WAL any more; one that came
                # between the checkpoint and the lock: drop the lock, checkpoint again
                info["wal_bytes_held"] = _size(Path(f"{db}-wal"))
                info["attempts"] = attempt
                if info["wal_bytes_held"] == 0 or attempt == 3 or self.checkpoint != "TRUNCATE":
                    break
                conn.execute("ROLLBACK")
        except sqlite3.Error as e:
            conn.close()
            raise WriterError(
                f"sqlite: cannot lock {db}: {e}",
                "a writer held the database longer than busy_timeout; raise it in the job",
            ) from None
        if checkpoint:
            self.info[str(db)] = info
        return conn

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
            held = info.get("wal_bytes_held")
            if info.get("journal_mode") != "wal":
                says = f"write lock held across the window on {db} ({info.get('journal_mode')})"
                out.append(Claim(f"writer {self.name}", Consistency.CLEAN, says, held=True))
            elif held == 0 and self.checkpoint == "TRUNCATE":
                says = f"WAL empty under the write lock held across the window on {db}"
                out.append(Claim(f"writer {self.name}", Consistency.CLEAN, says, held=True))
            else:
                says = (
                    f"write lock held across the window on {db}; its WAL held {held} bytes "
                    "under the lock: SQLite replays them on open"
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
