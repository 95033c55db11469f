"""Layer snapshot: take a consistent snapshot of a group, and manage what was taken.

- :func:`create` (:mod:`.engine`): plan, provider check and prepare, quiescers, the
  window (freeze, provider snapshot, thaw), release, manifest; unwinds on any failure;
- :mod:`.quiescers`: the protocol hooks and writers implement, and :func:`held`;
- :mod:`.consistency`: the level a snapshot actually achieved, and why;
- :class:`Manifest` (:mod:`.manifest`) and its store in the state directory
  (:func:`list_manifests`, :func:`load`, :func:`save_manifest`);
- :func:`mount`, :func:`umount`, :func:`mounts_of` (:mod:`.mounting`), :func:`delete`
  (:mod:`.deleting`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from quiesce.util.lazy import lazy_exports

if TYPE_CHECKING:
    from quiesce.snapshot.consistency import Claim, Consistency
    from quiesce.snapshot.deleting import delete
    from quiesce.snapshot.engine import create
    from quiesce.snapshot.manifest import MANIFEST_VERSION, Manifest
    from quiesce.snapshot.mounting import mount, mounts_of, umount
    from quiesce.snapshot.quiescers import Quiescer, QuiescerStack, held
    from quiesce.snapshot.store import (
        DEFAULT_STATE_DIR,
        STATE_ENV,
        UnreadableManifest,
        list_manifests,
        load,
        save_manifest,
        scan_manifests,
        state_dir_path,
    )

__getattr__ = lazy_exports(
    __name__,
    {
        "Claim": ".consistency:Claim",
        "Consistency": ".consistency:Consistency",
        "DEFAULT_STATE_DIR": ".store:DEFAULT_STATE_DIR",
        "MANIFEST_VERSION": ".manifest:MANIFEST_VERSION",
        "Manifest": ".manifest:Manifest",
        "Quiescer": ".quiescers:Quiescer",
        "QuiescerStack": ".quiescers:QuiescerStack",
        "STATE_ENV": ".store:STATE_ENV",
        "create": ".engine:create",
        "delete": ".deleting:delete",
        "held": ".quiescers:held",
        "list_manifests": ".store:list_manifests",
        "load": ".store:load",
        "mount": ".mounting:mount",
        "mounts_of": ".mounting:mounts_of",
        "save_manifest": ".store:save_manifest",
        "scan_manifests": ".store:scan_manifests",
        "UnreadableManifest": ".store:UnreadableManifest",
        "state_dir_path": ".store:state_dir_path",
        "umount": ".mounting:umount",
    },
)

__all__ = [
    "DEFAULT_STATE_DIR",
    "MANIFEST_VERSION",
    "STATE_ENV",
    "Claim",
    "Consistency",
    "Manifest",
    "Quiescer",
    "QuiescerStack",
    "UnreadableManifest",
    "create",
    "delete",
    "held",
    "list_manifests",
    "load",
    "mount",
    "mounts_of",
    "save_manifest",
    "scan_manifests",
    "state_dir_path",
    "umount",
]
