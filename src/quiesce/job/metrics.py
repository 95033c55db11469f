"""Prometheus textfile-collector output (node_exporter ``--collector.textfile.directory``).

One file may hold several jobs: the samples of other jobs are kept, ours are replaced.
The file is written to a temporary file in the same directory (mkstemp: O_EXCL, a name
nobody can guess), fsync'd and renamed, so node_exporter never reads half a file; a lock
file (0600, O_NOFOLLOW) serialises jobs that share one. The textfile itself is 0644 (and
a directory quiesce makes for it 0755): node_exporter runs as its own user and must read
it; it holds no secrets.
``last_success_timestamp_seconds`` survives a failed run (alert on its age); a job that
has never succeeded has it at 0, so that the same alert fires for it too.
``runs_total`` counts the runs (a counter: the file keeps it across runs).

The directory is a trust boundary like the state directory (:mod:`quiesce.host.trust`):
it and every directory above it must be root's and not writable by others (a root-owned
sticky one such as /tmp passes), else another user could swap it for a link to a
directory of their choice. The lock and the textfile are opened with
``O_NOFOLLOW|O_NONBLOCK`` and refused unless they are regular files that root owns: a
FIFO planted at either name must not hang a run (an open of a FIFO blocks until its
other end is opened). A refusal is an ``OSError`` (EPERM) whose text says why: the run
reports it as a warning, like a full disk.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import math
import os
import re
import stat
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quiesce.host.files import write_atomic
from quiesce.host.trust import TrustError, open_trusted_dir
from quiesce.snapshot.consistency import Consistency
from quiesce.util.redact import redact

# the level as a number (alert on ``< 1``): the strongest level is the highest
LEVEL_VALUE = {level: len(Consistency) - 1 - level.rank for level in Consistency}

PREFIX = "quiesce_"
# name -> help text (gauges, but for COUNTERS)
METRICS: dict[str, str] = {
    "last_run_timestamp_seconds": "Unix time when the last run of the job finished.",
    "last_run_success": "1 if the last run of the job succeeded, else 0.",
    "last_run_exit_code": "Exit code of the last run (0 ok; see README: exit codes).",
    "runs_total": "Runs of the job (quiesce run and quiesce backup), whatever their outcome.",
    "last_success_timestamp_seconds": (
        "Unix time when a run of the job last succeeded (0: never, so staleness alerts fire)."
    ),
    "run_duration_seconds": "Duration of the last run, from start to report.",
    "freeze_window_seconds": "Freeze window of the last run: first FIFREEZE to last FITHAW.",
    "backup_bytes": "Bytes of file content the last backup processed.",
    "backup_added_bytes": (
        "New bytes the last backup added to the target (after dedup, before compression)."
    ),
    "backup_files": "Files the last backup processed.",
    "backup_duration_seconds": "Duration of the last backup phase (the target's command).",
    "verify_success": "1 if the last backup was verified good, 0 if it failed verification.",
    "drill_success": (
        "1 if the last restore drill passed (every application recovered on a copy of the "
        "snapshot and passed its check), 0 if it failed."
    ),
    "drill_recovery_seconds": "Longest application recovery of the last restore drill.",
    "consistency_level": "Consistency of the last snapshot: "
    + ", ".join(f"{v} {level}" for level, v in LEVEL_VALUE.items())
    + " (docs/consistency.md).",
}
COUNTERS = frozenset({"runs_total"})
_SAMPLE = re.compile(
    r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)\{job="(?P<job>(?:[^"\\]|\\.)*)"\} (?P<v>\S+)'
)


@dataclass
class RunMetrics:
    """What one run reports. ``None`` means "not measured this run" (no sample), except
    for the names in ``keep``: their previous sample stays (``quiesce backup --snapshot
    OLD`` says nothing about the newest freeze window)."""

    job: str
    success: bool
    exit_code: int | None = None  # default: 0 on success, else 1
    finished: float | None = None  # unix time; default: now
    duration_s: float | None = None
    freeze_window_s: float | None = None
    backup_bytes: int | None = None
    backup_added_bytes: int | None = None
    backup_files: int | None = None
    backup_duration_s: float | None = None
    verify_ok: bool | None = None
    drill_ok: bool | None = None
    drill_recovery_s: float | None = None
    consistency: str | None = None  # a Consistency, when a snapshot was made
    keep: frozenset[str] = frozenset()

    def samples(self, previous: Mapping[str, float] | None = None) -> dict[str, float]:
        """This run's samples, given the job's samples in the file so far."""
        previous = previous or {}
        now = self.finished if self.finished is not None else time.time()
        code = self.exit_code if self.exit_code is not None else (0 if self.success else 1)
        last_success = previous.get("last_success_timestamp_seconds", 0.0)
        out: dict[str, float | None] = {
            "last_run_timestamp_seconds": now,
            "last_run_success": 1.0 if self.success else 0.0,
            "last_run_exit_code": code,
            "runs_total": previous.get("runs_total", 0.0) + 1,
            "last_success_timestamp_seconds": now if self.success else last_success,
            "run_duration_seconds": self.duration_s,
            "freeze_window_seconds": self.freeze_window_s,
            "backup_bytes": self.backup_bytes,
            "backup_added_bytes": self.backup_added_bytes,
            "backup_files": self.backup_files,
            "backup_duration_seconds": self.backup_duration_s,
            "verify_success": None if self.verify_ok is None else float(self.verify_ok),
            "drill_success": None if self.drill_ok is None else float(self.drill_ok),
            "drill_recovery_seconds": self.drill_recovery_s,
            "consistency_level": (
                LEVEL_VALUE[Consistency.read(self.consistency)] if self.consistency else None
            ),
        }
        for name in self.keep:
            if out.get(name) is None and name in previous:
                out[name] = previous[name]
        return {k: float(v) for k, v in out.items() if v is not None}


def run_metrics(
    job: str,
    *,
    success: bool,
    duration_s: float | None,
    freeze_window_s: float | None,
    backup: Mapping[str, Any] | None,
    exit_code: int | None = None,
    keep: frozenset[str] = frozenset(),
    consistency: str | None = None,
) -> RunMetrics:
    """The one mapping from what a run (or ``quiesce backup``) did to its metrics;
    ``backup`` is a BackupReport's ``to_dict()``, or None when no backup ran."""
    b = (backup or {}).get("backup") or {}
    v = (backup or {}).get("verify")
    d = (backup or {}).get("drill") or {}
    return RunMetrics(
        job=job,
        success=success,
        exit_code=exit_code,
        keep=keep,
        consistency=consistency,
        duration_s=duration_s,
        freeze_window_s=freeze_window_s,
        backup_bytes=b.get("bytes"),
        backup_added_bytes=b.get("bytes_added"),
        backup_files=b.get("files"),
        backup_duration_s=b.get("duration_s"),
        verify_ok=None if not v or v.get("mode") == "none" else bool(v.get("ok")),
        drill_ok=bool(d["ok"]) if d else None,
        drill_recovery_s=d.get("recovery_s"),
    )


def refused_run_metrics(job_file: str | Path, exit_code: int) -> str | None:
    """A run refused before it started (the job file does not load: a key typo, a
    missing password file) still counts: ``last_run_success`` 0, when the file names
    its ``metrics_file`` (read from the raw TOML, as far as it parses). Returns the
    metrics file written, or None."""
    import tomllib

    try:
        raw = tomllib.loads(Path(job_file).read_text())
    except (OSError, ValueError):
        return None
    target = raw.get("metrics_file")
    if not isinstance(target, str) or not os.path.isabs(target):
        return None
    from quiesce.job.schema import NAME_RE

    name, stem = raw.get("name"), Path(job_file).stem
    job = name if isinstance(name, str) and name else (stem if NAME_RE.match(stem) else "job")
    run = RunMetrics(job=job, success=False, exit_code=exit_code, keep=frozenset(METRICS))
    try:
        write_textfile(target, run)  # the last good run's other samples stay
    except OSError:
        return None
    return target


def escape_label(value: str) -> str:
    """A label value as the exposition format quotes it, redacted (metrics are public)."""
    value = redact(value)
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def unescape_label(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


def format_value(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


def parse(text: str) -> dict[str, dict[str, float]]:
    """Our own samples in ``text``: job -> {metric (without prefix) -> value}."""
    jobs: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m or not m.group("name").startswith(PREFIX):
            continue
        name = m.group("name")[len(PREFIX) :]
        if name not in METRICS:
            continue
        with contextlib.suppress(ValueError):
            jobs.setdefault(unescape_label(m.group("job")), {})[name] = float(m.group("v"))
    return jobs


def render(jobs: Mapping[str, Mapping[str, float]]) -> str:
    """The exposition text: HELP and TYPE once per metric, one sample per job."""
    lines = []
    for name, help_text in METRICS.items():
        rows = [(job, vals[name]) for job, vals in sorted(jobs.items()) if name in vals]
        if not rows:
            continue
        lines.append(f"# HELP {PREFIX}{name} {help_text}")
        kind = "counter" if name in COUNTERS else "gauge"
        lines.append(f"# TYPE {PREFIX}{name} {kind}")
        for job, value in rows:
            lines.append(f'{PREFIX}{name}{{job="{escape_label(job)}"}} {format_value(value)}')
    return "\n".join(lines) + "\n"


def _refused(why: str) -> OSError:
    return OSError(errno.EPERM, why)


def _open_regular(path: Path, flags: int, mode: int = 0o600) -> int:
    """``path`` opened without following a link or blocking on a FIFO, and kept only if
    it is a regular file of root's that nobody else may write."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as e:  # a FIFO without a reader (ENXIO), fs.protected_fifos (EACCES)
        try:
            odd = e.errno != errno.ELOOP and not stat.S_ISREG(os.lstat(path).st_mode)
        except OSError:
            odd = False
        if odd:
            raise _refused(f"refusing {path}: it is not a regular file (remove it)") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _refused(f"refusing {path}: it is not a regular file (remove it)")
        if st.st_uid != 0 or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise _refused(f"refusing {path}: someone other than root may write it (remove it)")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_dir(directory: Path) -> None:
    """The metrics directory, made 0755 if missing (node_exporter reads it), and refused
    unless root may trust it and every directory above it."""
    missing, probe = [], directory
    while not os.path.lexists(probe) and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    try:
        fd = open_trusted_dir(
            directory, create=True, what="metrics_file's directory", as_parent=True
        )
    except TrustError as e:
        raise _refused(e.message) from None
    os.close(fd)
    for d in missing:  # made 0700 by root just now: node_exporter (its own user) reads them
        dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fchmod(dfd, 0o755)
        finally:
            os.close(dfd)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    lock = path.with_name(f".{path.name}.lock")
    fd = _open_regular(lock, os.O_WRONLY | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read_nofollow(path: Path) -> str:
    """The current textfile; a link, FIFO or device there is refused, not followed."""
    fd = _open_regular(path, os.O_RDONLY)
    with os.fdopen(fd) as f:
        return f.read()


def write_textfile(path: str | Path, run: RunMetrics) -> str:
    """Replace ``run.job``'s samples in the file at ``path``, atomically. Returns the text.
    OSError (EPERM, saying why) if the directory or a file in it is not root's alone."""
    path = Path(os.path.abspath(path))
    _check_dir(path.parent)
    with _locked(path):
        try:
            jobs = parse(_read_nofollow(path))
        except FileNotFoundError:
            jobs = {}
        jobs[run.job] = run.samples(jobs.get(run.job))
        text = render(jobs)
        write_atomic(path, text, mode=0o644)  # node_exporter runs as its own user
    return text


__all__ = [
    "COUNTERS",
    "LEVEL_VALUE",
    "METRICS",
    "RunMetrics",
    "parse",
    "refused_run_metrics",
    "render",
    "run_metrics",
    "write_textfile",
]
