"""quiesce: consistent snapshots of mounted Linux filesystems while they stay in use.

::

    from quiesce import freeze

    with freeze(["/srv/db", "/srv/wal"], timeout=10) as window:
        take_my_storage_snapshot()
    print(window.duration)

The rest of the product, each a package of its layer (docs/architecture.md):
``quiesce.snapshot`` (create, list, mount, delete), ``quiesce.providers`` (typed
provider options), ``quiesce.backup`` (targets, backup, verify, restore),
``quiesce.writers`` and ``quiesce.hooks`` (quiescing applications), ``quiesce.job``
(a job from TOML or built in Python, run). Names are imported on first use, so
``import quiesce`` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from quiesce.errors import (
    AgentError,
    AgentTimeout,
    AlreadyFrozen,
    BackupError,
    ControllerGone,
    DrillError,
    DrillFailed,
    ExitCode,
    FreezeBroken,
    FreezeExpired,
    FreezePending,
    GuardianError,
    GuestRefused,
    GuestWindowBroken,
    HookFailed,
    Interrupted,
    JobBusy,
    JobConfigError,
    JournalError,
    MountError,
    NotADirectory,
    NotAMountRoot,
    NotFrozen,
    OutsideGroup,
    PathNotFound,
    PermissionDenied,
    ProviderOptionsError,
    QuiesceError,
    ReleaseFailed,
    RunTimeout,
    TargetNotInstalled,
    ThawFailed,
    ToolFailed,
    ToolTimedOut,
    TrustError,
    UnsafePlan,
    UnsupportedFilesystem,
    UntrustedState,
    UsageError,
    VerifyFailed,
    WriterError,
)
from quiesce.util.lazy import lazy_exports

if TYPE_CHECKING:
    from quiesce.freezing.freezer import Freezer, VolumeResult, Window, freeze
    from quiesce.freezing.plan import Plan, make_plan
    from quiesce.snapshot.consistency import Consistency

__version__ = "0.1.0"

_PACKAGES = {"backup", "hooks", "job", "providers", "snapshot", "writers"}

__getattr__ = lazy_exports(
    __name__,
    {
        "Consistency": ".snapshot.consistency:Consistency",
        "Freezer": ".freezing.freezer:Freezer",
        "Plan": ".freezing.plan:Plan",
        "VolumeResult": ".freezing.freezer:VolumeResult",
        "Window": ".freezing.freezer:Window",
        "freeze": ".freezing.freezer:freeze",
        "make_plan": ".freezing.plan:make_plan",
        # the product's packages, as namespaces
        "backup": ".backup",
        "hooks": ".hooks",
        "job": ".job",
        "providers": ".providers",
        "snapshot": ".snapshot",
        "writers": ".writers",
    },
)

__all__ = [
    "AgentError",
    "AgentTimeout",
    "AlreadyFrozen",
    "BackupError",
    "Consistency",
    "ControllerGone",
    "DrillError",
    "DrillFailed",
    "ExitCode",
    "FreezeBroken",
    "FreezeExpired",
    "FreezePending",
    "Freezer",
    "GuardianError",
    "GuestRefused",
    "GuestWindowBroken",
    "HookFailed",
    "Interrupted",
    "JobBusy",
    "JobConfigError",
    "JournalError",
    "MountError",
    "NotADirectory",
    "NotAMountRoot",
    "NotFrozen",
    "OutsideGroup",
    "PathNotFound",
    "PermissionDenied",
    "Plan",
    "ProviderOptionsError",
    "QuiesceError",
    "ReleaseFailed",
    "RunTimeout",
    "TargetNotInstalled",
    "ThawFailed",
    "ToolFailed",
    "ToolTimedOut",
    "TrustError",
    "UnsafePlan",
    "UnsupportedFilesystem",
    "UntrustedState",
    "UsageError",
    "VerifyFailed",
    "VolumeResult",
    "Window",
    "WriterError",
    "__version__",
    "freeze",
    "make_plan",
]


def __dir__() -> list[str]:
    """The public API, lazy names included (``dir(quiesce)`` lists ``freeze``), and the
    product's packages (modules, so not in ``__all__``)."""
    return sorted(set(__all__) | set(globals()) | _PACKAGES)
