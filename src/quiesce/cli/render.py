"""The human rendering of a run's report, and of errors: the CLI is the only place that
prints for humans (reports are JSON for everyone else)."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from quiesce.cli.common import print_error
from quiesce.job.report import Report
from quiesce.util.redact import redact_url
from quiesce.util.units import human_bytes, human_duration

OUTPUT_SHOWN = 400  # characters of hook output in the human rendering (JSON has more)


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
    _say(out, f"[bold]{title} {escape(report.job)}[/] ({report.provider}; {escape(vols)})")
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
        _say(out, table)
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
        _say(out, table)
    for s in report.snapshots:
        _say(out, escape(f"snapshot: {s.get('id')} ({s.get('location', '')})"))
    for w in report.writers:
        for name in ("backup_label", "tablespace_map"):
            if w.get("info", {}).get(name):
                _say(out, escape(f"{w['name']}: {name} (kept in the manifest; restore writes it):"))
                out.print(Text(w["info"][name].rstrip("\n")), soft_wrap=True)
    if report.window_s is not None:
        _say(out, f"freeze window: {human_duration(report.window_s)}")
    if report.consistency:
        colour = {"clean": "green", "atomic": "green"}.get(report.consistency, "yellow")
        why = f" ({report.consistency_reason})" if report.consistency_reason else ""
        _say(out, f"consistency: [{colour}]{report.consistency}[/]{escape(why)}")
    if report.backup:
        print_backup_report(report.backup, out, err, phases=False)
    for warning in report.warnings:
        _say(err, f"[yellow]warning:[/] {escape(warning)}")
    if report.error:
        print_error(report.error, err)
    elif not report.dry_run:
        _say(out, f"done in {human_duration(report.duration_s)}")


def _render_plan(report: Report, out: Console) -> None:
    plan = report.plan or {}
    order = plan.get("order", [])
    if order:
        table = Table(title="freeze order", title_justify="left", box=None, pad_edge=False)
        for col in ("#", "mount point", "fstype", "source", "action"):
            table.add_column(col)
        for i, m in enumerate(order, 1):
            table.add_row(str(i), m["mount_point"], m["fstype"], m["source"], m["action"])
        _say(out, table)
    for h in plan.get("hazards", []):
        tag = "[red]refused[/]" if h.get("refused") else "[yellow]allowed[/]"
        _say(out, f"hazard ({h['kind']}, {tag}): {escape(h['message'])}")
    for w in plan.get("warnings", []):
        _say(out, f"[yellow]warning:[/] {escape(w)}")
    _say(out, "[bold]steps[/]")
    for i, s in enumerate(report.steps, 1):
        _say(out, f"  {i:2d}. {escape(s)}")


def _say(console: Console, text: Any) -> None:
    """Markup on, whatever the console's default (the main CLI's consoles have it off)."""
    console.print(text, markup=True)


def print_backup_report(
    data: dict[str, Any], console: Console, errors: Console, *, phases: bool = True
) -> None:
    """The human rendering of a BackupReport.to_dict(); ``phases=False`` inside a run's
    report, whose own phase table, warnings and error list them already."""
    _say(
        console,
        f"[bold]backup of {escape(str(data.get('snapshot')))}[/] "
        f"(job {escape(data['job'])}, target {data['target']})",
    )
    if phases and data.get("phases"):
        table = Table(box=None, pad_edge=False)
        for col in ("phase", "duration", "", "detail"):
            table.add_column(col)
        for p in data["phases"]:
            ok = Text("") if p.get("ok") else Text("failed", style="red")
            table.add_row(
                p["name"], human_duration(p.get("duration_s")), ok, Text(p.get("detail") or "")
            )
        _say(console, table)
    b = data.get("backup")
    if b and data.get("already_backed_up"):
        _say(
            console,
            f"already backed up as {escape(str(b['snapshot_id']))}: made no new backup "
            "(--force makes another)",
        )
    elif b:
        rate = human_bytes(b.get("throughput_bps")) + "/s"
        _say(
            console,
            f"backed up {human_bytes(b['bytes'])} in {b['files']} file(s) in "
            f"{human_duration(b['duration_s'])} "
            f"({rate}): {escape(str(b['snapshot_id']))}"
            + (f" in {escape(redact_url(str(b['location'])))}" if b.get("location") else ""),
        )
        if b.get("files_unmodified") is not None and b["target"] != "tar":
            _say(
                console,
                f"  new {b.get('files_new')}, changed {b.get('files_changed')}, unchanged "
                f"(not reread) {b.get('files_unmodified')}; "
                f"stored {human_bytes(b.get('bytes_added'))}",
            )
    v = data.get("verify")
    if v:
        colour, word = ("green", "ok") if v["ok"] else ("red", "FAILED")
        _say(
            console,
            f"verify ({v['mode']}): [{colour}]{word}[/] in {human_duration(v['duration_s'])}"
            + (f", {v['files_checked']} file(s), {human_bytes(v['bytes_compared'])} compared")
            * (v["mode"] in ("sample", "full")),
        )
        for m in v.get("mismatches", [])[:10]:
            _say(errors, f"  [red]differs:[/] {escape(m)}")
    if data.get("drill"):
        print_drill(data["drill"], console, errors)
    r = data.get("retention") or {}
    snaps = r.get("snapshots") or r
    for line in retention_lines(snaps):
        _say(console, line)
    if r.get("target"):
        _say(
            console,
            f"{data['target']} prune: kept {len(r['target']['kept'])}, "
            f"removed {len(r['target']['removed'])}",
        )
    if not phases:  # inside a run's report: it prints the warnings and the error, once
        return
    for w in data.get("warnings", []):
        _say(errors, f"[yellow]warning:[/] {escape(w)}")
    if data.get("error"):
        print_error(data["error"], errors)


def print_drill(d: dict[str, Any], console: Console, errors: Console) -> None:
    """The restore drill (apps/drills): one line, then one per application."""
    colour, word = ("green", "ok") if d["ok"] else ("red", "FAILED")
    _say(
        console,
        f"restore drill: [{colour}]{word}[/] in {human_duration(d.get('duration_s'))} "
        f"on an {d.get('copy', 'overlay')} copy of the snapshot"
        + (f", longest recovery {human_duration(d['recovery_s'])}" if d.get("recovery_s") else ""),
    )
    if d.get("error"):
        _say(errors, f"  [red]{escape(d['error'])}[/]")
    for a in d.get("apps", []):
        mark = "[green]ok[/]" if a["ok"] else "[red]FAILED[/]"
        rec = human_duration(a.get("recovery_s")) if a.get("recovery_s") is not None else "-"
        _say(
            console,
            f"  {escape(a['name'])} ({a['kind']}, {escape(a['path'])}): {mark}; recovery "
            f"{rec}, replayed {escape(str(a.get('replayed') or '?'))}; {escape(a['check'])}",
        )
        if not a["ok"] and a.get("detail"):
            for line in str(a["detail"]).splitlines()[-8:]:
                _say(errors, f"    {escape(line)}")


def retention_lines(r: dict[str, Any]) -> list[str]:
    """What retention did to the snapshots, in words: the snapshot deleted because
    ``delete_snapshot`` asks for it, what the keep_* rules kept and deleted (complete runs
    only), and the incomplete ones (kept until the next complete run, then deleted)."""
    lines = []
    gone = r.get("deleted_backed_up")
    if gone:
        lines.append(f"deleted snapshot {escape(gone)} after its backup (delete_snapshot = true)")
    by_rule = [d for d in r.get("deleted") or [] if d != gone]
    inc = r.get("incomplete") or {}
    by_rule = [d for d in by_rule if d not in (inc.get("deleted") or [])]
    if r.get("kept") or by_rule:
        held = [h for h in r.get("held") or [] if h != gone]
        lines.append(
            f"retention: kept {len(r.get('kept') or {})} complete snapshot(s), deleted "
            f"{len(by_rule)}" + (f" (held: {escape(', '.join(held))})" if held else "")
        )
    if inc.get("deleted"):
        lines.append(
            f"retention: deleted {len(inc['deleted'])} incomplete snapshot(s) (backup, "
            f"verification or drill failed; a newer run is complete): "
            + escape(", ".join(inc["deleted"]))
        )
    if inc.get("kept"):
        lines.append(
            f"retention: kept {len(inc['kept'])} incomplete snapshot(s) until the next "
            "complete run: " + escape(", ".join(inc["kept"]))
        )
    return lines


__all__ = ["print_backup_report", "print_drill", "render", "retention_lines"]
