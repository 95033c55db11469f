"""Cleanup with the snapshot layer's undo: a ``snapshot`` journal entry is removed by its
provider. The state layer cannot import providers (a higher layer), so every caller that
may meet such an entry (``quiesce cleanup``, the backup phase, the create engine) uses
this module's :func:`cleanup` and :data:`UNDO`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from quiesce.errors import QuiesceError
from quiesce.freezing.guardian import expedite, records
from quiesce.providers.base import Snapshot
from quiesce.providers.registry import get_provider
from quiesce.snapshot.store import scan_manifests
from quiesce.state import cleanup as state_cleanup
from quiesce.state.cleanup import CleanupReport
from quiesce.state.undo import UndoFn


def undo_snapshot(e: dict[str, Any]) -> None:
    """Delete the snapshot an entry names, through its provider (a no-op if it is gone)."""
    snap = Snapshot(**e["snapshot"])
    provider = get_provider(e["provider"]).from_record(e.get("options"))
    provider.delete(snap)


UNDO: dict[str, UndoFn] = {"snapshot": undo_snapshot}


def cleanup(
    state: str | Path | None = None,
    *,
    dry_run: bool = False,
    undo: Mapping[str, UndoFn] | None = None,
) -> CleanupReport:
    """:func:`quiesce.state.cleanup.cleanup` that can also remove snapshots (and what
    ``undo`` adds: higher layers' entry kinds), and restores ``rcu_expedited`` if a
    quiesce process killed while freezing left it set, and thaws what a guardian killed
    with SIGKILL (its watchdog dead too) left frozen: the second line's records."""
    rep = state_cleanup.cleanup(state, dry_run=dry_run, undo={**UNDO, **(undo or {})})
    try:
        done, errors = records.clean_stale(dry_run=dry_run)  # what killed guardians left
    except QuiesceError as e:  # an untrusted run directory: nothing in it is believed
        done, errors = [], [e.message]
    rep.removed += done
    rep.errors += errors
    rec = expedite.holders()
    if rec and rec["holders"] and not any(h["alive"] for h in rec["holders"]):
        dead = ", ".join(str(h["pid"]) for h in rec["holders"])
        entry = {
            "kind": "rcu_expedited",
            "target": f"rcu_expedited={rec['current']} -> {rec['original']}",
            "run": f"dead quiesce process {dead}",
        }
        if dry_run or expedite.restore_stale():
            rep.removed.append(entry)
        else:
            rep.errors.append(f"could not restore rcu_expedited (left set by {dead})")
    rep.unreadable += [u.to_dict() for u in scan_manifests(state).unreadable]
    return rep


__all__ = ["UNDO", "CleanupReport", "cleanup", "undo_snapshot"]
