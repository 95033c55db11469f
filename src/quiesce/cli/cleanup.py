"""`quiesce cleanup`: remove what crashed runs left behind (registered by cli/app.py)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.text import Text

from quiesce.cli.common import (
    JobStateOpt,
    JsonOpt,
    StateDirOpt,
    chosen_state_dir,
    emit_json,
    err,
    fail,
    out,
    print_error,
)
from quiesce.errors import ExitCode, QuiesceError


def cleanup_cmd(
    state_dir_opt: StateDirOpt = None,
    job_file: JobStateOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only list what would be removed.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Remove what crashed runs left behind (mounts, loop devices, clone files, temp
    dirs), newest first, from the cleanup journal. Runs that are alive are left alone."""
    from quiesce.backup.cleanup import cleanup

    try:
        rep = cleanup(chosen_state_dir(state_dir_opt, job_file), dry_run=dry_run)
    except QuiesceError as e:  # an untrusted state directory or journal: nothing was run
        raise fail(e, as_json) from None
    if as_json:
        emit_json(rep.to_dict() | {"dry_run": dry_run})
    else:
        verb = "would remove" if dry_run else "removed"
        for r in rep.removed:
            what = r.get("target") or r.get("path") or r.get("device") or r.get("backing") or ""
            if r["kind"] == "loop" and r.get("device"):
                what = f"{r['device']} ({r.get('backing')})"
            if r["kind"] == "repository":
                what = f"stale locks of {r.get('tool')} {r.get('location')}"
            out.print(f"{verb} {r['kind']}: {what!s} (run {r['run']})")
        for s in rep.skipped_live:
            out.print(f"left alone: run {s} is still running")
        for u in rep.unreadable:  # its snapshot may exist: say so, never hide it
            err.print(
                Text.assemble(("warning:", "yellow"), f" manifest {u['path']} is unreadable "
                              f"({u['reason']}): its snapshot (if any) is not managed; fix or "
                              "remove the file")
            )  # fmt: skip
        if not rep.removed and not rep.errors:
            out.print("nothing to clean up")
        for problem in rep.errors:
            print_error({"message": problem})
    if rep.errors:
        if not as_json:
            print_error(
                {
                    "message": "cleanup is not complete",
                    "hint": "fix the cause (a busy mount?) and run `quiesce cleanup` again",
                }
            )
        raise typer.Exit(ExitCode.FAILURE)


__all__ = ["cleanup_cmd"]
