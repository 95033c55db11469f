"""The report of a run: what happened, when, how long it took, and how consistent it is.

One model, two renderings: JSON (``--json``, library users) and a human summary
printed with rich. The report is built in memory during the run and printed after the
thaw, never written to a volume while it is frozen.
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel, Field
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from quiesce.errors import ExitCode, QuiesceError
from quiesce.sys.units import human_duration

OUTPUT_SHOWN = 400  # characters of hook output in the human rendering (JSON has more)


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
    """Everything a run did. ``exit_code`` follows errors.ExitCode."""

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
        self.ok = False
        self.exit_code = e.exit_code
        self.error = e.to_dict()

    def finish(self) -> Report:
        self.duration_s = time.monotonic() - self.t0
        self.finished = self.started + self.duration_s
        self.phases.sort(key=lambda p: p.start if p.start is not None else float("inf"))
        return self

    @property
    def window_s(self) -> float | None:
        return (self.window or {}).get("window_s")

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)


def _clock(t: float | None) -> str:
    if t is None:
        return "-"
    return time.strftime("%H:%M:%S", time.localtime(t)) + f".{int(t * 1000) % 1000:03d}"


def _short(text: str, limit: int = OUTPUT_SHOWN) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[: limit // 2] + " [...] " + text[-limit // 2 :]


def render(report: Report, out: Console, err: Console | None = None) -> None:
    """The human rendering: summary, phases, hooks, snapshots, warnings, error."""
    err = err or out
    title = "dry run of job" if report.dry_run else "job"
    vols = ", ".join(report.volumes)
    out.print(f"[bold]{title} {escape(report.job)}[/] ({report.provider}; {escape(vols)})")
    if report.dry_run:
        _render_plan(report, out)
    if report.phases:
        table = Table(title="phases", title_justify="left", box=None, pad_edge=False)
        for col in ("phase", "start", "end", "duration", ""):
            table.add_column(col)
        for p in report.phases:
            table.add_row(
                p.name,
                _clock(p.start),
                _clock(p.end),
                human_duration(p.duration_s),
                "" if p.ok else "[red]failed[/]",
            )
        out.print(table)
    if report.hooks:
        table = Table(title="hooks and writers", title_justify="left", box=None, pad_edge=False)
        for col in ("kind", "name", "status", "duration", "output"):
            table.add_column(col)
        for h in report.hooks:
            status = h["status"] if h["status"] == "ok" else f"[red]{h['status']}[/]"
            detail = h.get("error") or ""
            text = _short(((detail + "\n") if detail else "") + (h.get("output") or ""))
            table.add_row(
                h["kind"],
                escape(h["name"]),
                status,
                human_duration(h.get("duration_s")),
                escape(text),
            )
        out.print(table)
    for s in report.snapshots:
        out.print(escape(f"snapshot: {s.get('id')} ({s.get('location', '')})"))
    if report.window_s is not None:
        out.print(f"freeze window: {human_duration(report.window_s)}")
    if report.consistency:
        colour = {"application": "green", "filesystem": "green"}.get(report.consistency, "yellow")
        why = f" ({report.consistency_reason})" if report.consistency_reason else ""
        out.print(f"consistency: [{colour}]{report.consistency}[/]{escape(why)}")
    if report.backup:
        from quiesce.cli.render_backup import print_backup_report

        print_backup_report(report.backup, out, err, phases=False)
    for w in report.warnings:
        err.print(f"[yellow]warning:[/] {escape(w)}")
    if report.error:
        print_error(report.error, err)
    elif not report.dry_run:
        out.print(f"done in {human_duration(report.duration_s)}")


def _render_plan(report: Report, out: Console) -> None:
    plan = report.plan or {}
    order = plan.get("order", [])
    if order:
        table = Table(title="freeze order", title_justify="left", box=None, pad_edge=False)
        for col in ("#", "mount point", "fstype", "source", "action"):
            table.add_column(col)
        for i, m in enumerate(order, 1):
            table.add_row(str(i), m["mount_point"], m["fstype"], m["source"], m["action"])
        out.print(table)
    for h in plan.get("hazards", []):
        tag = "[red]refused[/]" if h.get("refused") else "[yellow]allowed[/]"
        out.print(f"hazard ({h['kind']}, {tag}): {escape(h['message'])}")
    for w in plan.get("warnings", []):
        out.print(f"[yellow]warning:[/] {escape(w)}")
    out.print("[bold]steps[/]")
    for i, s in enumerate(report.steps, 1):
        out.print(f"  {i:2d}. {escape(s)}")


def print_error(error: dict[str, Any], err: Console) -> None:
    """``quiesce: <message>``, each job-file problem with its hint, then ``hint: <hint>``."""
    err.print(f"[bold red]quiesce:[/] {escape(error['message'])}")
    for p in error.get("problems", []):
        err.print(f"  {escape(p['path'])}: {escape(p['message'])}")
        if p.get("hint"):
            err.print(f"    hint: {escape(p['hint'])}")
    if error.get("hint"):
        err.print(f"[dim]hint:[/] {escape(error['hint'])}")
