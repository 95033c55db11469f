"""The manifest: the record of one snapshot of a group, enough to list, mount, back up
and delete it later."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from quiesce.providers.base import Snapshot

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
    consistency: str  # application | filesystem | crash
    consistency_reason: str
    phases: list[dict[str, Any]]
    options: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    # files an application returned that belong beside its restored data (PostgreSQL's
    # backup_label): {"volume", "slug", "path" (in the volume), "name", "content", "writer"}
    app_files: list[dict[str, Any]] = field(default_factory=list)
    # the restore drill's last result (apps/drills: DrillReport.to_dict()): ``ok``,
    # ``recovery_s``, ``check``, ``replayed``, ``apps``; None if never drilled
    drill: dict[str, Any] | None = None
    version: int = MANIFEST_VERSION

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
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        return cls.from_dict(json.loads(text))


# -- the state directory -----------------------------------------------------------------

__all__ = ["MANIFEST_VERSION", "Manifest"]
