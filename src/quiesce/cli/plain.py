"""Output without rich: what the fast commands (``status``, ``thaw``, ``--help``,
``--version``) print, so that they start without importing typer or rich (json and
redaction are loaded when used).

Streams are looked up at each call (``sys.stdout`` may be swapped after import).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

_STYLES = {"bold red": "1;31", "yellow": "33", "dim": "2", "bold": "1"}


def _color(stream: TextIO) -> bool:
    if os.environ.get("NO_COLOR"):
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def say(label: str, style: str, text: str, *, to_err: bool = True) -> None:
    """``label text`` on one line; the label styled on a terminal."""
    stream = sys.stderr if to_err else sys.stdout
    if _color(stream) and style in _STYLES:
        label = f"\x1b[{_STYLES[style]}m{label}\x1b[0m"
    stream.write(f"{label} {text}\n")
    stream.flush()


def line(text: str, *, to_err: bool = False) -> None:
    stream = sys.stderr if to_err else sys.stdout
    stream.write(text + "\n")
    stream.flush()


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns two spaces apart, the header row first (bold on a terminal)."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=False)]

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    head = fmt(headers)
    if _color(sys.stdout):
        head = f"\x1b[1m{head}\x1b[0m"
    return "\n".join([head, *(fmt(r) for r in rows)])


def emit_json(data: Any) -> None:
    """JSON on stdout, redacted: nothing quiesce prints carries a password."""
    import json

    from quiesce.util.redact import redact_data

    data = redact_data(json.loads(json.dumps(data, default=str)))
    sys.stdout.write(json.dumps(data, indent=2) + "\n")
    sys.stdout.flush()


def print_error(error: dict[str, Any]) -> None:
    """``quiesce: <message>``, each job-file problem with its hint, then ``hint: <hint>``."""
    from quiesce.util.redact import redact_data

    error = redact_data(error)
    say("quiesce:", "bold red", error["message"])
    for p in error.get("problems", []):
        line(f"  {p['path']}: {p['message']}", to_err=True)
        if p.get("hint"):
            line(f"    hint: {p['hint']}", to_err=True)
    if error.get("hint"):
        say("hint:", "dim", error["hint"])


__all__ = ["emit_json", "line", "print_error", "say", "table"]
