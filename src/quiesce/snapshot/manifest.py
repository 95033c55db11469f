"""The manifest: the record of one snapshot of a group, enough to list, mount, back up
and delete it later."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, TypedDict

from quiesce.providers.base import FreezeMode, Snapshot
from quiesce.snapshot.consistency import Consistency

MANIFEST_VERSION = 1


class WindowRecord(TypedDict, total=False):
    """The freeze window as a manifest records it: ``Window.to_dict()`` (window_s,
    thawed_by, volumes, ...), its monotonic bounds and how long the provider call took."""

    window_s: float | None
    thawed_by: str | None
    expired_reason: str | None
    guardian_pid: int | None
    expedite: str | None
    syncfs: str | None
    waves: list[list[str]]
    volumes: list[dict[str, Any]]
    warnings: list[str]
    start_ns: int | None
    end_ns: int | None
    snapshot_s: float


@dataclass
class Manifest:
    """What one ``create`` made: enough to list, mount and delete it later."""

    id: str
    job: str
    provider: str
    created: str  # UTC ISO 8601
    volumes: list[dict[str, Any]]
    snapshots: list[Snapshot]
    window: WindowRecord | None  # None if quiesce did not freeze
    freeze_mode: FreezeMode
    consistency: Consistency  # clean | atomic | per-volume (older names are mapped)
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
        return list(self.snapshots)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: the enums as their values, the snapshots as dicts."""
        data = asdict(self)
        data["freeze_mode"] = str(self.freeze_mode)
        data["consistency"] = str(self.consistency)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        known = {f.name for f in fields(cls)}
        kept = {k: v for k, v in data.items() if k in known}
        snap_keys = {f.name for f in fields(Snapshot)}
        kept["snapshots"] = [
            s
            if isinstance(s, Snapshot)
            else Snapshot(**{k: v for k, v in s.items() if k in snap_keys})
            for s in kept.get("snapshots", [])
        ]
        kept["freeze_mode"] = FreezeMode(kept["freeze_mode"])
        # older names ("application", "filesystem", "crash") promised too much
        kept["consistency"] = Consistency.read(str(kept.get("consistency")))
        return cls(**kept)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        return cls.from_dict(json.loads(text))


# -- the state directory -----------------------------------------------------------------

__all__ = ["MANIFEST_VERSION", "Manifest", "WindowRecord"]
