"""Showing a backup's progress: a live rich bar on a terminal, plain lines otherwise.

Plain lines (cron mail, journald) come at most every ``interval`` seconds so that a
night's log holds a few dozen lines, not thousands.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from quiesce.backup.targets.base import ProgressFn, ProgressUpdate
from quiesce.util.units import human_bytes


class PlainProgress:
    """``backup: 1.2 GiB / 2.0 GiB (60%), 1200/2000 files, ETA 0:12`` every interval."""

    def __init__(self, stream: IO[str], label: str = "backup", interval: float = 10.0) -> None:
        self.stream = stream
        self.label = label
        self.interval = interval
        self._last = time.monotonic()  # the first line after one interval, not at 0%
        self.last_update: ProgressUpdate | None = None

    def __call__(self, u: ProgressUpdate) -> None:
        self.last_update = u
        now = time.monotonic()
        if now - self._last < self.interval:
            return
        self._last = now
        self.stream.write(self.format(u) + "\n")
        self.stream.flush()

    def format(self, u: ProgressUpdate) -> str:
        parts = [f"{self.label}: {human_bytes(u.bytes_done)}"]
        if u.total_bytes:
            pct = 100 * u.bytes_done / u.total_bytes
            parts[0] += f" / {human_bytes(u.total_bytes)} ({pct:.0f}%)"
        files = f"{u.files_done}" + (f"/{u.total_files}" if u.total_files else "") + " files"
        parts.append(files)
        if u.eta_s is not None:
            m, s = divmod(int(u.eta_s), 60)
            parts.append(f"ETA {m}:{s:02d}")
        return ", ".join(parts)


class BinarySpeedColumn(ProgressColumn):
    """``1.2 GiB/s``: the same binary units as the sizes (rich's own speed is decimal)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(
            "?" if speed is None else f"{human_bytes(speed)}/s", style="progress.data.speed"
        )


class RichProgress:
    """A live bar with bytes, speed, files and ETA (only on a terminal)."""

    def __init__(self, console: Console, label: str = "backup") -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            DownloadColumn(binary_units=True),
            BinarySpeedColumn(),
            TextColumn("{task.fields[files]}"),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )
        self.task = self.progress.add_task(label, total=None, files="")

    def __call__(self, u: ProgressUpdate) -> None:
        files = f"{u.files_done}" + (f"/{u.total_files}" if u.total_files else "") + " files"
        self.progress.update(self.task, completed=u.bytes_done, total=u.total_bytes, files=files)


@contextmanager
def progress_for(
    console: Console | None, label: str = "backup", interval: float = 10.0
) -> Iterator[ProgressFn | None]:
    """The right reporter for ``console``: rich bar on a TTY, plain lines otherwise."""
    if console is None or console.quiet:
        yield None
        return
    if console.is_terminal:
        reporter = RichProgress(console, label)
        with reporter.progress:
            yield reporter
        return
    yield PlainProgress(console.file, label, interval)


__all__ = ["BinarySpeedColumn", "PlainProgress", "RichProgress", "progress_for"]
