"""One exception tree. Every error carries a one-line message, a hint and an exit code.

The CLI prints ``quiesce: <message>`` and ``hint: <hint>`` and exits with ``exit_code``;
library users catch the typed classes (like psutil's NoSuchProcess / AccessDenied).
"""

from __future__ import annotations

from typing import Any


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
    """Base of every error quiesce raises on purpose."""

    exit_code: int = ExitCode.FAILURE
    default_hint: str = ""

    def __init__(self, message: str, hint: str | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint if hint is not None else self.default_hint
        self.details = details

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
