"""The guest's job file: what quiesce does when qemu-guest-agent freezes this guest.

The same TOML as a job's quiescing part (``[hooks]``, ``[writers]``, ``timeouts.hook``,
``on_hook_failure``: docs/jobs.md), checked by the job's own validation (trust of the file,
of every hook script and of the hook directory; every problem at its TOML key), plus a
``[guest]`` table for the watchdog. There are no volumes and no provider: the agent
freezes what it finds, and the host takes the snapshot.

```toml
[guest]
deadline = 60      # seconds the agent's freeze may last before quiesce thaws it itself
lease = 10         # seconds the agent may stay stopped (SIGSTOP) inside the window
probe = true       # find filesystems frozen before the hook ran (never thawed by us)

[hooks]
directory = "/etc/qemu/fsfreeze-hook.d"   # the stock hook's scripts, in name order
directory_timeout = 30
```
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, NonNegativeFloat, PositiveFloat, ValidationError

from quiesce.errors import UsageError
from quiesce.host.trust import TrustError, open_checked, read_all
from quiesce.integrations.qga.paths import RUN_DIR
from quiesce.job.schema import JobConfig, JobConfigError, Problem
from quiesce.job.validate import _problem_from, job_from_config

DEFAULT_JOB = Path("/etc/quiesce/qga.toml")
STOCK_HOOK_DIR = Path("/etc/qemu/fsfreeze-hook.d")
_JOB_KEYS = ("name", "on_hook_failure", "timeouts", "hooks", "writers")


class GuestSettings(BaseModel):
    """``[guest]``: the watchdog of the agent's freeze."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    deadline: PositiveFloat = 60.0  # from the hook's "freeze" to quiesce's own thaw
    lease: NonNegativeFloat = 10.0  # how long the agent may stay stopped; 0 = deadline only
    probe: bool = True  # FIFREEZE+FITHAW each candidate first: EBUSY = frozen before us
    run_dir: str = str(RUN_DIR)
    # only these mount points (the list the host gives guest-fsfreeze-freeze-list); [] = all
    mounts: list[str] = []


@dataclass
class GuestJob:
    """A validated guest job: its quiescing part as a Job, and the watchdog's settings."""

    job: Any  # quiesce.job.schema.Job
    guest: GuestSettings
    path: Path | None = None
    warnings: list[str] = field(default_factory=list)


def _loc(prefix: str, loc: tuple[Any, ...]) -> str:
    return ".".join([prefix, *(str(p) for p in loc)]).strip(".")


def guest_job_from_raw(raw: dict[str, Any], shown: str, path: Path | None = None) -> GuestJob:
    """Validate a parsed guest job; JobConfigError lists every problem at its key."""
    problems: list[Problem] = []
    raw = dict(raw)
    guest_raw = raw.pop("guest", {})
    for key in sorted(set(raw) - set(_JOB_KEYS)):
        problems.append(
            Problem(key, "unknown key in a guest job", "allowed: guest, " + ", ".join(_JOB_KEYS))
        )
    guest = GuestSettings()
    if not isinstance(guest_raw, dict):
        problems.append(Problem("guest", "must be a table", "write [guest] deadline = 60"))
    else:
        try:
            guest = GuestSettings.model_validate(guest_raw)
        except ValidationError as e:
            for err in e.errors():
                key = _loc("guest", tuple(err["loc"]))
                if err["type"] == "extra_forbidden":
                    allowed = ", ".join(GuestSettings.model_fields)
                    problems.append(Problem(key, "unknown key", "allowed here: " + allowed))
                else:
                    msg = str(err["msg"]).replace("Input should be", "must be")
                    problems.append(Problem(key, msg, "see docs/vm.md, [guest]"))
    job_raw = {k: v for k, v in raw.items() if k in _JOB_KEYS}
    job_raw |= {"volumes": ["/"], "provider": {"type": "btrfs"}}  # unused: the host snapshots
    job = None
    try:
        config = JobConfig.model_validate(job_raw)
    except ValidationError as e:
        problems += [_problem_from(dict(err)) for err in e.errors()]
    else:
        try:
            job = job_from_config(config, check_volumes=False)
        except JobConfigError as e:
            problems += e.problems  # type: ignore[arg-type]  # Problems, by construction
    if problems or job is None:
        raise JobConfigError(shown, problems)
    job.name = raw.get("name") or "qga"
    return GuestJob(job=job, guest=guest, path=path)


def load_guest_job(path: str | Path | None = None) -> GuestJob:
    """Read and validate the guest job; without a file (the default path missing) the
    stock hook directory is run if it exists, with the default watchdog."""
    p = Path(path) if path is not None else DEFAULT_JOB
    if path is None and not p.exists():
        raw: dict[str, Any] = {}
        if STOCK_HOOK_DIR.is_dir():
            raw = {"hooks": {"directory": str(STOCK_HOOK_DIR)}}
        return guest_job_from_raw(raw, "(built-in guest job)")
    try:
        checked = open_checked(p, follow=True)
        try:
            text = read_all(checked.fd)
        finally:
            os.close(checked.fd)
    except (OSError, TrustError) as e:
        why = e.strerror if isinstance(e, OSError) else e.message
        raise UsageError(
            f"cannot read guest job file {p}: {why}", "give the path of a TOML guest job"
        ) from None
    if checked.problem:
        raise JobConfigError(
            str(p), [Problem("(job file)", checked.problem, f"chown root {checked.culprit}")]
        )
    try:
        raw = tomllib.loads(text.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise JobConfigError(
            str(p), [Problem("(toml)", f"not valid TOML: {e}", "check the syntax near that line")]
        ) from None
    return guest_job_from_raw(raw, str(p), p)


__all__ = ["DEFAULT_JOB", "RUN_DIR", "GuestJob", "GuestSettings", "load_guest_job"]
