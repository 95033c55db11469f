"""The human rendering of a backup report (``BackupReport.to_dict()``).

Used by ``quiesce backup`` and, for ``quiesce run``, by report.render (the ``backup``
field of the run's report).
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from quiesce.sys.units import human_bytes, human_duration


def _say(console: Console, text: Any) -> None:
    """Markup on, whatever the console's default (the main CLI's consoles have it off)."""
    console.print(text, markup=True)


def print_backup_report(
    data: dict[str, Any], console: Console, errors: Console, *, phases: bool = True
) -> None:
    """The human rendering of a BackupReport.to_dict(); ``phases=False`` inside a run's
    report, whose own phase table lists them already."""
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
    if b:
        rate = human_bytes(b.get("throughput_bps")) + "/s"
        _say(
            console,
            f"backed up {human_bytes(b['bytes'])} in {b['files']} file(s) in "
            f"{human_duration(b['duration_s'])} "
            f"({rate}): {escape(str(b['snapshot_id']))}",
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
    r = data.get("retention") or {}
    snaps = r.get("snapshots") or r
    if snaps.get("deleted") or snaps.get("kept"):
        _say(
            console,
            f"retention: kept {len(snaps.get('kept') or {})} snapshot(s), deleted "
            f"{len(snaps.get('deleted') or [])}"
            + (f" (held: {', '.join(snaps['held'])})" if snaps.get("held") else ""),
        )
    if r.get("target"):
        _say(
            console,
            f"{data['target']} prune: kept {len(r['target']['kept'])}, "
            f"removed {len(r['target']['removed'])}",
        )
    for w in data.get("warnings", []):
        _say(errors, f"[yellow]warning:[/] {escape(w)}")
    if data.get("error"):
        from quiesce.job.report import print_error

        print_error(data["error"], errors)


__all__ = ["print_backup_report"]
