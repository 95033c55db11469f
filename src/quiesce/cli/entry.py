"""The ``quiesce`` entry point: the commands that must start fast are served here
without importing typer or rich; everything else goes to the typer app (cli/app.py).

Served here: ``status [--json]``, ``thaw PATH... [--json]``, ``--version``, and the
top-level help (``--help``, ``-h``, no arguments) when stdout is not a terminal (the
text was rendered from the typer app into package data; a test keeps it equal to the
live rendering). Any other flag, or a terminal for the help, falls through to typer,
which then parses and answers exactly as before.
"""

from __future__ import annotations

import os
import sys

from quiesce.errors import QuiesceError

HELP_WIDTH = 80  # the width rich renders for a pipe when COLUMNS is not set


def _help_text() -> str | None:
    if sys.stdout.isatty() or os.environ.get("COLUMNS", str(HELP_WIDTH)) != str(HELP_WIDTH):
        return None
    from importlib import resources

    try:
        return (resources.files("quiesce.cli") / "data" / "help.txt").read_text()
    except OSError:
        return None


def _json_and_rest(args: list[str]) -> tuple[bool, list[str]] | None:
    """``--json`` and the positional arguments; None if any other option is there."""
    rest = [a for a in args if a != "--json"]
    if any(a.startswith("-") for a in rest):
        return None
    return len(rest) != len(args), rest


def serve(args: list[str]) -> int | None:
    """The exit code of a command served here, or None: let typer handle it."""
    if any(k.startswith("_") and k.endswith("_COMPLETE") for k in os.environ):
        return None  # shell completion: click's business
    if args == ["--version"]:
        from quiesce import __version__

        sys.stdout.write(__version__ + "\n")
        return 0
    if args in ([], ["--help"], ["-h"]):
        text = _help_text()
        if text is None:
            return None
        # click prints the help for no arguments too, without the last blank line, and
        # exits 2 (a command was expected)
        sys.stdout.write(text if args else text.removesuffix("\n"))
        return 0 if args else 2
    if args[0] not in ("status", "thaw"):
        return None
    parsed = _json_and_rest(args[1:])
    if parsed is None:
        return None
    as_json, paths = parsed
    from quiesce.cli import holds

    if args[0] == "status":
        return holds.status(as_json) if not paths else None
    return holds.thaw(paths, as_json) if paths else None


def main(argv: list[str] | None = None) -> None:
    sys.dont_write_bytecode = True  # quiesce may run from a venv on a volume it freezes
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        code = serve(args)
    except KeyboardInterrupt:
        from quiesce.cli.plain import say

        say("quiesce:", "bold red", "interrupted")
        say("hint:", "dim", "stopped by Ctrl-C; everything quiesce had frozen was thawed first")
        code = 130
    except QuiesceError as e:  # raised outside a command's own handler
        from quiesce.cli.plain import print_error

        print_error(e.to_dict())
        code = int(e.exit_code)
    if code is None:
        from quiesce.cli.app import main as typer_main

        typer_main(args)
        return
    sys.stdout.flush()
    sys.exit(code)


__all__ = ["main", "serve"]
