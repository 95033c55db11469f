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
    AlreadyFrozen,
    FreezeBroken,
    FreezeExpired,
    GuardianError,
    NotADirectory,
    NotAMountRoot,
    NotFrozen,
    OutsideGroup,
    PathNotFound,
    PermissionDenied,
    QuiesceError,
    ThawFailed,
    UnsafePlan,
    UnsupportedFilesystem,
    UsageError,
)
from quiesce.sys.lazy import lazy_exports

if TYPE_CHECKING:
    from quiesce.freezing.freezer import Freezer, VolumeResult, Window, freeze
    from quiesce.freezing.plan import Plan, make_plan
    from quiesce.snapshot.consistency import Consistency

__version__ = "0.1.0"

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
        "hooks": ".apps.hooks",
        "job": ".job",
        "providers": ".providers",
        "snapshot": ".snapshot",
        "writers": ".apps.writers",
    },
)

__all__ = [
    "AlreadyFrozen",
    "Consistency",
    "FreezeBroken",
    "FreezeExpired",
    "Freezer",
    "GuardianError",
    "NotADirectory",
    "NotAMountRoot",
    "NotFrozen",
    "OutsideGroup",
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
