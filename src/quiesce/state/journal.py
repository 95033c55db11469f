"""The cleanup journal: what a run made, written down before it was made.

Every mount, loop device, clone file, directory or snapshot a run creates is appended
to ``<state_dir>/journal/<run>.jsonl`` (one JSON object a line, fsync'd) *before* the
thing exists, and marked ``done`` when it is gone again (or ``commit``-ted when the run
means to keep it, like a finished snapshot). A run holds an exclusive ``flock`` on its
journal for as long as it lives; the kernel drops it when the process dies, even by
SIGKILL. :func:`cleanup` takes every journal whose lock it can get (its run is dead) and
undoes the open entries, newest first. Every undo first looks whether the thing still
exists, so cleanup is idempotent and a half-made entry (recorded, never made) is a no-op.

The state directory must never be on a volume that a run freezes: a journal write
would then hang the run inside its own window (see :func:`check_state_dir`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quiesce.errors import QuiesceError, UnsafePlan
from quiesce.sys import proc
from quiesce.sys.kernel import fsync_dir as _fsync_dir

DEFAULT_STATE_DIR = Path("/var/lib/quiesce")
STATE_DIR_ENV = "QUIESCE_STATE_DIR"
KINDS = ("mount", "loop", "file", "dir", "snapshot", "command")


def state_dir(explicit: str | Path | None = None) -> Path:
    """The state directory: the argument, else $QUIESCE_STATE_DIR, else /var/lib/quiesce."""
    if explicit:
        return Path(explicit)
    return Path(os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR)


def journal_dir(state: str | Path | None = None) -> Path:
    return state_dir(state) / "journal"


def check_state_dir(state: str | Path, devs: Collection[str]) -> None:
    """Refuse a state directory on a volume of the group (``major:minor`` ids)."""
    from quiesce.sys.mounts import MountTable

    path = Path(state)
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    vol = MountTable.read().volume_of_path(str(probe))
    if vol is not None and vol.dev in set(devs):
        raise UnsafePlan(
            f"the state directory {path} is on {vol.mount_point}, a volume this run freezes",
            "set state_dir (or $QUIESCE_STATE_DIR) to a directory on another filesystem",
        )


class JournalError(QuiesceError):
    default_hint = "run `quiesce cleanup` again; see the message for what could not be removed"


# ---------------------------------------------------------------------------- undo actions


def _run(*cmd: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return proc.run_tool(*cmd, timeout=timeout)


def _mounts_at(target: str) -> list[tuple[str, str]]:
    """(source, dev) of every mount stacked on ``target``, read from mountinfo."""
    from quiesce.sys.mounts import MountTable

    table = MountTable.read()
    return [(m.source, m.dev) for m in table.mounts if m.mount_point == target]


def loop_devices_of(backing: str) -> list[str]:
    """Loop devices whose backing file is ``backing`` (also when it has been deleted)."""
    found = []
    want = os.path.realpath(backing) if os.path.exists(backing) else backing
    for sysdir in sorted(Path("/sys/block").glob("loop*")):
        try:
            name = (sysdir / "loop" / "backing_file").read_text().strip()
        except OSError:
            continue
        name = name.removesuffix(" (deleted)")
        if name in (backing, want):
            found.append(f"/dev/{sysdir.name}")
    return found


def loop_backing(device: str) -> str | None:
    try:
        name = (Path("/sys/block") / Path(device).name / "loop" / "backing_file").read_text()
    except OSError:
        return None
    return name.strip().removesuffix(" (deleted)")


def _undo_mount(e: dict[str, Any]) -> None:
    target = e["target"]
    for attempt in range(30):
        stacked = _mounts_at(target)
        if not stacked:
            return
        source, dev = stacked[-1]
        ours = (
            not e.get("source")
            or source == e["source"]
            or (e.get("dev") and dev == e["dev"])
            or _same_loop(source, e)
        )
        if not ours:
            return  # someone else's mount sits there now: not ours to remove
        p = _run("umount", target)
        if p.returncode != 0 and attempt >= 20:
            p = _run("umount", "-l", target)
        if p.returncode != 0:
            time.sleep(0.1)
    if _mounts_at(target):
        raise JournalError(f"cannot unmount {target}: still busy")


def _same_loop(source: str, e: dict[str, Any]) -> bool:
    backing = e.get("backing")
    return bool(backing) and loop_backing(source) == backing


def _undo_loop(e: dict[str, Any]) -> None:
    backing = e["backing"]
    devices = set(loop_devices_of(backing))
    if e.get("device") and loop_backing(e["device"]) == backing:
        devices.add(e["device"])
    for dev in sorted(devices):
        for _ in range(20):
            p = _run("losetup", "-d", dev)
            if p.returncode == 0 or loop_backing(dev) != backing:
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


def _undo_snapshot(e: dict[str, Any]) -> None:
    from quiesce.providers.base import Snapshot
    from quiesce.providers.registry import get_provider

    snap = Snapshot(**e["snapshot"])
    provider = get_provider(e["provider"])(**e.get("options", {}))
    provider.delete(snap)


def _undo_command(e: dict[str, Any]) -> None:
    argv = [str(a) for a in e["argv"]]
    p = _run(*argv, timeout=float(e.get("timeout", 300)))
    if p.returncode != 0 and p.returncode not in e.get("ok_codes", []):
        raise JournalError(f"{argv[0]} exited {p.returncode}: {p.stderr.strip()[:200]}")


UNDO: dict[str, Callable[[dict[str, Any]], None]] = {
    "mount": _undo_mount,
    "loop": _undo_loop,
    "file": _undo_file,
    "dir": _undo_dir,
    "snapshot": _undo_snapshot,
    "command": _undo_command,
}


# ---------------------------------------------------------------------------- the journal


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


@dataclass
class Entry:
    id: int
    kind: str
    fields: dict[str, Any]
    state: str = "open"  # open | done | committed


@dataclass
class Journal:
    """One run's journal. Open it with :meth:`open`; use it as a context manager."""

    path: Path
    run: str
    fd: int
    entries: dict[int, Entry] = field(default_factory=dict)
    _next: int = 1

    @classmethod
    def open(cls, state: str | Path | None = None, *, job: str = "", run: str | None = None):
        """Create and lock a fresh journal for this process."""
        directory = journal_dir(state)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        run = run or f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:8]}"
        path = directory / f"{run}.jsonl"
        # Locked under a name cleanup ignores, then renamed: cleanup never sees it unlocked.
        tmp = directory / f".{run}.new"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        j = cls(path=path, run=run, fd=fd)
        j._append(
            {
                "op": "begin",
                "run": run,
                "job": job,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "boot": _boot_id(),
                "t": time.time(),
            }
        )
        os.rename(tmp, path)
        _fsync_dir(directory)
        return j

    def _append(self, obj: dict[str, Any]) -> None:
        data = (json.dumps(obj, separators=(",", ":"), default=str) + "\n").encode()
        os.write(self.fd, data)
        os.fsync(self.fd)

    def intent(self, kind: str, **fields: Any) -> int:
        """Record that ``kind`` is about to be made. Call this *before* making it."""
        if kind not in UNDO:
            raise ValueError(f"unknown journal kind {kind!r}")
        eid = self._next
        self._next += 1
        self._append({"op": "intent", "id": eid, "kind": kind, "t": time.time(), **fields})
        self.entries[eid] = Entry(eid, kind, dict(fields))
        return eid

    def update(self, eid: int, **fields: Any) -> None:
        """Add what became known when it was made (the loop device's name)."""
        self._append({"op": "update", "id": eid, **fields})
        self.entries[eid].fields.update(fields)

    def done(self, eid: int) -> None:
        """It is gone again (removed by the run itself)."""
        self._append({"op": "done", "id": eid})
        self.entries[eid].state = "done"

    def commit(self, eid: int) -> None:
        """The run keeps it (a finished snapshot): cleanup must leave it alone."""
        self._append({"op": "commit", "id": eid})
        self.entries[eid].state = "committed"

    def undo(self, eid: int) -> None:
        """Remove it now (the same code cleanup uses) and mark it done."""
        entry = self.entries[eid]
        if entry.state != "open":
            return
        UNDO[entry.kind](entry.fields)
        self.done(eid)

    def open_entries(self) -> list[Entry]:
        return [e for e in self.entries.values() if e.state == "open"]

    def rollback(self) -> list[str]:
        """Undo every open entry, newest first; returns the errors (keeps going past them)."""
        errors = []
        for entry in sorted(self.open_entries(), key=lambda e: e.id, reverse=True):
            try:
                self.undo(entry.id)
            except (QuiesceError, OSError, subprocess.SubprocessError) as e:
                errors.append(f"{entry.kind} {_describe(entry.fields)}: {e}")
        return errors

    def close(self) -> list[str]:
        """Roll back what is still open; remove the journal if nothing is left."""
        if self.fd < 0:
            return []
        errors = self.rollback()
        if not errors:
            self._append({"op": "end"})
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        os.close(self.fd)
        self.fd = -1
        return errors

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        errors = self.close()
        if errors and exc[0] is None:
            raise JournalError("cleanup after the run failed: " + "; ".join(errors))


def _describe(fields: dict[str, Any]) -> str:
    for key in ("target", "device", "backing", "path", "argv"):
        if key in fields:
            return str(fields[key])
    if "snapshot" in fields:
        return str(fields["snapshot"].get("id"))
    return ""


def parse(path: Path) -> tuple[dict[str, Any], dict[int, Entry]]:
    """Read a journal file: its header and entries (a torn last line is ignored)."""
    header: dict[str, Any] = {}
    entries: dict[int, Entry] = {}
    with open(path, "rb") as f:
        for raw in f:
            try:
                rec = json.loads(raw)
            except ValueError:
                continue  # a torn write at the moment of the crash
            op = rec.pop("op", None)
            if op == "begin":
                header = rec
            elif op == "intent":
                eid, kind = rec.pop("id"), rec.pop("kind")
                rec.pop("t", None)
                entries[eid] = Entry(eid, kind, rec)
            elif op == "update" and rec.get("id") in entries:
                eid = rec.pop("id")
                entries[eid].fields.update(rec)
            elif op in ("done", "commit") and rec.get("id") in entries:
                entries[rec["id"]].state = "done" if op == "done" else "committed"
    return header, entries


# ---------------------------------------------------------------------------- cleanup


@dataclass
class CleanupReport:
    journals: list[str] = field(default_factory=list)  # dead runs looked at
    removed: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    skipped_live: list[str] = field(default_factory=list)  # runs still alive

    def to_dict(self) -> dict[str, Any]:
        return {
            "journals": self.journals,
            "removed": self.removed,
            "errors": self.errors,
            "skipped_live": self.skipped_live,
        }


@contextlib.contextmanager
def _lock_if_dead(path: Path) -> Iterator[int | None]:
    """Yield an fd with the journal's lock if its run is dead, else None."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    except FileNotFoundError:
        yield None
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield None
            return
        yield fd
    finally:
        os.close(fd)


def cleanup(state: str | Path | None = None, *, dry_run: bool = False) -> CleanupReport:
    """Undo what crashed runs left behind, newest journal and newest entry first.

    Runs that still hold their journal's lock are left alone. Safe to run any number of
    times, also concurrently with new runs.
    """
    directory = journal_dir(state)
    report = CleanupReport()
    if not directory.is_dir():
        return report
    paths = sorted(directory.glob("*.jsonl"), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in paths:
        with _lock_if_dead(path) as fd:
            if fd is None:
                if path.exists():
                    report.skipped_live.append(path.stem)
                continue
            report.journals.append(path.stem)
            _header, entries = parse(path)
            failed = False
            for entry in sorted(entries.values(), key=lambda e: e.id, reverse=True):
                if entry.state != "open":
                    continue
                what = {"run": path.stem, "kind": entry.kind, **entry.fields}
                if dry_run:
                    report.removed.append(what)
                    continue
                try:
                    if entry.kind not in UNDO:
                        raise JournalError(f"unknown kind {entry.kind!r}")
                    UNDO[entry.kind](entry.fields)
                except (QuiesceError, OSError, subprocess.SubprocessError, TypeError) as e:
                    failed = True
                    report.errors.append(
                        f"{path.stem}: {entry.kind} {_describe(entry.fields)}: {e}"
                    )
                    continue
                os.write(fd, (json.dumps({"op": "done", "id": entry.id}) + "\n").encode())
                os.fsync(fd)
                report.removed.append(what)
            if not failed and not dry_run:
                path.unlink()
    return report


def held_snapshot_ids(state: str | Path | None = None) -> set[str]:
    """Snapshot ids that a live run holds (is reading): retention must not delete them."""
    held: set[str] = set()
    directory = journal_dir(state)
    if not directory.is_dir():
        return held
    for path in directory.glob("*.jsonl"):
        with _lock_if_dead(path) as fd:
            if fd is not None:
                continue  # dead run: its holds are void
        with contextlib.suppress(OSError):
            _h, entries = parse(path)
            for e in entries.values():
                if e.state == "open" and e.fields.get("holds"):
                    held.add(str(e.fields["holds"]))
    return held


__all__ = [
    "DEFAULT_STATE_DIR",
    "CleanupReport",
    "Journal",
    "JournalError",
    "check_state_dir",
    "cleanup",
    "held_snapshot_ids",
    "journal_dir",
    "loop_devices_of",
    "parse",
    "state_dir",
]
