"""One exception tree. Every error carries a one-line message, a hint and an exit code.

The CLI prints ``quiesce: <message>`` and ``hint: <hint>`` and exits with ``exit_code``;
library users catch the typed classes (like psutil's NoSuchProcess / AccessDenied).
Every class is defined here and exported from ``quiesce``; what an error knows beyond
its message is a typed attribute (``UnsafePlan.hazards``, ``WriterError.code``,
``ToolFailed.stderr``), never an untyped bag.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

# What errors carry from higher layers, as protocols: errors is the lowest layer and
# imports nothing of quiesce (not even for types: tests/test_architecture.py).


class _WindowLike(Protocol):
    """The freeze window as far as it went (``quiesce.Window``)."""

    @property
    def start_ns(self) -> int | None: ...
    @property
    def end_ns(self) -> int | None: ...

    def to_dict(self) -> dict[str, Any]: ...


class _HazardLike(Protocol):
    """One thing the plan found unsafe (``quiesce.freezing.plan.Hazard``)."""

    @property
    def message(self) -> str: ...


class _ManifestLike(Protocol):
    """The record of a snapshot (``quiesce.snapshot.Manifest``)."""

    @property
    def id(self) -> str: ...

    def to_dict(self) -> dict[str, Any]: ...


class ExitCode:
    """Documented process exit codes (README, "Exit codes")."""

    OK = 0
    FAILURE = 1  # unexpected internal error
    USAGE = 2  # bad path, not a mount root, bad arguments or config
    PERMISSION = 3  # not root / no CAP_SYS_ADMIN
    UNSUPPORTED = 4  # filesystem cannot be frozen (tmpfs, overlay, fuse, ...)
    BUSY = 5  # already frozen by someone else (or a dm/LVM suspend); the job is running
    UNSAFE = 6  # plan refused: would freeze quiesce itself or /
    NOT_FROZEN = 7  # thaw of a filesystem that is not frozen
    THAW_FAILED = 8  # a thaw failed after retries: a volume may still be frozen
    EXPIRED = 9  # the guardian thawed before the controller did (deadline, lease, death)
    GUARDIAN = 10  # the guardian could not be started or reached
    HOOK = 11  # a hook or writer failed or timed out (policy "abort"): nothing kept
    BACKUP = 12  # the snapshot was made, but the backup or its verification failed
    BROKEN = 13  # someone else thawed a freeze of quiesce's during the window: not consistent
    DRILL = 14  # the restore drill failed: an application did not recover or check clean


class QuiesceError(Exception):
    """Base of every error quiesce raises on purpose.

    ``window``: the freeze window as far as it went, when the error ended a freeze (set by
    the freezer on its way out; ``outcomes`` is each volume's state after its rollback).
    ``option``: the provider or command-line option the error is about, if one is."""

    exit_code: int = ExitCode.FAILURE
    default_hint: str = ""

    def __init__(
        self,
        message: str,
        hint: str | None = None,
        *,
        option: str | None = None,
        window: _WindowLike | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint if hint is not None else self.default_hint
        self.option = option
        self.window = window
        self.outcomes: dict[str, str] | None = None

    def add_context(self, note: str) -> None:
        """Append what happened around the error (``"; rolled back: /srv/a"``) to its
        one-line message, keeping its type, hint and exit code."""
        self.message += f"; {note}"
        self.args = (self.message,)

    def to_dict(self) -> dict[str, Any]:
        return {
            "error": type(self).__name__,
            "message": self.message,
            "hint": self.hint,
            "exit_code": self.exit_code,
        }


class UsageError(QuiesceError):
    exit_code = ExitCode.USAGE


class OutsideGroup(UsageError):
    """A writer or hook depends on a file that the group does not capture."""

    default_hint = "add that volume to the job's volumes, or move the file onto the group"


class PathNotFound(UsageError):
    default_hint = "check the spelling; give the directory where the filesystem is mounted"


class NotADirectory(UsageError):
    default_hint = "give the mount point (a directory), not a file inside the filesystem"


class NotAMountRoot(UsageError):
    default_hint = (
        "give the mount point itself (see `findmnt`); freezing a subdirectory would freeze "
        "the filesystem that contains it"
    )


class PermissionDenied(QuiesceError):
    exit_code = ExitCode.PERMISSION
    default_hint = "run as root (freezing needs CAP_SYS_ADMIN in the initial user namespace)"


class UnsupportedFilesystem(QuiesceError):
    exit_code = ExitCode.UNSUPPORTED
    default_hint = "only filesystems with freeze support (ext4, xfs, btrfs, ...) can be frozen"

    def __init__(self, message: str, hint: str | None = None, *, fstype: str | None = None,
                 **kw: Any) -> None:  # fmt: skip
        super().__init__(message, hint, **kw)
        self.fstype = fstype  # the filesystem type that cannot be frozen


class AlreadyFrozen(QuiesceError):
    exit_code = ExitCode.BUSY
    default_hint = (
        "another process (fsfreeze, a backup agent) or a device-mapper/LVM suspend holds it "
        "frozen; quiesce leaves it alone. Thaw it with whatever froze it, then retry"
    )


class NotFrozen(QuiesceError):
    exit_code = ExitCode.NOT_FROZEN
    default_hint = "nothing to do: the filesystem is not frozen"


class UnsafePlan(QuiesceError):
    exit_code = ExitCode.UNSAFE
    default_hint = (
        "pass --allow-self (allow_self=True) only if you know that nothing will write there "
        "while it is frozen"
    )

    def __init__(self, message: str, hint: str | None = None, *,
                 hazards: Sequence[_HazardLike] = (), **kw: Any) -> None:  # fmt: skip
        super().__init__(message, hint, **kw)
        self.hazards = list(hazards)  # what the plan refused


class ThawFailed(QuiesceError):
    exit_code = ExitCode.THAW_FAILED
    default_hint = (
        "the filesystem may still be frozen: check `quiesce status` and run "
        "`quiesce thaw PATH`; as a last resort use SysRq-j (echo j > /proc/sysrq-trigger)"
    )


class FreezeExpired(QuiesceError):
    """The guardian thawed the group before the controller asked it to."""

    exit_code = ExitCode.EXPIRED
    default_hint = (
        "a snapshot finished after the guardian's thaw is not consistent; "
        "raise --timeout or make the snapshot step faster"
    )


class DrillError(QuiesceError):
    """The drill could not be set up (scratch directory, overlay): nothing was started."""

    default_hint = "see the message; `quiesce cleanup` removes what a killed drill left"


class DrillFailed(QuiesceError):
    """The restore drill failed: an application did not recover, or failed its own check,
    on a throwaway copy of the snapshot."""

    exit_code = ExitCode.DRILL
    default_hint = (
        "an application did not recover (or failed its check) on a copy of the snapshot: "
        "the snapshot is not counted as good and nothing was pruned; see the drill's "
        "details (--json), and `quiesce verify --app SNAPSHOT` to try it again"
    )


class AgentError(QuiesceError):
    """The guest agent answered with an error, or did not answer in time."""

    default_hint = (
        "check that qemu-guest-agent runs in the guest (systemctl status qemu-guest-agent) "
        "and that the socket is the guest's org.qemu.guest_agent.0 channel"
    )


class AgentTimeout(AgentError):
    """No answer before the deadline: the agent is hung, stopped or not running."""


class GuestRefused(QuiesceError):
    """A guest's fsfreeze hook failed: the guest did not freeze, nothing was made."""

    exit_code = ExitCode.HOOK
    default_hint = "see the guest's kernel log (journalctl -k | grep quiesce-qga) and its job"


class GuestWindowBroken(QuiesceError):
    """A guest was thawed before the host's thaw: its clone may not be consistent."""

    exit_code = ExitCode.EXPIRED
    default_hint = (
        "the guest's watchdog deadline ([guest] deadline) must exceed the host's timeout; "
        "see the guest's kernel log"
    )


class FreezePending(QuiesceError):
    """A thaw asked while quiesce's FIFREEZE still waits in the kernel for writes in flight:
    nothing can end that wait from user space; the guardian thaws the moment it returns."""

    exit_code = ExitCode.BUSY
    default_hint = (
        "`quiesce status` names the processes that hold writes open on it; ending them "
        "lets the kernel finish the freeze, which the guardian then thaws at once"
    )


class FreezeBroken(QuiesceError):
    """Someone else thawed (and maybe refroze) a freeze of quiesce's during the window:
    whatever was snapshotted is not consistent, and quiesce never thawed that volume."""

    exit_code = ExitCode.BROKEN
    default_hint = (
        "find who runs fsfreeze/FITHAW on these filesystems (quiesce status shows what the "
        "kernel holds now) and keep it away from quiesce's window; then run again"
    )


class GuardianError(QuiesceError):
    exit_code = ExitCode.GUARDIAN
    default_hint = "nothing was frozen; retry, and report a bug if it persists"


class WriterError(QuiesceError):
    """A built-in writer could not quiesce (or release) its application. ``code``: the
    server's error number, when it sent one (MySQL's 1205: lock wait timeout)."""

    exit_code = ExitCode.HOOK
    default_hint = "check that the server is running and that the job's connection settings work"

    def __init__(self, message: str, hint: str | None = None, *, code: int | None = None,
                 **kw: Any) -> None:  # fmt: skip
        super().__init__(message, hint, **kw)
        self.code = code


class _HookResultLike(Protocol):
    """What HookFailed carries (apps.hooks.results.HookResult, a higher layer)."""

    @property
    def name(self) -> str: ...
    @property
    def status(self) -> str: ...


class HookFailed(QuiesceError):
    """A hook or writer failed or timed out and the policy is ``abort``; ``result`` is
    its step (:class:`quiesce.hooks.HookResult`)."""

    exit_code = ExitCode.HOOK
    default_hint = (
        "see the hook's output in the report; to snapshot anyway (only crash-consistent), "
        'set on_hook_failure = "crash-consistent"'
    )

    def __init__(self, message: str, hint: str | None = None, *,
                 result: _HookResultLike | None = None, **kw: Any) -> None:  # fmt: skip
        super().__init__(message, hint, **kw)
        self.result = result


class RunTimeout(QuiesceError):
    """The whole run's time budget (timeouts.run) was used up."""

    exit_code = ExitCode.HOOK
    default_hint = "raise timeouts.run in the job file, or shorten the hooks"


class ToolFailed(QuiesceError):
    """An admin tool or a snapshot command failed; ``stdout``/``stderr``: what it said."""

    def __init__(self, message: str, hint: str | None = None, *, stdout: str = "",
                 stderr: str = "", **kw: Any) -> None:  # fmt: skip
        super().__init__(message, hint, **kw)
        self.stdout, self.stderr = stdout, stderr


class ToolTimedOut(QuiesceError):
    """An admin tool outlived its timeout and was killed (a hung device, a stuck pool)."""

    default_hint = "the storage may be hung: check `dmesg` and the device, then retry"


class TrustError(UsageError):
    """A file or directory that someone other than root can change (exit 2); ``culprit``
    is the path to fix."""

    default_hint = "make it root's and writable only by root"

    def __init__(self, message: str, hint: str | None = None, *, culprit: str = "",
                 **kw: Any) -> None:  # fmt: skip
        super().__init__(message, hint, **kw)
        self.culprit = culprit


class UntrustedState(TrustError):
    """The state directory, or a file in it, could have been written by someone else."""


class JobBusy(QuiesceError):
    """Another run of the same job holds its lock."""

    exit_code = ExitCode.BUSY
    default_hint = "wait for it to finish (`quiesce status` shows what it holds frozen)"


class JournalError(QuiesceError):
    """Something a journal entry names could not be undone."""

    default_hint = "run `quiesce cleanup` again; see the message for what could not be removed"


class ReleaseFailed(QuiesceError):
    """The snapshot was made and kept, but an application was not released cleanly;
    ``manifest`` is the snapshot's record."""

    default_hint = "the snapshot was kept; check the application that was quiesced"

    def __init__(self, message: str, hint: str | None = None, *,
                 manifest: _ManifestLike | None = None, **kw: Any) -> None:  # fmt: skip
        super().__init__(message, hint, **kw)
        self.manifest = manifest


class MountError(QuiesceError):
    """A snapshot could not be mounted read-only."""

    exit_code = ExitCode.BACKUP
    default_hint = "see the kernel log (dmesg) for the filesystem's own message"


class BackupError(QuiesceError):
    """The backup target failed; the snapshot is kept."""

    exit_code = ExitCode.BACKUP
    default_hint = (
        "see the target's message; the snapshot was kept: retry with `quiesce backup JOB.toml`"
    )


class TargetNotInstalled(UsageError):
    """The backup target's program is not installed."""

    default_hint = "run scripts/backup-setup.sh (apt-get install restic borgbackup zstd)"


class VerifyFailed(QuiesceError):
    """The backup does not match the snapshot."""

    exit_code = ExitCode.BACKUP
    default_hint = (
        "the backup does not match the snapshot: the snapshot and older backups were kept; "
        "check the target's storage, then run `quiesce backup JOB.toml` again"
    )


class ProviderOptionsError(UsageError):
    """Options a provider does not take, or values of the wrong type (built by
    ``quiesce.providers.options``). ``keys``: the options at fault; :meth:`for_flags`:
    the same error in the command line's syntax (``--option KEY=VALUE``)."""

    def __init__(self, message: str, hint: str | None = None, *, provider: str = "",
                 keys: Sequence[str] = (), flags: tuple[str, str] | None = None,
                 **kw: Any) -> None:  # fmt: skip
        super().__init__(message, hint, **kw)
        self.provider, self.keys, self._flags = provider, list(keys), flags

    def for_flags(self) -> ProviderOptionsError:
        if self._flags is None:
            return self
        message, hint = self._flags
        return ProviderOptionsError(message, hint, provider=self.provider, keys=self.keys)


class _ProblemLike(Protocol):
    """One problem of a job (quiesce.job.Problem, a higher layer)."""

    @property
    def path(self) -> str: ...
    @property
    def message(self) -> str: ...
    def to_dict(self) -> dict[str, str]: ...


class JobConfigError(UsageError):
    """The job file is invalid or unsafe; ``problems`` lists every reason
    (:class:`quiesce.job.Problem`: the TOML key, what is wrong, what to do)."""

    default_hint = "fix the job file (see docs/jobs.md), then `quiesce check JOB.toml`"

    def __init__(self, file: str, problems: Sequence[_ProblemLike]) -> None:
        n = len(problems)
        super().__init__(f"{file}: {n} problem{'s' if n != 1 else ''}; nothing was run")
        self.problems = list(problems)

    def to_dict(self) -> dict[str, Any]:
        return super().to_dict() | {"problems": [p.to_dict() for p in self.problems]}


class ControllerGone(QuiesceError):
    """ansible-playbook (or whoever started the fleet controller) died: stop, let every
    host thaw."""


class Interrupted(QuiesceError):
    """Ctrl-C (SIGINT): everything quiesce had frozen was thawed first."""

    exit_code = 130
    default_hint = "stopped by Ctrl-C; everything quiesce had frozen was thawed first"
