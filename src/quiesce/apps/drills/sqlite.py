"""SQLite's restore drill: open the copied database (its -wal beside it is replayed on
open, as after a power cut), then ``PRAGMA quick_check`` and ``PRAGMA integrity_check``.

Recovery time is the open and the first read (which replays the WAL into the new
-shm); what was replayed is the -wal's frame count as it lay on the snapshot.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from urllib.parse import quote

from quiesce.apps.drills.base import AppDrill, AppTarget, WritableCopy

WAL_HEADER, FRAME_HEADER = 32, 24


def wal_frames(db: Path) -> int:
    wal = Path(f"{db}-wal")
    try:
        size = wal.stat().st_size
        with open(wal, "rb") as f:
            head = f.read(WAL_HEADER)
    except OSError:
        return 0
    if size <= WAL_HEADER or len(head) < 12:
        return 0
    page = int.from_bytes(head[8:12], "big")
    return (size - WAL_HEADER) // (page + FRAME_HEADER) if page else 0


def drill(target: AppTarget, copy: WritableCopy, *, timeout: float) -> AppDrill:
    r = AppDrill(target.name, "sqlite", target.path)
    t0 = time.monotonic()
    db = copy.locate(target.path)
    if db is None or not db.is_file():
        r.detail = f"no database at {target.path} on the snapshot"
        r.check = "not found"
        r.duration_s = time.monotonic() - t0
        return r
    frames = wal_frames(db)
    wal_bytes = os.path.getsize(f"{db}-wal") if os.path.exists(f"{db}-wal") else 0
    r.replayed = f"{frames} WAL frame(s)" if frames else "no WAL"
    r.replayed_bytes = wal_bytes
    try:
        conn = sqlite3.connect(
            f"file:{quote(str(db))}?mode=rw", uri=True, timeout=timeout, isolation_level=None
        )
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            r.recovery_s = time.monotonic() - t0
            quick = [row[0] for row in conn.execute("PRAGMA quick_check")]
            full = [row[0] for row in conn.execute("PRAGMA integrity_check")]
        finally:
            conn.close()
    except sqlite3.Error as e:
        r.check = "could not open"
        r.detail = f"sqlite: {e}"
    else:
        r.ok = quick == ["ok"] and full == ["ok"]
        r.check = "quick_check + integrity_check: " + ("ok" if r.ok else "FAILED")
        if not r.ok:
            r.detail = "; ".join((full if full != ["ok"] else quick)[:12])
    r.duration_s = time.monotonic() - t0
    return r


__all__ = ["drill", "wal_frames"]
