"""Watching a run: the CLI's renderers of progress events (quiesce.util.events).

On a terminal, a rich progress display: each phase as it starts and ends, and a bar with
bytes, speed (binary units, like the report) and files for the backup and the
verification. Otherwise (a pipe, a log, journald) plain timestamped lines, written and
flushed as the events arrive, so that a killed run's log holds what it got through.
The freeze window's events arrive after the thaw (the snapshot engine holds them), so
nothing is written while a volume is frozen.

``-q`` shows no progress; ``-v`` shows progress lines every second instead of every ten.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import IO, Annotated, Any

import typer
from rich.console import Console

from quiesce.util.events import Event, EventFn
from quiesce.util.units import human_bytes, human_duration

Verbose = Annotated[
    bool, typer.Option("--verbose", "-v", help="Progress lines every second, not every ten.")
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress: only the report.")]


def _stamp(at: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at))


def describe(e: Event) -> str:
    """The event as one line of text, without its time."""
    if e.kind == "start":
        return f"{e.phase}: started" + (f" ({e.detail})" if e.detail else "")
    if e.kind == "end":
        took = human_duration(e.duration_s)
        return f"{e.phase}: done in {took}" if e.ok else f"{e.phase}: FAILED after {took}"
    if e.kind == "note":
        return f"{e.phase}: {e.detail}"
    return f"{e.phase}: {progress_text(e)}"


def progress_text(e: Event, speed: float | None = None) -> str:
    parts = [human_bytes(e.done or 0)]
    if e.total:
        parts[0] += f" / {human_bytes(e.total)} ({100 * (e.done or 0) / e.total:.0f}%)"
    if speed is not None:
        parts.append(f"{human_bytes(speed)}/s")
    if e.files is not None:
        parts.append(f"{e.files}" + (f"/{e.total_files}" if e.total_files else "") + " files")
    return ", ".join(parts)


class LineRenderer:
    """``HH:MM:SS phase: ...`` lines; progress at most every ``interval`` s per phase."""

    def __init__(self, stream: IO[str], interval: float = 10.0) -> None:
        self.stream = stream
        self.interval = interval
        self._first: dict[str, Event] = {}
        self._shown: dict[str, float] = {}

    def _write(self, at: float, text: str) -> None:
        self.stream.write(f"{_stamp(at)} {text}\n")
        self.stream.flush()

    def __call__(self, e: Event) -> None:
        if e.kind != "progress":
            if e.kind == "end" and e.phase in self._first:
                self._first.pop(e.phase)
            self._write(e.at, describe(e))
            return
        first = self._first.setdefault(e.phase, e)
        if e.at - self._shown.get(e.phase, first.at) < self.interval:
            return
        self._shown[e.phase] = e.at
        speed = ((e.done or 0) - (first.done or 0)) / max(e.at - first.at, 1e-9)
        self._write(e.at, f"{e.phase}: {progress_text(e, speed)}")


class LiveRenderer:
    """Phase lines above a bar per phase that reports bytes (a terminal only)."""

    def __init__(self, console: Console) -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeRemainingColumn,
        )

        from quiesce.backup.progress import BinarySpeedColumn

        # refreshed on each event only: nothing is drawn while the engine holds events
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
            DownloadColumn(binary_units=True), BinarySpeedColumn(),
            TextColumn("{task.fields[files]}"), TimeRemainingColumn(),
            console=console, transient=True, auto_refresh=False,
        )  # fmt: skip
        self.tasks: dict[str, Any] = {}

    def __call__(self, e: Event) -> None:
        p = self.progress
        if e.kind == "progress":
            task = self.tasks.get(e.phase)
            if task is None:
                task = self.tasks[e.phase] = p.add_task(e.phase, total=e.total, files="")
            files = "" if e.files is None else f"{e.files} files"
            p.update(task, completed=e.done or 0, total=e.total, files=files)
        else:
            if e.kind == "end" and e.phase in self.tasks:
                p.remove_task(self.tasks.pop(e.phase))
            p.console.print(
                f"[dim]{_stamp(e.at)}[/dim] {describe(e)}", markup=True, highlight=False
            )
        p.refresh()


@contextlib.contextmanager
def watching(
    console: Console, *, verbose: bool = False, quiet: bool = False
) -> Iterator[EventFn | None]:
    """The renderer for ``console`` (stderr): live on a terminal, lines otherwise."""
    if quiet:
        yield None
        return
    if console.is_terminal:
        live = LiveRenderer(console)
        with live.progress:
            yield live
        return
    yield LineRenderer(console.file, interval=1.0 if verbose else 10.0)


__all__ = ["LineRenderer", "LiveRenderer", "Quiet", "Verbose", "describe", "watching"]
