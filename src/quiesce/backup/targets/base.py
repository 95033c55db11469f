"""The target interface, its results, and how the targets run their children.

A target takes a directory (the job's stable mount root) and the names of the volumes
mounted under it, and stores one backup of all of them: one restic snapshot, one borg
archive, one tar stream. Secrets reach the child only through its environment (never
its argv, which ``ps`` shows to everyone), and no message ever contains them.
"""

from __future__ import annotations

import os
import signal
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

from quiesce.errors import BackupError, TargetNotInstalled, UsageError
from quiesce.host import proc
from quiesce.state.retention import RetentionPolicy, decide
from quiesce.util.redact import (
    redact,
    redact_data,
    register_secret,
    register_secret_file,
)

WRONG_PASSWORD = "a {target} repository exists at {repo} and the password does not open it"


@dataclass
class ProgressUpdate:
    """One progress sample, whatever the target reports (fields it lacks stay None)."""

    bytes_done: int = 0
    total_bytes: int | None = None
    files_done: int = 0
    total_files: int | None = None
    eta_s: float | None = None
    current: str | None = None


ProgressFn = Callable[[ProgressUpdate], None]


@dataclass
class BackupResult:
    """One backup: what the target stored and how long it took."""

    target: str
    snapshot_id: str  # restic snapshot id, borg archive name, tar file name
    bytes: int  # bytes of file content the target processed
    files: int
    duration_s: float
    bytes_added: int | None = None  # new data stored in the repository (after dedup)
    files_new: int | None = None
    files_changed: int | None = None
    files_unmodified: int | None = None  # not reread thanks to the stable path
    location: str | None = None  # where the backup is (repo, file); redacted
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.location = redact(self.location) if self.location else self.location
        self.extra = redact_data(self.extra)

    @property
    def throughput(self) -> float:
        return self.bytes / self.duration_s if self.duration_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"throughput_bps": round(self.throughput, 1)}


@dataclass
class CheckResult:
    ok: bool
    duration_s: float
    output: str = ""  # the target's own words: redacted (it may echo the repository)

    def __post_init__(self) -> None:
        self.output = redact(self.output)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PruneResult:
    kept: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    duration_s: float = 0.0
    output: str = ""  # redacted, like CheckResult's

    def __post_init__(self) -> None:
        self.output = redact(self.output)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TargetSnapshot:
    """One backup as the target lists it."""

    id: str
    time: datetime
    paths: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    host: str | None = None
    source: str | None = None  # the quiesce snapshot it was made from, as source_key says


SNAPSHOT_TAG = "quiesce-snapshot="  # the tag (restic, borg) naming the backed-up manifest


def tagged_source(tags: Sequence[str]) -> str | None:
    """The manifest id in a ``quiesce-snapshot=ID`` tag, if there is one."""
    return next((t[len(SNAPSHOT_TAG) :] for t in tags if t.startswith(SNAPSHOT_TAG)), None)


class Target(ABC):
    """restic, borg or tar: one backup per call, stored where the job says."""

    name: ClassVar[str]

    @property
    def lists_backups(self) -> bool:
        """Whether ``snapshots()`` can list what the target holds (a tar stream sent to a
        command cannot be listed)."""
        return True

    @abstractmethod
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
        """Back up ``paths`` (names relative to ``source_dir``; default: all of it)."""

    @abstractmethod
    def check(self) -> CheckResult:
        """The target's own integrity check (restic check, borg check, sha256 + decode)."""

    @abstractmethod
    def restore(self, snapshot_id: str, dest: Path, paths: Sequence[str] | None = None) -> Path:
        """Restore into ``dest`` so that ``dest/<rel>`` is ``source_dir/<rel>`` of the backup.

        ``paths`` are names relative to the backup's ``source_dir``. Returns ``dest``.
        """

    @abstractmethod
    def snapshots(self) -> list[TargetSnapshot]:
        """The backups this target holds for this job."""

    def source_key(self, snapshot_id: str, when: datetime) -> str:
        """What ``TargetSnapshot.source`` is for backups of quiesce snapshot ``snapshot_id``
        (taken at ``when``): the id itself where the target keeps tags."""
        return snapshot_id

    def backups_of(self, snapshot_id: str, when: datetime) -> list[TargetSnapshot]:
        """The backups the target already holds of one quiesce snapshot."""
        key = self.source_key(snapshot_id, when)
        return [s for s in self.snapshots() if s.source == key]

    def forget_prune(self, policy: RetentionPolicy, keep: Collection[str] = ()) -> PruneResult:
        """Apply the retention policy to the target's backups and free their space.

        The policy counts quiesce snapshots, not archives: every backup of one snapshot
        (``quiesce backup`` run twice, ``--force``) is kept or removed with it, so a
        duplicate never pushes another snapshot out of ``keep_last``. ``keep`` are
        source keys never removed (what the calling command just made or reported).
        A backup without a source (made by hand) counts as a snapshot of its own."""
        t0 = time.monotonic()
        snaps = self.snapshots()
        groups: dict[str, list[TargetSnapshot]] = {}
        for snap in snaps:
            groups.setdefault(snap.source or f"backup:{snap.id}", []).append(snap)
        times = {k: max(s.time for s in v) for k, v in groups.items()}
        decision = decide(times, policy, held=keep)
        removed = [s.id for k in decision.delete for s in groups[k]]
        output = self.remove(removed) if removed else ""
        kept = [s.id for k in decision.keep for s in groups[k]]
        return PruneResult(kept, removed, time.monotonic() - t0, output)

    @abstractmethod
    def remove(self, backup_ids: Sequence[str]) -> str:
        """Delete these backups and free their space; returns the target's own words."""

    def init(self) -> None:
        """Create the repository if it does not exist yet (restic init, borg init)."""

    def exists(self) -> bool:
        return True

    def locked_out(self) -> str | None:
        """When a repository is there but the job's password does not open it, a
        sentence saying so (init must never be tried on it); else None."""
        return None

    def refuse_locked_out(self) -> None:
        """Raise what :meth:`locked_out` says, as the run's error and `check`'s."""
        said = self.locked_out()
        if said:
            raise BackupError(
                said,
                "fix password_file / password_env (init = true never touches an existing "
                "repository)",
            )

    def remove_stale_locks(self) -> list[str]:
        """Remove the repository locks that a process of this host left when it died
        (SIGKILLed mid-backup); returns what was removed. Locks of live processes and of
        other hosts stay."""
        return []


# ---------------------------------------------------------------------------- children


def require(binary: str, package: str) -> str:
    import shutil

    path = shutil.which(binary)
    if path is None:
        raise TargetNotInstalled(
            f"{binary} is not installed", f"apt-get install {package} (or scripts/backup-setup.sh)"
        )
    return path


def password_file_path(password_file: str, what: str) -> Path:
    """The password file named in the job, which the child will read itself. Its
    content is remembered as a secret: a child that echoes it is scrubbed from reports."""
    p = Path(password_file)
    if not p.is_file():
        raise UsageError(
            f"backup.password_file: the {what} password file {password_file} does not exist",
            "create it (mode 600, owned by root) or name another in the job",
        )
    register_secret_file(p)
    return p


def password_from_env(password_env: str, what: str) -> str:
    """The value of the variable named in the job (never put in an argv, message or log)."""
    value = os.environ.get(password_env)
    if value is None:
        raise UsageError(
            f"backup.password_env: the environment variable {password_env} (the {what} "
            "password) is not set",
            "export it for quiesce (systemd: EnvironmentFile= or LoadCredential=)",
        )
    register_secret(value)
    return value


def secret_env(
    *,
    password_file: str | None,
    password_env: str | None,
    file_var: str,
    value_var: str,
    what: str,
) -> dict[str, str]:
    """The child's environment entries for a password named in the job: the file's path
    as ``file_var``, or the named variable's value as ``value_var``."""
    if password_file:
        return {file_var: str(password_file_path(password_file, what))}
    if password_env:
        return {value_var: password_from_env(password_env, what)}
    return {}


# What a backup tool inherits from quiesce's environment beyond the minimal one: its own
# settings and the credentials of the backends it talks to (S3, B2, Azure, GCS, Swift,
# rclone), the ssh agent for sftp/ssh repositories and the proxy settings. Nothing else
# (a writer's password variable, another tool's settings) reaches it.
_BACKENDS = ("AWS_", "B2_", "AZURE_", "GOOGLE_", "OS_", "ST_", "RCLONE_", "SSH_AUTH_SOCK")
_PROXIES = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy")
RESTIC_INHERIT = ("RESTIC_", *_BACKENDS, *_PROXIES)
BORG_INHERIT = ("BORG_", "SSH_AUTH_SOCK", *_PROXIES)

# A target's child gets its stop signal on a timeout or an interrupt (then SIGKILL after
# the grace) and also when quiesce dies (PR_SET_PDEATHSIG): it is the signal on which the
# tool releases its repository lock (SIGKILL leaves it locked). borg: SIGTERM (on SIGINT
# it first finishes the file it reads). restic passes SIGINT (0.14 leaves its lock on SIGTERM).
KILL_GRACE = 5.0
STOP_SIGNAL = signal.SIGTERM


@dataclass
class ChildResult:
    returncode: int
    stdout: str
    stderr: str
    duration_s: float
    timed_out: bool = False


def _tail(text: str, limit: int = 2000) -> str:
    text = text.strip()
    return text if len(text) <= limit else "[...] " + text[-limit:]


def run_child(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    timeout: float | None = None,
    on_stdout_line: Callable[[str], None] | None = None,
    on_stderr_line: Callable[[str], None] | None = None,
    stop_signal: int = STOP_SIGNAL,
    inherit: Sequence[str] = (),
) -> ChildResult:
    """A target's child (:func:`proc.run_streaming`): the minimal environment
    (:func:`proc.child_env`) with the variables of the ``inherit`` prefixes (the tool's
    own settings, its backends' credentials) and ``env`` (repository, password file);
    lines handed to the callbacks as they come; TargetNotInstalled if it cannot be found.
    Its cwd is ours unless given (as it always was: a relative repository path keeps
    working)."""
    try:
        done = proc.run_streaming(
            argv, timeout=timeout, env=proc.child_env(env, inherit=inherit), cwd=cwd,
            on_stdout_line=on_stdout_line, on_stderr_line=on_stderr_line,
            grace=KILL_GRACE, stop_signal=stop_signal, pdeathsig=stop_signal,
        )  # fmt: skip
    except FileNotFoundError:
        raise TargetNotInstalled(f"{argv[0]} is not installed") from None
    return ChildResult(
        done.returncode,
        done.stdout.decode(errors="replace"),
        done.stderr.decode(errors="replace"),
        done.duration_s,
        done.timed_out,
    )


def check_child(res: ChildResult, what: str, ok_codes: Sequence[int] = (0,)) -> None:
    if res.timed_out:
        raise BackupError(
            f"{what} did not finish within its timeout and was killed",
            "raise [backup] timeout, or check why the target is slow",
        )
    if res.returncode not in ok_codes:
        raise BackupError(
            redact(f"{what} failed (exit {res.returncode}): {_tail(res.stderr, 600)}")
        )


__all__ = [
    "BORG_INHERIT",
    "RESTIC_INHERIT",
    "BackupError",
    "BackupResult",
    "CheckResult",
    "ChildResult",
    "ProgressFn",
    "ProgressUpdate",
    "PruneResult",
    "Target",
    "TargetNotInstalled",
    "TargetSnapshot",
    "check_child",
    "require",
    "run_child",
    "secret_env",
]
