"""Where the state directory is, whether root may believe it, and the check that it is
not on a group volume.

The state directory holds manifests, journals and locks: journals name commands that
``quiesce cleanup`` runs as root and paths it removes, manifests name what a provider
deletes. So it is a trust boundary: the directory and every directory above it must be
root's and not writable by group or others (a root-owned sticky parent such as /tmp is
fine), and every file in it is opened with O_NOFOLLOW and checked through its fd (root's,
not group/other-writable) before a byte of it is believed (:mod:`quiesce.host.trust`).

It must never be on a volume that a run freezes or snapshots either: a journal or
manifest write would then hang the run inside its own window, or land in the snapshot.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from quiesce.errors import UnsafePlan, UntrustedState
from quiesce.freezing.plan import GroupMember
from quiesce.host.mounts import MountTable
from quiesce.host.trust import (
    TrustError,
    make_private_dirs,
    open_checked,
    open_trusted,
    read_all,
)

DEFAULT_STATE_DIR = Path("/var/lib/quiesce")
STATE_DIR_ENV = "QUIESCE_STATE_DIR"


def state_dir(explicit: str | Path | None = None) -> Path:
    """The state directory: the argument, else $QUIESCE_STATE_DIR, else /var/lib/quiesce."""
    if explicit:
        return Path(explicit)
    return Path(os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR)


def journal_dir(state: str | Path | None = None) -> Path:
    return state_dir(state) / "journal"


def _hint(culprit: str) -> str:
    return (
        f"make {culprit} root's and not writable by group or others (chown root:root "
        f"{culprit} && chmod go-w {culprit}; remove it if root did not write it), or set "
        f"--state-dir (or ${STATE_DIR_ENV}) to a root-only directory"
    )


def _refuse(e: TrustError, what: str) -> UntrustedState:
    hint = _hint(e.culprit)
    if e.message.endswith(("is a symbolic link", "is not a regular file or directory")):
        hint = (
            f"remove {e.culprit} if root did not make it (quiesce follows no links in the "
            f"state directory), or set --state-dir (or ${STATE_DIR_ENV}) to a root-only "
            "directory"
        )
    return UntrustedState(f"refusing {what}: {e.message}", hint, culprit=e.culprit)


def _check_dir(path: Path, what: str, *, as_parent: bool = False) -> None:
    flags = os.O_RDONLY | os.O_DIRECTORY
    checked = open_checked(path, flags, as_parent=as_parent)
    os.close(checked.fd)
    if checked.problem:
        raise _refuse(TrustError(checked.problem, culprit=checked.culprit), what)


def _make_private_dirs(path: Path) -> None:
    """mkdir the missing components of ``path``, each 0700 (whatever the umask), once the
    directory they go into passed the check (a refusal makes nothing)."""
    _check_dir(_existing_ancestor(path), f"the state directory {path}", as_parent=True)
    make_private_dirs(path)


def checked_state_dir(state: str | Path | None = None, *, create: bool = False) -> Path:
    """The state directory, made (0700) if ``create`` and missing, after checking that
    root may trust it and every directory above it; UntrustedState (exit 2) if not."""
    path = Path(os.path.abspath(state_dir(state)))
    if not os.path.lexists(path):
        if not create:
            return path  # nothing there to believe
        _make_private_dirs(path)
    try:
        _check_dir(path, f"the state directory {path}")
    except OSError as e:
        raise UntrustedState(
            f"cannot use the state directory {path}: {e.strerror}",
            _hint(str(path)),
            culprit=str(path),
        ) from None
    return path


def checked_subdir(state: str | Path | None, name: str, *, create: bool = False) -> Path:
    """``<state>/<name>`` (journal, snapshots, locks), checked like the state directory."""
    base = checked_state_dir(state, create=create)
    sub = base / name
    if not os.path.lexists(sub):
        if not create:
            return sub
        make_private_dirs(sub)
    _check_dir(sub, f"the state directory {base}")
    return sub


def open_state_file(path: Path, flags: int = os.O_RDONLY, mode: int = 0o600) -> int:
    """Open a file of the state directory: O_NOFOLLOW, and refused (UntrustedState) unless
    root's and not writable by group or others, checked through the opened fd."""
    try:
        return open_trusted(path, flags | os.O_CLOEXEC, mode)
    except TrustError as e:
        raise _refuse(e, f"the state file {path}") from None


def read_state_file(path: Path) -> bytes:
    """The content of a state file that passed :func:`open_state_file`."""
    fd = open_state_file(path)
    try:
        return read_all(fd)
    finally:
        os.close(fd)


def _existing_ancestor(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def refuse_state_on_group(state: Path, members: Sequence[GroupMember]) -> None:
    """Refuse a state directory on a volume of the group, before anything is written."""
    vol = MountTable.read().volume_of_path(str(_existing_ancestor(state)))
    for m in members:
        if vol is not None and vol.dev == m.volume.dev:
            raise UnsafePlan(
                f"the state directory {state} is on {m.name}, a volume of the group",
                f"set {STATE_DIR_ENV} (or --state-dir) to a directory on another filesystem",
            )


__all__ = [
    "DEFAULT_STATE_DIR",
    "STATE_DIR_ENV",
    "UntrustedState",
    "checked_state_dir",
    "checked_subdir",
    "journal_dir",
    "open_state_file",
    "read_state_file",
    "refuse_state_on_group",
    "state_dir",
]
