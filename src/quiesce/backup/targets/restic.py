"""The restic target.

``restic backup`` runs in the job's stable mount root with the volumes' names as
relative paths: the snapshot's ``paths`` are then the same absolute paths every night,
so restic finds the previous snapshot as parent and skips every file whose size, mtime,
ctime and inode did not change (a block-level clone keeps all four). The repository and
the password reach restic through its environment only.
"""

from __future__ import annotations

import json
import re
import signal
import socket
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

from quiesce.backup.targets.base import (
    RESTIC_INHERIT,
    WRONG_PASSWORD,
    BackupError,
    BackupResult,
    CheckResult,
    ChildResult,
    ProgressFn,
    ProgressUpdate,
    Target,
    TargetSnapshot,
    check_child,
    require,
    run_child,
    secret_env,
    tagged_source,
)
from quiesce.errors import UsageError
from quiesce.host import pids
from quiesce.state.retention import as_datetime
from quiesce.util.redact import redact, register_url_secrets

_GLOB = re.compile(r"([*?\[\]\\])")


def _escape_pattern(path: str) -> str:
    """restic's --include takes filepath.Match patterns: escape a literal name."""
    return _GLOB.sub(r"\\\1", path)


class ResticTarget(Target):
    name: ClassVar[str] = "restic"

    def __init__(
        self,
        repository: str,
        *,
        password_file: str | None = None,
        password_env: str | None = None,
        job: str = "adhoc",
        host: str | None = None,
        tags: Sequence[str] = (),
        exclude: Sequence[str] = (),
        extra_args: Sequence[str] = (),
        cache_dir: str | Path | None = None,
        binary: str = "restic",
    ) -> None:
        self.repository = repository  # may be a URL with a password: never shown as is
        register_url_secrets(repository)
        self.job = job
        self.host = host or socket.gethostname()
        self.job_tag = f"quiesce-job={job}"
        self.tags = [self.job_tag, *[t for t in tags if t != self.job_tag]]
        self.exclude = list(exclude)
        self.extra_args = list(extra_args)
        self.cache_dir = str(cache_dir) if cache_dir else None
        self.binary = binary
        self._password = {"password_file": password_file, "password_env": password_env}

    # -- plumbing ----------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        env = {"RESTIC_REPOSITORY": self.repository, "RESTIC_PROGRESS_FPS": "2"}
        if self.cache_dir:
            env["RESTIC_CACHE_DIR"] = self.cache_dir
        env |= secret_env(
            **self._password,
            file_var="RESTIC_PASSWORD_FILE",
            value_var="RESTIC_PASSWORD",
            what="restic",
        )
        return env

    def _child(self, *args: str, **kw: Any) -> ChildResult:
        """restic releases its repository lock on SIGINT, not on SIGTERM (0.14): that is
        its stop signal, on a timeout and when quiesce dies."""
        require(self.binary, "restic")
        return run_child(
            [self.binary, *args],
            env=self.env(),
            inherit=RESTIC_INHERIT,
            stop_signal=signal.SIGINT,
            **kw,
        )

    def _run(self, *args: str, what: str, timeout: float | None = None, **kw: Any):
        res = self._child(*args, timeout=timeout, **kw)
        check_child(res, what)
        return res

    def exists(self) -> bool:
        # --no-cache: `quiesce check` asks too, and must not create a cache
        return self._child("--no-cache", "cat", "config", timeout=120).returncode == 0

    def locked_out(self) -> str | None:
        res = self._child("--no-cache", "cat", "config", timeout=120)
        if res.returncode != 0 and "wrong password" in (res.stderr or ""):
            return WRONG_PASSWORD.format(target="restic", repo=redact(self.repository))
        return None

    def init(self) -> None:
        if not self.exists():
            self.refuse_locked_out()
            self._run("init", what="restic init", timeout=300)

    def remove_stale_locks(self) -> list[str]:
        """restic removes its lock on SIGINT, but a restic that was SIGKILLed leaves it,
        and every later command fails with "repository is already locked". A lock names
        its host and pid: if this host's process is gone, ``restic unlock`` (which removes
        exactly such locks, and those not refreshed for 30 minutes) is run."""
        listed = self._child("list", "locks", "--no-lock", timeout=300)
        if listed.returncode != 0:
            return []  # unreachable, or not a repository: no lock a next run would meet
        stale = []
        for lock_id in listed.stdout.split():
            res = self._child("cat", "lock", lock_id, "--no-lock", timeout=300)
            if res.returncode != 0:
                continue  # removed meanwhile
            try:
                lock = json.loads(res.stdout)
            except ValueError:
                continue
            if lock.get("hostname") == socket.gethostname() and not pids.pid_alive(lock.get("pid")):
                stale.append(f"{lock_id[:8]} (pid {lock.get('pid')})")
        if stale:
            self._run("unlock", what="restic unlock", timeout=300)
        return stale

    # -- backup ------------------------------------------------------------------------
    def backup(
        self,
        source_dir: Path,
        *,
        paths: Sequence[str] | None = None,
        tags: Sequence[str] = (),
        host: str | None = None,
        time: datetime | None = None,
        label: str | None = None,
        progress: ProgressFn | None = None,
        timeout: float | None = None,
    ) -> BackupResult:
        names = list(paths) if paths else ["."]
        args = ["backup", "--json", "--host", host or self.host]
        for t in [*self.tags, *[t for t in tags if t not in self.tags]]:
            args += ["--tag", t]
        if time is not None:
            args += ["--time", as_datetime(time).astimezone().strftime("%Y-%m-%d %H:%M:%S")]
        for pattern in self.exclude:
            args += ["--exclude", pattern]
        args += [*self.extra_args, "--", *names]
        summary: dict[str, Any] = {}
        errors: list[str] = []

        def on_line(line: str) -> None:
            if not line.startswith("{"):
                return
            msg = json.loads(line)
            kind = msg.get("message_type")
            if kind == "status" and progress is not None:
                progress(
                    ProgressUpdate(
                        bytes_done=int(msg.get("bytes_done", 0)),
                        total_bytes=msg.get("total_bytes"),
                        files_done=int(msg.get("files_done", 0)),
                        total_files=msg.get("total_files"),
                        eta_s=msg.get("seconds_remaining"),
                        current=(msg.get("current_files") or [None])[0],
                    )
                )
            elif kind == "summary":
                summary.update(msg)
            elif kind == "error":
                errors.append(str(msg.get("error", {}).get("message") or msg))

        res = self._child(*args, cwd=source_dir, timeout=timeout, on_stdout_line=on_line)
        # exit 3: snapshot made, but some files could not be read
        check_child(res, "restic backup", ok_codes=(0, 3))
        if not summary.get("snapshot_id"):
            raise BackupError(
                redact(f"restic backup printed no summary: {res.stderr.strip()[-400:]}")
            )
        extra: dict[str, Any] = {
            k: summary.get(k)
            for k in ("dirs_new", "dirs_changed", "dirs_unmodified", "data_blobs", "tree_blobs")
        }
        extra["restic_duration_s"] = summary.get("total_duration")
        if res.returncode == 3 or errors:
            extra["unreadable"] = errors[:20] or [res.stderr.strip()[-400:]]
        return BackupResult(
            target=self.name,
            snapshot_id=str(summary["snapshot_id"]),
            bytes=int(summary.get("total_bytes_processed", 0)),
            files=int(summary.get("total_files_processed", 0)),
            duration_s=res.duration_s,
            bytes_added=summary.get("data_added"),
            files_new=summary.get("files_new"),
            files_changed=summary.get("files_changed"),
            files_unmodified=summary.get("files_unmodified"),
            location=self.repository,
            extra=extra,
        )

    # -- the rest ----------------------------------------------------------------------
    def check(self, read_data_subset: str | None = None) -> CheckResult:
        args = ["check"] + ([f"--read-data-subset={read_data_subset}"] if read_data_subset else [])
        res = self._child(*args, timeout=None)
        return CheckResult(res.returncode == 0, res.duration_s, (res.stdout + res.stderr)[-2000:])

    def restore(self, snapshot_id: str, dest: Path, paths: Sequence[str] | None = None) -> Path:
        args = ["restore", snapshot_id, "--target", str(dest)]
        for p in paths or ():
            args += ["--include", "/" + _escape_pattern(p.strip("/"))]
        self._run(*args, what="restic restore")
        return dest

    def snapshots(self) -> list[TargetSnapshot]:
        res = self._run(
            "snapshots", "--json", "--host", self.host, "--tag", self.job_tag,
            what="restic snapshots", timeout=300,
        )  # fmt: skip
        return [
            TargetSnapshot(
                id=_short(s),
                time=datetime.fromisoformat(_trim_nanos(s["time"])),
                paths=s.get("paths", []),
                tags=s.get("tags") or [],
                host=s.get("hostname"),
                source=tagged_source(s.get("tags") or []),
            )
            for s in json.loads(res.stdout or "[]")
        ]

    def remove(self, backup_ids: Sequence[str]) -> str:
        res = self._run(
            "forget", "--prune", *backup_ids, what="restic forget --prune", timeout=None
        )
        return res.stderr[-1000:]


def _short(snap: dict[str, Any]) -> str:
    return str(snap.get("short_id") or str(snap.get("id", ""))[:8])


def _trim_nanos(ts: str) -> str:
    """restic prints nanoseconds and 'Z'; fromisoformat (3.11) takes microseconds."""
    ts = ts.replace("Z", "+00:00")
    m = re.match(r"(.*\.\d{6})\d*(.*)", ts)
    return m.group(1) + m.group(2) if m else ts


def from_config(cfg: Any, job: str, cache_dir: Path | None = None) -> ResticTarget:
    if not cfg.repository:
        raise UsageError("the restic target needs a repository")
    return ResticTarget(
        cfg.repository,
        password_file=cfg.password_file,
        password_env=cfg.password_env,
        job=job,
        host=cfg.host,
        tags=cfg.tags,
        exclude=cfg.exclude,
        extra_args=cfg.extra_args,
        cache_dir=cache_dir,
    )


__all__ = ["ResticTarget", "from_config"]
