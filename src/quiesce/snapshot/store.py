"""Manifests in the state directory: ``<state>/snapshots/<id>.json``, written atomically
after the thaw, never on a volume of the group. A manifest names what a provider deletes
(with options), so one is read only after the state directory and the file itself passed
the trust check (root's alone, O_NOFOLLOW; UntrustedState otherwise)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

from quiesce.errors import QuiesceError, UsageError
from quiesce.host.files import write_atomic
from quiesce.snapshot.manifest import Manifest
from quiesce.state.statedir import (
    DEFAULT_STATE_DIR,
    STATE_DIR_ENV,
    checked_subdir,
    read_state_file,
)
from quiesce.state.statedir import state_dir as state_dir_path

STATE_ENV = STATE_DIR_ENV
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def _manifest_dir(state: Path) -> Path:
    return state / "snapshots"


def _manifest_path(state: Path, snap_id: str) -> Path:
    if not _ID_RE.fullmatch(snap_id):
        raise UsageError(f"{snap_id!r} is not a snapshot id", "see `quiesce snapshot list`")
    return _manifest_dir(state) / f"{snap_id}.json"


def _write_manifest(state: Path, man: Manifest) -> Path:
    """Atomically (a private temp file with an unpredictable name, O_EXCL, then rename),
    after the thaw."""
    d = checked_subdir(state, "snapshots", create=True)
    path = d / f"{man.id}.json"
    write_atomic(path, man.to_json() + "\n")
    return path


def save_manifest(state_dir: str | Path | None, man: Manifest) -> Path:
    """Write (or rewrite) a manifest in the state directory, atomically."""
    return _write_manifest(state_dir_path(state_dir), man)


@dataclass(frozen=True)
class UnreadableManifest:
    """A manifest file that could not be read or parsed: its snapshot may still exist,
    so it is reported (``snapshot list``, ``cleanup``), never silently dropped."""

    path: Path
    reason: str

    def __str__(self) -> str:
        return f"manifest {self.path} is unreadable ({self.reason})"

    def to_dict(self) -> dict[str, str]:
        return {"path": str(self.path), "reason": self.reason}


class ManifestScan(NamedTuple):
    manifests: list[Manifest]  # oldest first
    unreadable: list[UnreadableManifest]


def scan_manifests(state_dir: str | Path | None = None) -> ManifestScan:
    """Every manifest in the state directory, oldest first, and the files that are not
    readable manifests (a truncated or hand-edited file, a newer version's)."""
    d = checked_subdir(state_dir, "snapshots")
    out, bad = [], []
    for p in sorted(d.glob("*.json")) if d.is_dir() else []:
        try:
            out.append(Manifest.from_json(read_state_file(p).decode()))
        except FileNotFoundError:
            continue  # deleted meanwhile
        except (OSError, ValueError, TypeError, KeyError) as e:
            bad.append(UnreadableManifest(p, f"{type(e).__name__}: {e}"))
    return ManifestScan(sorted(out, key=lambda m: (created_at(m), m.id)), bad)


def list_manifests(state_dir: str | Path | None = None) -> list[Manifest]:
    """Every readable manifest in the state directory, oldest first
    (:func:`scan_manifests` also names the unreadable ones)."""
    return scan_manifests(state_dir).manifests


def load(snap_id: str, state_dir: str | Path | None = None) -> Manifest:
    state = state_dir_path(state_dir)
    path = _manifest_path(state, snap_id)
    checked_subdir(state, "snapshots")
    try:
        return Manifest.from_json(read_state_file(path).decode())
    except FileNotFoundError:
        raise UsageError(
            f"no snapshot {snap_id!r} in {_manifest_dir(state)}", "see `quiesce snapshot list`"
        ) from None
    except (ValueError, TypeError, KeyError) as e:  # UnicodeDecodeError is a ValueError
        raise QuiesceError(f"manifest {path} is unreadable: {e}") from None


def resolve_id(
    prefix: str, state_dir: str | Path | None = None, manifests: list[Manifest] | None = None
) -> str:
    """The snapshot id that ``prefix`` names: the id itself, or the one id it begins.
    An ambiguous prefix is a UsageError (exit 2) that lists the candidates."""
    if _ID_RE.fullmatch(prefix) and os.path.lexists(
        _manifest_path(state_dir_path(state_dir), prefix)
    ):
        return prefix  # the id itself (load tells if its manifest is unreadable)
    mans = list_manifests(state_dir) if manifests is None else manifests
    ids = [m.id for m in mans]
    if prefix in ids:
        return prefix
    found = [i for i in ids if prefix and i.startswith(prefix)]
    if len(found) == 1:
        return found[0]
    if found:
        raise UsageError(
            f"snapshot id {prefix!r} is ambiguous: it begins {', '.join(found)}",
            "give more of the id (see `quiesce snapshot list`)",
        )
    raise UsageError(
        f"no snapshot {prefix!r} in {_manifest_dir(state_dir_path(state_dir))}",
        "see `quiesce snapshot list`",
    )


def created_at(man: Manifest) -> datetime:
    """When a snapshot was made, comparable across the manifest's formats (seconds, then
    milliseconds since the same second's runs had to be ordered)."""
    try:
        return datetime.fromisoformat(str(man.created).replace("Z", "+00:00"))
    except ValueError:
        return datetime.min.replace(tzinfo=UTC)


# -- create ------------------------------------------------------------------------------
def _unique_id(job: str, state: Path, now: datetime) -> str:
    base = f"{job}-{now.strftime('%Y%m%dT%H%M%SZ')}"
    d = _manifest_dir(state)
    snap_id, n = base, 1
    while (d / f"{snap_id}.json").exists():
        n += 1
        snap_id = f"{base}-{n}"
    return snap_id


__all__ = [
    "DEFAULT_STATE_DIR",
    "STATE_ENV",
    "ManifestScan",
    "UnreadableManifest",
    "list_manifests",
    "load",
    "resolve_id",
    "save_manifest",
    "scan_manifests",
    "state_dir_path",
]
