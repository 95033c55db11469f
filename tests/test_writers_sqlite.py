"""The SQLite writer: WAL checkpoint, then BEGIN IMMEDIATE held across the window."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers.jobtools import HELPERS, mounted_image

from quiesce import snapshot as snapshots
from quiesce.apps.writers import WriterError
from quiesce.apps.writers.sqlite import SqliteWriter

pytestmark = pytest.mark.timeout(90)


class SqliteWriterProcess:
    """tests/helpers/sqlite_writer.py: one committed row per transaction, acked."""

    def __init__(self, db: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, str(HELPERS / "sqlite_writer.py"), str(db)],
                                     stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "ready"
        self.acks: list[tuple[float, int]] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("ack "):
                self.acks.append((time.monotonic(), int(line.split()[1])))

    def acked_before(self, t: float) -> int:
        return max((seq for when, seq in self.acks if when < t), default=0)

    def wait_for_acks(self, n: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while len(self.acks) < n:
            assert time.monotonic() < deadline, f"only {len(self.acks)} commits"
            time.sleep(0.01)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.thread.join(timeout=10)


def committed(db: Path) -> int:
    """The rows committed in ``db`` now, read by a read-only connection (WAL: readers
    are not blocked by the writer's lock)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT COALESCE(MAX(seq), 0) FROM t").fetchone()[0])
    finally:
        conn.close()


class Timed:
    """Records when the wrapped writer held its lock, and what was committed then."""

    def __init__(self, inner: SqliteWriter, db: Path) -> None:
        self.inner, self.db = inner, db
        self.locked_at = 0.0
        self.at_lock = self.at_release = -1

    def before_freeze(self) -> None:
        self.inner.before_freeze()
        self.locked_at = time.monotonic()
        self.at_lock = committed(self.db)

    def after_thaw(self, ok: bool) -> None:
        self.at_release = committed(self.db)
        self.inner.after_thaw(ok)

    def depends_on(self) -> list[tuple[str, str]]:
        return self.inner.depends_on()

    def claims(self, frozen_ns: int | None) -> list:
        return self.inner.claims(frozen_ns)


def test_snapshot_holds_every_row_committed_before_the_lock(loopfs, tmp_path):
    # The writer fills ~5 MB/s, and a TRUNCATE checkpoint may wait up to busy_timeout
    # for it: room for a minute of it (sparse images cost nothing).
    outer = loopfs("xfs", size_mb=1024)
    inner = loopfs("ext4", size_mb=512, image_dir=outer.mountpoint)
    db = inner.mountpoint / "app.sqlite"
    writer = SqliteWriterProcess(db)
    try:
        writer.wait_for_acks(50)
        timed = Timed(SqliteWriter([db], busy_timeout=10), db)
        manifest = snapshots.create(
            [inner.path], "reflink", job="sqlite", options={"dest": str(outer.mountpoint)},
            state_dir=tmp_path / "state", quiescers=[timed],
        )  # fmt: skip
        writer.wait_for_acks(len(writer.acks) + 20)  # it goes on after the release
    finally:
        writer.stop()
    info = timed.inner.info[str(db)]
    assert info["journal_mode"] == "wal"
    # clean only when every WAL frame was in the database file under the lock (the writer
    # may have committed between the checkpoint and the lock three times in a row: atomic)
    assert manifest.consistency == ("clean" if info["wal_frames_pending"] == 0 else "atomic")
    assert "files proven on the group: writer" not in manifest.consistency_reason  # no job
    assert "app.sqlite" in manifest.consistency_reason
    committed_before_lock = writer.acked_before(timed.locked_at)
    assert committed_before_lock >= 50
    clone = manifest.snapshots[0].location
    alone = tmp_path / "alone.sqlite"
    with mounted_image(clone, tmp_path / "snap") as snap:
        wal = snap / "app.sqlite-wal"
        wal_size = wal.stat().st_size if wal.exists() else 0
        alone.write_bytes((snap / "app.sqlite").read_bytes())  # the database file only
        conn = sqlite3.connect(snap / "app.sqlite")
        try:
            assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            seqs = [r[0] for r in conn.execute("SELECT seq FROM t ORDER BY seq")]
        finally:
            conn.close()
    conn = sqlite3.connect(alone)
    try:
        seqs_alone = [r[0] for r in conn.execute("SELECT seq FROM t ORDER BY seq")]
    finally:
        conn.close()
    if manifest.consistency == "clean":  # what clean promises: nothing to replay
        assert seqs_alone == seqs
    else:  # the control: the WAL held commits the database file alone does not have
        assert wal_size > 0 and len(seqs_alone) < len(seqs)
    assert seqs == list(range(1, len(seqs) + 1))  # committed transactions, whole
    assert len(seqs) >= committed_before_lock
    # Nothing committed while the lock was held: the snapshot ends where the lock began
    # (by the database's own count: acks read by a thread can be seen late under load).
    assert len(seqs) == timed.at_lock == timed.at_release


def test_lock_blocks_other_writers_until_released(tmp_path):
    db = tmp_path / "x.sqlite"
    setup = sqlite3.connect(db)
    setup.execute("CREATE TABLE t (x)")
    setup.commit()
    setup.close()
    w = SqliteWriter([db], busy_timeout=1)
    w.before_freeze()
    other = sqlite3.connect(db, timeout=0.2)
    try:
        with pytest.raises(sqlite3.OperationalError, match="database is locked"):
            other.execute("INSERT INTO t VALUES (1)")
        assert other.execute("SELECT count(*) FROM t").fetchone() == (0,)  # readers go on
        w.after_thaw(True)
        other.execute("INSERT INTO t VALUES (1)")
        other.commit()
    finally:
        other.close()


def test_missing_database_is_an_error_and_not_created(tmp_path):
    db = tmp_path / "nope.sqlite"
    w = SqliteWriter([db])
    with pytest.raises(WriterError, match=r"^sqlite: cannot open .*nope.sqlite: unable to open"):
        w.before_freeze()
    assert not db.exists()
