"""What every command module of the CLI shares: its consoles, --json, JSON output, and
how an error is printed and turned into an exit code."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.text import Text

from quiesce.errors import QuiesceError
from quiesce.util.redact import redact_data

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
JobFile = Annotated[Path, typer.Argument(help="The job file (TOML; see docs/jobs.md).")]
StateDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--state-dir",
        help="State directory (default: the --job's state_dir, else $QUIESCE_STATE_DIR, "
        "else /var/lib/quiesce); never on a snapshotted volume.",
    ),
]
JobStateOpt = Annotated[
    Path | None,
    typer.Option("--job", metavar="JOB.toml", help="Use the state_dir of this job file."),
]


def chosen_state_dir(state_dir: Path | None, job_file: Path | None) -> Path | None:
    """The state directory a command reads: --state-dir, else the state_dir of --job
    JOB.toml, else None ($QUIESCE_STATE_DIR, else /var/lib/quiesce). The one rule every
    command and the generated units follow."""
    if job_file is None:
        return state_dir
    from quiesce.errors import UsageError
    from quiesce.job.backupjob import load_backup_job
    from quiesce.state.statedir import state_dir as resolve

    job_dir = load_backup_job(job_file).state_dir
    if state_dir is not None and resolve(state_dir).absolute() != resolve(job_dir).absolute():
        raise UsageError(
            f"--state-dir {state_dir} is not the state_dir of --job {job_file} "
            f"({resolve(job_dir)})",
            "give only one of --state-dir and --job",
        )
    return Path(job_dir) if job_dir else None


def console(*, stderr: bool = False, markup: bool = False) -> Console:
    """markup=False: paths and messages print verbatim (a "[/]" in a path is not markup).
    Not a terminal (a log, a pipe): lines are not cut at 80 columns."""
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else 200
    return Console(
        stderr=stderr, highlight=False, soft_wrap=True, markup=markup, width=width
    )  # fmt: skip


def emit_json(data: Any) -> None:
    """JSON on stdout, redacted: nothing quiesce prints carries a password."""
    data = redact_data(json.loads(json.dumps(data, default=str)))
    sys.stdout.write(json.dumps(data, indent=2) + "\n")
    sys.stdout.flush()


out = console()  # markup off: paths and messages print verbatim; renderers opt in
err = console(stderr=True)


def print_error(error: dict[str, Any], to: Console | None = None) -> None:
    """``quiesce: <message>``, each job-file problem with its hint, then ``hint: <hint>``."""
    to = to or err
    error = redact_data(error)
    to.print(Text.assemble(("quiesce:", "bold red"), " ", error["message"]))
    for p in error.get("problems", []):
        to.print(f"  {p['path']}: {p['message']}", markup=False)
        if p.get("hint"):
            to.print(f"    hint: {p['hint']}", markup=False)
    if error.get("hint"):
        to.print(Text.assemble(("hint:", "dim"), " ", error["hint"]))


def fail(e: QuiesceError, as_json: bool = False) -> typer.Exit:
    """Print ``e`` (JSON on stdout with --json, the message and hint on stderr) and
    return the Exit that carries its exit code."""
    data = e.to_dict()
    if as_json:
        if e.window is not None:
            data["window"] = e.window.to_dict()
        emit_json(data)
    print_error(data)
    return typer.Exit(e.exit_code)


__all__ = [
    "JobFile",
    "JobStateOpt",
    "JsonOpt",
    "StateDirOpt",
    "chosen_state_dir",
    "console",
    "emit_json",
    "err",
    "fail",
    "out",
    "print_error",
]
