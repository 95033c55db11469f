"""The intent journal: what a run made, written down before it was made.

Every mount, loop device, clone file, directory or snapshot a run creates is appended
to ``<state_dir>/journal/<run>.jsonl`` (one JSON object a line, fsync'd) *before* the
thing exists, and marked ``done`` when it is gone again (or ``commit``-ted when the run
means to keep it, like a finished snapshot). A run holds an exclusive ``flock`` on its
journal for as long as it lives; the kernel drops it when the process dies, even by
SIGKILL, and :func:`quiesce.state.cleanup.cleanup` then undoes the open entries.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quiesce.errors import JournalError, QuiesceError
from quiesce.host.kernel import fsync_dir as _fsync_dir
from quiesce.state.statedir import checked_subdir
from quiesce.state.undo import KINDS, UndoFn, describe, undo_entry


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


@dataclass
class Entry:
    id: int
    kind: str
    fields: dict[str, Any]
    state: str = "open"  # open | done | committed


@dataclass
class Journal:
    """One run's journal. Open it with :meth:`open`; use it as a context manager."""

    path: Path
    run: str
    fd: int
    entries: dict[int, Entry] = field(default_factory=dict)
    undo_actions: Mapping[str, UndoFn] = field(default_factory=dict)
    _next: int = 1

    @classmethod
    def open(
        cls,
        state: str | Path | None = None,
        *,
        job: str = "",
        run: str | None = None,
        undo: Mapping[str, UndoFn] | None = None,
    ) -> Journal:
        """Create and lock a fresh journal for this process. ``undo`` adds the actions of
        higher layers (the snapshot layer's ``snapshot``) for :meth:`rollback`."""
        directory = checked_subdir(state, "journal", create=True)
        run = run or f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:8]}"
        path = directory / f"{run}.jsonl"
        # Locked under a name cleanup ignores, then renamed: cleanup never sees it unlocked.
        tmp = directory / f".{run}.new"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_APPEND | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        j = cls(path=path, run=run, fd=fd, undo_actions=dict(undo or {}))
        j._append(
            {
                "op": "begin",
                "run": run,
                "job": job,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "boot": _boot_id(),
                "t": time.time(),
            }
        )
        os.rename(tmp, path)
        _fsync_dir(directory)
        return j

    def _append(self, obj: dict[str, Any]) -> None:
        append_record(self.fd, obj)

    def intent(self, kind: str, **fields: Any) -> int:
        """Record that ``kind`` is about to be made. Call this *before* making it."""
        if kind not in KINDS:
            raise ValueError(f"unknown journal kind {kind!r}")
        eid = self._next
        self._next += 1
        self._append({"op": "intent", "id": eid, "kind": kind, "t": time.time(), **fields})
        self.entries[eid] = Entry(eid, kind, dict(fields))
        return eid

    def update(self, eid: int, **fields: Any) -> None:
        """Add what became known when it was made (the loop device's name)."""
        self._append({"op": "update", "id": eid, **fields})
        self.entries[eid].fields.update(fields)

    def done(self, eid: int) -> None:
        """It is gone again (removed by the run itself)."""
        self._append({"op": "done", "id": eid})
        self.entries[eid].state = "done"

    def commit(self, eid: int) -> None:
        """The run keeps it (a finished snapshot): cleanup must leave it alone."""
        self._append({"op": "commit", "id": eid})
        self.entries[eid].state = "committed"

    def undo(self, eid: int) -> None:
        """Remove it now (the same code cleanup uses) and mark it done."""
        entry = self.entries[eid]
        if entry.state != "open":
            return
        undo_entry(entry.kind, entry.fields, self.undo_actions)
        self.done(eid)

    def open_entries(self) -> list[Entry]:
        return [e for e in self.entries.values() if e.state == "open"]

    def rollback(self) -> list[str]:
        """Undo every open entry, newest first; returns the errors (keeps going past them)."""
        errors = []
        for entry in sorted(self.open_entries(), key=lambda e: e.id, reverse=True):
            try:
                self.undo(entry.id)
            except (QuiesceError, OSError, subprocess.SubprocessError) as e:
                errors.append(f"{entry.kind} {describe(entry.fields)}: {e}")
        return errors

    def close(self) -> list[str]:
        """Roll back what is still open; remove the journal if nothing is left."""
        if self.fd < 0:
            return []
        errors = self.rollback()
        if not errors:
            self._append({"op": "end"})
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        os.close(self.fd)
        self.fd = -1
        return errors

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        errors = self.close()
        if errors and exc[0] is None:
            raise JournalError("cleanup after the run failed: " + "; ".join(errors))


def append_record(fd: int, obj: dict[str, Any]) -> None:
    """One journal line, durable before the caller goes on (the run's own journal, and
    cleanup marking another run's entries done)."""
    os.write(fd, (json.dumps(obj, separators=(",", ":"), default=str) + "\n").encode())
    os.fsync(fd)


def parse(data: bytes) -> tuple[dict[str, Any], dict[int, Entry]]:
    """A journal's header and entries from its bytes (a torn last line is ignored). Read
    them from an fd that passed the trust check (``state.statedir.open_state_file``)."""
    header: dict[str, Any] = {}
    entries: dict[int, Entry] = {}
    for raw in data.splitlines():
        try:
            rec = json.loads(raw)
        except ValueError:
            continue  # a torn write at the moment of the crash
        if not isinstance(rec, dict):
            continue
        op = rec.pop("op", None)
        if op == "begin":
            header = rec
        elif op == "intent":
            eid, kind = rec.pop("id"), rec.pop("kind")
            rec.pop("t", None)
            entries[eid] = Entry(eid, kind, rec)
        elif op == "update" and rec.get("id") in entries:
            eid = rec.pop("id")
            entries[eid].fields.update(rec)
        elif op in ("done", "commit") and rec.get("id") in entries:
            entries[rec["id"]].state = "done" if op == "done" else "committed"
    return header, entries


__all__ = ["Entry", "Journal", "JournalError", "append_record", "parse"]
