"""The report of a run: what happened, when, how long it took, and how consistent it is.

One model: JSON for ``--json`` and library users; the CLI renders it for humans
(quiesce.cli.render). It is built in memory during the run and printed after the thaw,
never written to a volume while it is frozen.
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel, Field, SerializerFunctionWrapHandler, model_serializer

from quiesce.errors import ExitCode, QuiesceError
from quiesce.job.hints import job_hint
from quiesce.util.redact import known_secrets, redact, redact_data


class Phase(BaseModel):
    """One phase of a run, with wall-clock start/end (unix seconds) and its duration."""

    name: str
    start: float | None = None
    end: float | None = None
    duration_s: float | None = None
    ok: bool = True
    detail: str | None = None
    t0: float | None = Field(default=None, exclude=True)  # monotonic, while running

    @classmethod
    def begin(cls, name: str) -> Phase:
        return cls(name=name, start=time.time(), t0=time.monotonic())

    def finish(self, ok: bool = True) -> Phase:
        if self.t0 is not None:
            self.duration_s = time.monotonic() - self.t0
            self.t0 = None
        if self.start is not None and self.duration_s is not None:
            self.end = self.start + self.duration_s
        self.ok = ok
        return self

    @classmethod
    def from_any(cls, data: Any) -> Phase:
        """Accept a Phase, a dict, or any object with name/start/end/duration(_s)."""
        if isinstance(data, Phase):
            return data
        if not isinstance(data, dict):
            to_dict = getattr(data, "to_dict", None)
            data = to_dict() if callable(to_dict) else vars(data)
        d = dict(data)
        duration = d.get("duration_s", d.get("duration"))
        start, end = d.get("start"), d.get("end")
        if duration is None and start is not None and end is not None:
            duration = end - start
        return cls(
            name=str(d.get("name") or d.get("phase") or "?"),
            start=start,
            end=end,
            duration_s=duration,
            ok=bool(d.get("ok", True)),
            detail=d.get("detail") or d.get("error"),
        )


class Report(BaseModel):
    """Everything a run did. ``exit_code`` follows errors.ExitCode.

    Redacted (quiesce.util.redact) when finished and whenever it is serialised: hook and
    target output, errors and repository URLs may carry a password, and the report goes
    to stdout, to the ``after_run`` hooks' stdin and into monitoring.
    """

    job: str
    job_file: str | None = None
    dry_run: bool = False
    provider: str | None = None
    volumes: list[str] = []
    on_hook_failure: str = "abort"
    started: float = Field(default_factory=time.time)
    finished: float | None = None
    duration_s: float | None = None
    ok: bool = True
    exit_code: int = ExitCode.OK
    manifest_id: str | None = None
    consistency: str | None = None  # application | filesystem | crash
    consistency_reason: str | None = None
    freeze_mode: str | None = None
    window: dict[str, Any] | None = None
    phases: list[Phase] = []
    hooks: list[dict[str, Any]] = []
    writers: list[dict[str, Any]] = []
    snapshots: list[dict[str, Any]] = []
    plan: dict[str, Any] | None = None  # dry run: volumes in order, hazards
    steps: list[str] = []  # dry run: what a run would do, in order
    warnings: list[str] = []
    backup: dict[str, Any] | None = None  # the backup phase (backup.phase.BackupReport)
    error: dict[str, Any] | None = None
    t0: float = Field(default_factory=time.monotonic, exclude=True)

    def set_error(self, e: QuiesceError) -> None:
        """The run's error, its hint in the job's syntax (``timeouts.freeze``, not
        ``--timeout``: a job's user edits a file, not a command line)."""
        self.ok = False
        self.exit_code = e.exit_code
        self.error = e.to_dict()
        if isinstance(self.error.get("hint"), str):
            self.error["hint"] = job_hint(self.error["hint"])

    def finish(self) -> Report:
        self.duration_s = time.monotonic() - self.t0
        self.finished = self.started + self.duration_s
        self.phases.sort(key=lambda p: p.start if p.start is not None else float("inf"))
        self.redact()
        return self

    def redact(self) -> None:
        """Mask credentials and known secrets in every string the report holds, so that
        the human rendering shows what the JSON shows."""
        secrets = known_secrets()
        for name, value in list(self.__dict__.items()):
            if isinstance(value, str | list | dict) and name != "phases":
                setattr(self, name, redact_data(value, secrets=secrets))
        for p in self.phases:
            p.name = redact(p.name, secrets=secrets)
            p.detail = redact(p.detail, secrets=secrets) if p.detail else p.detail

    @model_serializer(mode="wrap")
    def _redacted(self, handler: SerializerFunctionWrapHandler) -> Any:
        return redact_data(handler(self))

    @property
    def window_s(self) -> float | None:
        return (self.window or {}).get("window_s")

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)


__all__ = ["Phase", "Report"]
