"""What every command module of the CLI shares: its consoles, --json, and JSON output."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
JobFile = Annotated[Path, typer.Argument(help="The job file (TOML; see docs/jobs.md).")]


def console(*, stderr: bool = False, markup: bool = False) -> Console:
    """markup=False: paths and messages print verbatim (a "[/]" in a path is not markup).
    Not a terminal (a log, a pipe): lines are not cut at 80 columns."""
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else 200
    return Console(
        stderr=stderr, highlight=False, soft_wrap=True, markup=markup, width=width
    )  # fmt: skip


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


__all__ = ["JobFile", "JsonOpt", "console", "emit_json"]
