"""The manifest: the record of one snapshot of a group, enough to list, mount, back up
and delete it later."""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from quiesce.providers.base import Snapshot
from quiesce.snapshot.consistency import Consistency

MANIFEST_VERSION = 1


@dataclass
class Manifest:
    """What one ``create`` made: enough to list, mount and delete it later."""

    id: str
    job: str
    provider: str
    created: str  # UTC ISO 8601
    volumes: list[dict[str, Any]]
    snapshots: list[dict[str, Any]]
    window: dict[str, Any] | None  # Window.to_dict() + start_ns/end_ns; None if not frozen
    freeze_mode: str
    consistency: str  # a Consistency: clean | atomic | per-volume (old names are mapped)
    consistency_reason: str
    phases: list[dict[str, Any]]
    options: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    # files an application returned that belong beside its restored data (PostgreSQL's
    # backup_label): {"volume", "slug", "path" (in the volume), "name", "content", "writer"}
    app_files: list[dict[str, Any]] = field(default_factory=list)
    # the backup of this snapshot: {"ok", "verified" (None: not configured), "target",
    # "backup_id", "error"}; None: no backup asked for (a job without [backup], or older)
    backup: dict[str, Any] | None = None
    # the restore drill's result, when the job has one: {"ok": bool, ...}
    drill: dict[str, Any] | None = None
    version: int = MANIFEST_VERSION

    @property
    def complete(self) -> bool:
        """The run that made this snapshot finished everything it asked for: the backup
        (and its verification) and the restore drill, when configured, succeeded. Only
        complete snapshots count towards retention's keep_* rules (the one definition)."""
        if self.backup is not None and not (
            self.backup.get("ok") and self.backup.get("verified") is not False
        ):
            return False
        return self.drill is None or bool(self.drill.get("ok"))

    @property
    def window_s(self) -> float | None:
        return self.window.get("window_s") if self.window else None

    def snapshot_objects(self) -> list[Snapshot]:
        return [Snapshot(**s) for s in self.snapshots]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        known = {f.name for f in fields(cls)}
        kept = {k: v for k, v in data.items() if k in known}
        # older names ("application", "filesystem", "crash") promised too much
        with contextlib.suppress(ValueError):
            kept["consistency"] = str(Consistency.read(str(kept.get("consistency"))))
        return cls(**kept)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        return cls.from_dict(json.loads(text))


# -- the state directory -----------------------------------------------------------------

__all__ = ["MANIFEST_VERSION", "Manifest"]
