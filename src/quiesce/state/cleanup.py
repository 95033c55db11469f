"""``quiesce cleanup``: undo what crashed runs left behind, from their journals.

A run holds an exclusive ``flock`` on its journal while it lives. :func:`cleanup` takes
every journal whose lock it can get (its run is dead) and undoes the open entries,
newest first, with the actions of :mod:`quiesce.state.undo` plus those passed in (the
snapshot layer passes ``snapshot``; see :func:`quiesce.snapshot.cleanup.cleanup`).
"""

from __future__ import annotations

import fcntl
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quiesce.errors import QuiesceError
from quiesce.state.journal import Entry, append_record, parse
from quiesce.state.statedir import checked_subdir, open_state_file
from quiesce.state.undo import UndoFn, describe, undo_entry


@dataclass
class CleanupReport:
    journals: list[str] = field(default_factory=list)  # dead runs looked at
    removed: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    skipped_live: list[str] = field(default_factory=list)  # runs still alive
    # state files cleanup could not read (a manifest): shown, left for the admin
    unreadable: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "journals": self.journals,
            "removed": self.removed,
            "errors": self.errors,
            "skipped_live": self.skipped_live,
            "unreadable": self.unreadable,
        }


def _open_journals(directory: Path) -> list[tuple[Path, int]]:
    """Every journal, opened and checked (O_NOFOLLOW, root's alone), newest first. One
    that fails the check refuses the whole cleanup before anything is undone."""
    opened: list[tuple[Path, int]] = []
    try:
        for path in directory.glob("*.jsonl"):
            try:
                fd = open_state_file(path, os.O_RDWR | os.O_APPEND)
            except FileNotFoundError:
                continue  # its run ended meanwhile
            opened.append((path, fd))
    except BaseException:
        for _, fd in opened:
            os.close(fd)
        raise
    return sorted(opened, key=lambda pf: os.fstat(pf[1]).st_mtime, reverse=True)


def _dead(fd: int) -> bool:
    """Take the journal's lock if its run is dead (the kernel dropped the run's lock)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _read(fd: int) -> tuple[dict[str, Any], dict[int, Entry]]:
    return parse(os.pread(fd, os.fstat(fd).st_size, 0))


def cleanup(
    state: str | Path | None = None,
    *,
    dry_run: bool = False,
    undo: Mapping[str, UndoFn] | None = None,
) -> CleanupReport:
    """Undo what crashed runs left behind, newest journal and newest entry first.

    Runs that still hold their journal's lock are left alone. Safe to run any number of
    times, also concurrently with new runs. ``undo`` adds actions of higher layers.
    Refuses (UntrustedState, exit 2) before undoing anything if the state directory or
    a journal could have been written by someone other than root.
    """
    extra = dict(undo or {})
    directory = checked_subdir(state, "journal")
    report = CleanupReport()
    if not directory.is_dir():
        return report
    journals = _open_journals(directory)
    try:
        for path, fd in journals:
            alive = not _dead(fd)
            if os.fstat(fd).st_nlink == 0:
                continue  # its run finished and removed it meanwhile
            if alive:
                report.skipped_live.append(path.stem)
                continue
            report.journals.append(path.stem)
            _header, entries = _read(fd)
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
                append_record(fd, {"op": "done", "id": entry.id})
                report.removed.append(what)
            if not failed and not dry_run:
                path.unlink()
    finally:
        for _, fd in journals:
            os.close(fd)
    return report


def held_snapshot_ids(state: str | Path | None = None) -> set[str]:
    """Snapshot ids that a live run holds (is reading): retention must not delete them."""
    held: set[str] = set()
    directory = checked_subdir(state, "journal")
    if not directory.is_dir():
        return held
    journals = _open_journals(directory)
    try:
        for _path, fd in journals:
            if _dead(fd):
                fcntl.flock(fd, fcntl.LOCK_UN)
                continue  # dead run: its holds are void
            _h, entries = _read(fd)
            for e in entries.values():
                if e.state == "open" and e.fields.get("holds"):
                    held.add(str(e.fields["holds"]))
    finally:
        for _, fd in journals:
            os.close(fd)
    return held


__all__ = ["CleanupReport", "cleanup", "held_snapshot_ids"]
