"""`quiesce systemd JOB.toml`: print or install a job's hardened service and timer
(registered by cli/app.py; the units themselves: integrations/systemd.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from quiesce.cli.common import JobFile, JsonOpt, emit_json, err, fail, out
from quiesce.errors import QuiesceError


def systemd_cmd(
    job_file: JobFile,
    install: Annotated[
        bool, typer.Option("--install", help="Write the units to /etc/systemd/system.")
    ] = False,
    on_calendar: Annotated[
        str, typer.Option("--on-calendar", help="When to run (systemd.time(7)).")
    ] = "daily",
    randomized_delay: Annotated[
        str, typer.Option("--randomized-delay", help="RandomizedDelaySec= of the timer.")
    ] = "15min",
    environment_file: Annotated[
        str | None,
        typer.Option("--environment-file", help="EnvironmentFile= (e.g. the password variable)."),
    ] = None,
    unit_dir: Annotated[
        Path, typer.Option("--unit-dir", hidden=True, help="Where --install writes.")
    ] = Path("/etc/systemd/system"),
    force: Annotated[
        bool, typer.Option("--force", help="With --install: replace units edited by hand.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Print (or install with --install) a hardened service + timer pair for the job."""
    from quiesce.integrations.systemd import check_calendar, private_tmp_warnings, render, unit_spec
    from quiesce.integrations.systemd import install as install_units
    from quiesce.job.backupjob import load_backup_job

    try:
        job = load_backup_job(job_file)
        check_calendar(on_calendar)
        spec = unit_spec(
            job,
            on_calendar=on_calendar,
            randomized_delay=randomized_delay,
            env_file=environment_file,
        )
        units = render(spec)
        warnings = private_tmp_warnings([str(job.path), *spec.rw_paths, *spec.rw_optional])
        written = install_units(units, unit_dir, force=force) if install else []
    except QuiesceError as e:
        raise fail(e, as_json) from None
    except OSError as e:
        raise fail(QuiesceError(f"cannot write the units: {e}"), as_json) from None
    if as_json:
        emit_json({"units": units, "written": [str(p) for p in written], "warnings": warnings})
        return
    for w in warnings:
        err.print(f"warning: {w}", markup=False)
    if not install:
        for name, text in units.items():
            out.print(f"# {unit_dir / name}", markup=False)
            out.print(text, markup=False)
        return
    for p in written:
        out.print(f"wrote {p}")
    timer = next(n for n in units if n.endswith(".timer"))
    out.print(f"enable it with: systemctl enable --now {timer}")


__all__ = ["systemd_cmd"]
