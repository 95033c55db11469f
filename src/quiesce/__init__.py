"""quiesce: consistent snapshots of mounted Linux filesystems while they stay in use.

from quiesce import freeze
with freeze(["/srv/db", "/srv/wal"], timeout=10) as window:
    take_my_storage_snapshot()
print(window.duration)
"""

from quiesce.errors import (
    AlreadyFrozen,
    ExitCode,
    FreezeExpired,
    GuardianError,
    NotADirectory,
    NotAMountRoot,
    NotFrozen,
    PathNotFound,
    PermissionDenied,
    QuiesceError,
    ThawFailed,
    UnsafePlan,
    UnsupportedFilesystem,
    UsageError,
)
from quiesce.freezing.freezer import Freezer, VolumeResult, Window, freeze
from quiesce.freezing.plan import Plan, make_plan

__version__ = "0.1.0"

__all__ = [
    "AlreadyFrozen",
    "ExitCode",
    "FreezeExpired",
    "Freezer",
    "GuardianError",
    "NotADirectory",
    "NotAMountRoot",
    "NotFrozen",
    "PathNotFound",
    "PermissionDenied",
    "Plan",
    "QuiesceError",
    "ThawFailed",
    "UnsafePlan",
    "UnsupportedFilesystem",
    "UsageError",
    "VolumeResult",
    "Window",
    "__version__",
    "freeze",
    "make_plan",
]
