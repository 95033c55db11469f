"""How each kind of journal entry is undone, shared by a run's own rollback
(:class:`~quiesce.state.journal.Journal`) and ``quiesce cleanup``
(:func:`~quiesce.state.cleanup.cleanup`), so that both remove things the same way.

Every undo first looks whether the thing still exists (and is still ours), so undoing is
idempotent and a half-made entry (recorded, never made) is a no-op. A ``snapshot`` entry
is undone by its provider, a higher layer: the snapshot layer passes that action in
(``undo={"snapshot": ...}``), see :mod:`quiesce.snapshot.cleanup`; a ``repository`` entry
(a backup target a run wrote to: its stale locks) by the backup layer's
:mod:`quiesce.backup.cleanup`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import time
from collections.abc import Callable, Mapping
from typing import Any

from quiesce.errors import JournalError
from quiesce.host import proc
from quiesce.host.mounts import MountTable, loop_backing_file, loop_devices_of
from quiesce.host.trust import TrustError, open_checked

KINDS = ("mount", "loop", "file", "dir", "snapshot", "command", "repository")
UndoFn = Callable[[dict[str, Any]], None]


def _mounts_at(target: str) -> list[tuple[str, str, int]]:
    """(source, dev, mount id) of every mount stacked on ``target``, from mountinfo."""
    table = MountTable.read()
    return [(m.source, m.dev, m.mount_id) for m in table.mounts if m.mount_point == target]


def _parent_problem(target: str) -> str | None:
    """Why the directory holding ``target`` is not root's alone (then another user could
    have swapped what the path names), or None."""
    parent = os.path.dirname(os.path.abspath(target))
    try:
        checked = open_checked(parent, os.O_RDONLY | os.O_DIRECTORY, as_parent=True)
    except (TrustError, OSError) as e:
        return str(e)
    os.close(checked.fd)
    return checked.problem


def _backing(device: str) -> str | None:
    name = loop_backing_file(device)
    return name.removesuffix(" (deleted)") if name else None


def _same_loop(source: str, e: dict[str, Any]) -> bool:
    backing = e.get("backing")
    return bool(backing) and _backing(source) == backing


def _undo_mount(e: dict[str, Any]) -> None:
    """Unmount what the entry made: the mount of the journaled id (with the journaled
    source or device) at the journaled, resolved path. A path whose directory another
    user could change is refused: the name may lead elsewhere now."""
    target = e["target"]
    for attempt in range(30):
        stacked = _mounts_at(target)
        if not stacked:
            return
        source, dev, mnt_id = stacked[-1]
        ours = (
            not e.get("source")
            or source == e["source"]
            or (e.get("dev") and dev == e["dev"])
            or _same_loop(source, e)
        )
        if e.get("mnt_id") is not None and mnt_id != e["mnt_id"]:
            ours = False  # another mount on top of (or in place of) ours
        if not ours:
            if e.get("mnt_id") is not None and any(i == e["mnt_id"] for *_, i in stacked):
                raise JournalError(
                    f"cannot unmount {target}: another mount sits on top of ours "
                    f"(mount id {e['mnt_id']})",
                    f"unmount what was mounted over it (findmnt {target}), then run "
                    "`quiesce cleanup`",
                )
            return  # someone else's mount sits there now: not ours to remove
        if attempt == 0 and (problem := _parent_problem(target)):
            raise JournalError(
                f"refusing to unmount {target}: {problem}",
                f"check what is mounted there (findmnt {target}) and unmount it by hand",
            )
        p = proc.run_tool("umount", target)
        if p.returncode != 0 and attempt >= 20:
            p = proc.run_tool("umount", "-l", target)
        if p.returncode != 0:
            time.sleep(0.1)
    if _mounts_at(target):
        raise JournalError(f"cannot unmount {target}: still busy")


def _undo_loop(e: dict[str, Any]) -> None:
    backing = e["backing"]
    devices = set(loop_devices_of(backing))
    if e.get("device") and _backing(e["device"]) == backing:
        devices.add(e["device"])
    for dev in sorted(devices):
        for _ in range(20):
            p = proc.run_tool("losetup", "-d", dev)
            if p.returncode == 0 or _backing(dev) != backing:
                break
            time.sleep(0.1)
        else:
            raise JournalError(f"cannot detach {dev} ({backing}): {p.stderr.strip()}")


def _undo_file(e: dict[str, Any]) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(e["path"])


def _undo_dir(e: dict[str, Any]) -> None:
    path = e["path"]
    if e.get("recursive"):
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(path)
        return
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError as err:
        # Something else lives there now (or is mounted on it): leave the directory.
        if err.errno not in (errno.ENOTEMPTY, errno.EBUSY):
            raise


def _undo_command(e: dict[str, Any]) -> None:
    argv = [str(a) for a in e["argv"]]
    # a provider's delete command (lvremove) must not die half-way with quiesce
    p = proc.run_tool(*argv, timeout=float(e.get("timeout", 300)), pdeathsig=None)
    if p.returncode != 0 and p.returncode not in e.get("ok_codes", []):
        raise JournalError(f"{argv[0]} exited {p.returncode}: {p.stderr.strip()[:200]}")


ACTIONS: dict[str, UndoFn] = {
    "mount": _undo_mount,
    "loop": _undo_loop,
    "file": _undo_file,
    "dir": _undo_dir,
    "command": _undo_command,
}


def undo_entry(kind: str, fields: dict[str, Any], extra: Mapping[str, UndoFn]) -> None:
    """Undo one entry with the built-in action for ``kind`` or the one passed in."""
    action = extra.get(kind) or ACTIONS.get(kind)
    if action is None:
        if kind in KINDS:
            raise JournalError(
                f"no undo action for a {kind} entry here",
                "run `quiesce cleanup`: it removes snapshots and repository locks that a "
                "killed run left",
            )
        raise JournalError(f"unknown kind {kind!r}")
    action(fields)


def describe(fields: dict[str, Any]) -> str:
    """What an entry is about, for a message."""
    for key in ("target", "device", "backing", "path", "argv"):
        if key in fields:
            return str(fields[key])
    if "snapshot" in fields:
        return str(fields["snapshot"].get("id"))
    if "location" in fields:
        return str(fields["location"])
    return ""


__all__ = ["ACTIONS", "KINDS", "JournalError", "UndoFn", "describe", "undo_entry"]
