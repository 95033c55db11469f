"""``quiesce cleanup``: undo what crashed runs left behind, from their journals.

A run holds an exclusive ``flock`` on its journal while it lives. :func:`cleanup` takes
every journal whose lock it can get (its run is dead) and undoes the open entries,
newest first, with the actions of :mod:`quiesce.state.undo` plus those passed in (the
snapshot layer passes ``snapshot``; see :func:`quiesce.snapshot.cleanup.cleanup`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quiesce.errors import QuiesceError
from quiesce.state.journal import parse
from quiesce.state.statedir import journal_dir
from quiesce.state.undo import UndoFn, describe, undo_entry


@dataclass
class CleanupReport:
    journals: list[str] = field(default_factory=list)  # dead runs looked at
    removed: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    skipped_live: list[str] = field(default_factory=list)  # runs still alive

    def to_dict(self) -> dict[str, Any]:
        return {
            "journals": self.journals,
            "removed": self.removed,
            "errors": self.errors,
            "skipped_live": self.skipped_live,
        }


@contextlib.contextmanager
def _lock_if_dead(path: Path) -> Iterator[int | None]:
    """Yield an fd with the journal's lock if its run is dead, else None."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    except FileNotFoundError:
        yield None
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield None
            return
        yield fd
    finally:
        os.close(fd)


def cleanup(
    state: str | Path | None = None,
    *,
    dry_run: bool = False,
    undo: Mapping[str, UndoFn] | None = None,
) -> CleanupReport:
    """Undo what crashed runs left behind, newest journal and newest entry first.

    Runs that still hold their journal's lock are left alone. Safe to run any number of
    times, also concurrently with new runs. ``undo`` adds actions of higher layers.
    """
    extra = dict(undo or {})
    directory = journal_dir(state)
    report = CleanupReport()
    if not directory.is_dir():
        return report
    paths = sorted(directory.glob("*.jsonl"), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in paths:
        with _lock_if_dead(path) as fd:
            if fd is None:
                if path.exists():
                    report.skipped_live.append(path.stem)
                continue
            report.journals.append(path.stem)
            _header, entries = parse(path)
            failed = False
            for entry in sorted(entries.values(), key=lambda e: e.id, reverse=True):
                if entry.state != "open":
                    continue
                what = {"run": path.stem, "kind": entry.kind, **entry.fields}
                if dry_run:
                    report.removed.append(what)
                    continue
                try:
                    undo_entry(entry.kind, entry.fields, extra)
                except (QuiesceError, OSError, subprocess.SubprocessError, TypeError) as e:
                    failed = True
                    report.errors.append(f"{path.stem}: {entry.kind} {describe(entry.fields)}: {e}")
                    continue
                os.write(fd, (json.dumps({"op": "done", "id": entry.id}) + "\n").encode())
                os.fsync(fd)
                report.removed.append(what)
            if not failed and not dry_run:
                path.unlink()
    return report


def held_snapshot_ids(state: str | Path | None = None) -> set[str]:
    """Snapshot ids that a live run holds (is reading): retention must not delete them."""
    held: set[str] = set()
    directory = journal_dir(state)
    if not directory.is_dir():
        return held
    for path in directory.glob("*.jsonl"):
        with _lock_if_dead(path) as fd:
            if fd is not None:
                continue  # dead run: its holds are void
        with contextlib.suppress(OSError):
            _h, entries = parse(path)
            for e in entries.values():
                if e.state == "open" and e.fields.get("holds"):
                    held.add(str(e.fields["holds"]))
    return held


__all__ = ["CleanupReport", "cleanup", "held_snapshot_ids"]
