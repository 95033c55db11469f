"""The borg target (borgbackup 1.2).

``borg create`` runs in the job's stable mount root with the volumes' names as
relative paths, so archive paths are ``<volume>/...`` and borg's files cache (keyed by
the absolute path, checked by ctime, size and inode) skips unchanged files night after
night. Repository and passphrase reach borg through its environment only
(``BORG_REPO``, ``BORG_PASSCOMMAND`` reading the job's password file, or
``BORG_PASSPHRASE``). Archive names come from the job and the snapshot's UTC time.
"""

from __future__ import annotations

import json
import re
import shlex
import socket
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

from quiesce.backup.targets.base import (
    BORG_INHERIT,
    WRONG_PASSWORD,
    BackupError,
    BackupResult,
    CheckResult,
    ProgressFn,
    ProgressUpdate,
    Target,
    TargetSnapshot,
    check_child,
    password_file_path,
    password_from_env,
    require,
    run_child,
    tagged_source,
)
from quiesce.errors import UsageError
from quiesce.state.retention import as_datetime
from quiesce.util.redact import redact, register_url_secrets

TIME_FORMAT = "%Y%m%dT%H%M%SZ"
TIME_GLOB = "[0-9]" * 8 + "T" + "[0-9]" * 6 + "Z*"
_PRUNE_LINE = re.compile(r"^(Keeping|Pruning|Would prune) archive[^:]*:\s+(\S+)")


def archive_name(template: str, job: str, when: datetime) -> str:
    if "{time}" not in template:
        raise UsageError(f"the archive name {template!r} has no {{time}}", 'use "{job}-{time}"')
    return template.format(job=job, time=as_datetime(when).astimezone(UTC).strftime(TIME_FORMAT))


class BorgTarget(Target):
    name: ClassVar[str] = "borg"

    def __init__(
        self,
        repository: str,
        *,
        password_file: str | None = None,
        password_env: str | None = None,
        job: str = "adhoc",
        host: str | None = None,
        tags: Sequence[str] = (),
        archive: str = "{job}-{time}",
        compression: str | None = None,
        exclude: Sequence[str] = (),
        extra_args: Sequence[str] = (),
        base_dir: str | Path | None = None,
        binary: str = "borg",
    ) -> None:
        self.repository = repository  # may be a URL with a password: never shown as is
        register_url_secrets(repository)
        self.job = job
        self.host = host or socket.gethostname()
        self.tags = list(tags)
        self.archive = archive
        self.compression = compression
        self.exclude = list(exclude)
        self.extra_args = list(extra_args)
        self.base_dir = str(base_dir) if base_dir else None
        self.binary = binary
        self.password_file = password_file
        self.password_env = password_env
        self.glob = archive.format(job=job, time=TIME_GLOB)

    # -- plumbing ----------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        env = {
            "BORG_REPO": self.repository,
            "BORG_RELOCATED_REPO_ACCESS_IS_OK": "no",
            "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "no",
        }
        if self.base_dir:
            env["BORG_BASE_DIR"] = self.base_dir
        if self.password_file:
            path = password_file_path(self.password_file, "borg")
            # borg splits this with shlex and runs it without a shell
            env["BORG_PASSCOMMAND"] = "cat -- " + shlex.quote(str(path))
        elif self.password_env:
            env["BORG_PASSPHRASE"] = password_from_env(self.password_env, "borg")
        return env

    def _run(self, *args: str, what: str, timeout: float | None = None, **kw: Any):
        require(self.binary, "borgbackup")
        res = run_child(
            [self.binary, *args], env=self.env(), inherit=BORG_INHERIT, timeout=timeout, **kw
        )
        # borg exit 1 is "warning" (a file vanished, ...): the archive is complete
        check_child(res, what, ok_codes=(0, 1))
        return res

    def exists(self) -> bool:
        require(self.binary, "borgbackup")
        res = run_child(
            [self.binary, "info", "--json"], env=self.env(), inherit=BORG_INHERIT, timeout=120
        )
        return res.returncode == 0

    def locked_out(self) -> str | None:
        require(self.binary, "borgbackup")
        res = run_child([self.binary, "info", "--json"], env=self.env(), timeout=120)
        if (
            res.returncode != 0
            and "passphrase supplied" in (res.stderr or "")
            and "incorrect" in (res.stderr or "")
        ):
            return WRONG_PASSWORD.format(target="borg", repo=redact(self.repository))
        return None

    def init(self) -> None:
        if self.exists():
            return
        self.refuse_locked_out()
        mode = "repokey-blake2" if (self.password_file or self.password_env) else "none"
        self._run("init", "--encryption", mode, what="borg init", timeout=300)

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
        when = as_datetime(time or datetime.now(UTC))
        name = label or self._free_name(archive_name(self.archive, self.job, when))
        # borg expands {placeholders} in comments: double the braces of the JSON
        comment = json.dumps({"host": host or self.host, "tags": [*self.tags, *tags]})
        comment = comment.replace("{", "{{").replace("}", "}}")
        args = ["create", "--json", "--log-json", "--progress", "--list", "--filter=AME"]
        args += ["--timestamp", when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S")]
        args += ["--comment", comment]
        if self.compression:
            args += ["--compression", self.compression]
        for pattern in self.exclude:
            args += ["--exclude", pattern]
        args += [*self.extra_args, f"::{name}", *(paths or ["."])]
        status = {"A": 0, "M": 0, "E": 0}

        def on_err(line: str) -> None:
            if not line.startswith("{"):
                return
            msg = json.loads(line)
            kind = msg.get("type")
            if kind == "file_status":
                status[msg.get("status", "?")] = status.get(msg.get("status", "?"), 0) + 1
            elif kind == "archive_progress" and progress is not None and not msg.get("finished"):
                progress(
                    ProgressUpdate(
                        bytes_done=int(msg.get("original_size", 0)),
                        files_done=int(msg.get("nfiles", 0)),
                        current=msg.get("path"),
                    )
                )

        require(self.binary, "borgbackup")
        res = run_child(
            [self.binary, *args],
            env=self.env(),
            inherit=BORG_INHERIT,
            cwd=source_dir,
            timeout=timeout,
            on_stderr_line=on_err,
        )
        check_child(res, "borg create", ok_codes=(0, 1))
        try:
            data = json.loads(res.stdout)
            stats = data["archive"]["stats"]
        except (ValueError, KeyError):
            raise BackupError(
                redact(f"borg create printed no stats: {res.stderr[-400:]}")
            ) from None
        nfiles = int(stats.get("nfiles", 0))
        changed = status["A"] + status["M"]
        return BackupResult(
            target=self.name,
            snapshot_id=name,
            bytes=int(stats.get("original_size", 0)),
            files=nfiles,
            duration_s=res.duration_s,
            bytes_added=stats.get("deduplicated_size"),
            files_new=status["A"],
            files_changed=status["M"],
            files_unmodified=max(nfiles - changed, 0),
            location=self.repository,
            extra={
                "archive_id": data["archive"].get("id"),
                "compressed_size": stats.get("compressed_size"),
                "errors": status["E"],
                "warning": res.returncode == 1,
            },
        )

    def _free_name(self, name: str) -> str:
        try:
            taken = {s.id for s in self.snapshots()}
        except BackupError:  # no repository yet: `borg create` will say so
            taken = set()
        candidate, n = name, 1
        while candidate in taken:
            n += 1
            candidate = f"{name}-{n}"
        return candidate

    # -- the rest ----------------------------------------------------------------------
    def check(self) -> CheckResult:
        require(self.binary, "borgbackup")
        res = run_child([self.binary, "check"], env=self.env(), inherit=BORG_INHERIT, timeout=None)
        return CheckResult(res.returncode == 0, res.duration_s, (res.stdout + res.stderr)[-2000:])

    def restore(self, snapshot_id: str, dest: Path, paths: Sequence[str] | None = None) -> Path:
        dest.mkdir(parents=True, exist_ok=True)
        patterns = ["pp:" + p.strip("/") for p in paths or ()]
        self._run("extract", f"::{snapshot_id}", *patterns, what="borg extract", cwd=dest)
        return dest

    def snapshots(self) -> list[TargetSnapshot]:
        res = self._run(
            "list", "--json", "--format", "{comment}", "--glob-archives", self.glob,
            what="borg list", timeout=300,
        )  # fmt: skip
        out = []
        for a in json.loads(res.stdout or "{}").get("archives", []):
            t = datetime.fromisoformat(a.get("time") or a["start"]).replace(tzinfo=UTC)
            tags = _comment_tags(a.get("comment") or "")
            out.append(TargetSnapshot(id=a["name"], time=t, tags=tags, source=tagged_source(tags)))
        return out

    def remove(self, backup_ids: Sequence[str]) -> str:
        res = self._run("delete", "::", *backup_ids, what="borg delete", timeout=None)
        compact = self._run("compact", what="borg compact", timeout=None)
        return (res.stderr + compact.stderr)[-1000:]


def _comment_tags(comment: str) -> list[str]:
    """The tags quiesce wrote into an archive's comment (JSON), if it did."""
    try:
        data = json.loads(comment)
    except ValueError:
        return []
    tags = data.get("tags") if isinstance(data, dict) else None
    return [str(t) for t in tags] if isinstance(tags, list) else []


def from_config(cfg: Any, job: str, base_dir: Path | None = None) -> BorgTarget:
    if not cfg.repository:
        raise UsageError("the borg target needs a repository")
    return BorgTarget(
        cfg.repository,
        password_file=cfg.password_file,
        password_env=cfg.password_env,
        job=job,
        host=cfg.host,
        tags=cfg.tags,
        archive=cfg.archive,
        compression=cfg.compression,
        exclude=cfg.exclude,
        extra_args=cfg.extra_args,
        base_dir=base_dir,
    )


__all__ = ["BorgTarget", "archive_name", "from_config"]
