"""Where the state directory is, and the one check that it is not on a group volume.

The state directory holds manifests, journals and locks. It must never be on a volume
that a run freezes or snapshots: a journal or manifest write would then hang the run
inside its own window, or land in the snapshot.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from quiesce.errors import UnsafePlan
from quiesce.freezing.plan import GroupMember
from quiesce.sys.mounts import MountTable

DEFAULT_STATE_DIR = Path("/var/lib/quiesce")
STATE_DIR_ENV = "QUIESCE_STATE_DIR"


def state_dir(explicit: str | Path | None = None) -> Path:
    """The state directory: the argument, else $QUIESCE_STATE_DIR, else /var/lib/quiesce."""
    if explicit:
        return Path(explicit)
    return Path(os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR)


def journal_dir(state: str | Path | None = None) -> Path:
    return state_dir(state) / "journal"


def _existing_ancestor(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def refuse_state_on_group(state: Path, members: Sequence[GroupMember]) -> None:
    """Refuse a state directory on a volume of the group, before anything is written."""
    vol = MountTable.read().volume_of_path(str(_existing_ancestor(state)))
    for m in members:
        if vol is not None and vol.dev == m.volume.dev:
            raise UnsafePlan(
                f"the state directory {state} is on {m.name}, a volume of the group",
                f"set {STATE_DIR_ENV} (or --state-dir) to a directory on another filesystem",
            )


__all__ = [
    "DEFAULT_STATE_DIR",
    "STATE_DIR_ENV",
    "journal_dir",
    "refuse_state_on_group",
    "state_dir",
]
