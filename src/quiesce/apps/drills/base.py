"""What every restore drill shares: the results, the throwaway writable copy, the
application server run as its own user.

The copy is an overlay: the snapshot's read-only mount is the lower layer, the upper
layer is a scratch directory that must not lie on a volume of the group. Writes
(recovery, the check's own files) land in the upper layer only; the snapshot and the
live data are never written. Every directory and mount is journaled before it is made,
so ``quiesce cleanup`` removes a drill killed midway, and the server is started with
PR_SET_PDEATHSIG (``setpriv --pdeathsig``): it dies with quiesce, which frees the copy.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from quiesce.errors import DrillError, UsageError
from quiesce.host import proc
from quiesce.host.trust import make_private_dirs
from quiesce.state.journal import Journal

LOG_TAIL = 12  # lines of a server's log kept in a failed drill's result
DEFAULT_TIMEOUT = 600.0


@dataclass(frozen=True)
class AppTarget:
    """One application to drill: ``path`` is where its data lives on the origin (a
    PostgreSQL or MariaDB data directory, an SQLite database file)."""

    kind: str  # postgresql | mysql | sqlite
    name: str
    path: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass
class AppDrill:
    """One application's drill: did it recover, how long, what it replayed, its check."""

    name: str
    kind: str
    path: str  # on the origin
    ok: bool = False
    recovery_s: float | None = None  # server start (or database open) to ready
    replayed: str | None = None  # what recovery replayed, as the application said it
    replayed_bytes: int | None = None
    check: str = ""  # which check ran, and its verdict
    duration_s: float = 0.0
    detail: str = ""  # why it failed (the log's last lines), or notes
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DrillReport:
    """The drill of one snapshot: ``ok`` only if every application recovered and passed
    its check (and there was at least one)."""

    snapshot: str | None
    apps: list[AppDrill] = field(default_factory=list)
    copy: str = "overlay"
    duration_s: float = 0.0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.apps) and all(a.ok for a in self.apps)

    @property
    def recovery_s(self) -> float | None:
        times = [a.recovery_s for a in self.apps if a.recovery_s is not None]
        return max(times) if times else None

    @property
    def check(self) -> str:
        return "; ".join(f"{a.name}: {a.check}" for a in self.apps) or (self.error or "")

    @property
    def replayed(self) -> str:
        return "; ".join(f"{a.name}: {a.replayed}" for a in self.apps if a.replayed)

    def summary(self) -> str:
        if self.error:
            return self.error
        bad = [a for a in self.apps if not a.ok]
        if bad:
            return "; ".join(f"{a.name} ({a.kind}): {a.detail or a.check}" for a in bad)
        return self.check

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "snapshot": self.snapshot,
            "recovery_s": self.recovery_s,
            "check": self.check,
            "replayed": self.replayed,
            "copy": self.copy,
            "duration_s": round(self.duration_s, 6),
            "error": self.error,
            "apps": [a.to_dict() for a in self.apps],
        }


# -- the copy -------------------------------------------------------------------------------


@dataclass
class CopyVolume:
    origin: str  # the volume's mount point on the origin
    path: Path  # the writable copy's root


@dataclass
class WritableCopy:
    root: Path  # the scratch directory (upper layers, sockets, logs)
    volumes: list[CopyVolume]

    def locate(self, origin_path: str | Path) -> Path | None:
        """Where an origin path is in the copy (None: on no volume of the snapshot)."""
        p = os.path.normpath(str(origin_path))
        best: CopyVolume | None = None
        for v in self.volumes:
            mp = os.path.normpath(v.origin)
            inside = p == mp or p.startswith(mp.rstrip("/") + "/")
            if inside and (best is None or len(mp) > len(best.origin)):
                best = v
        if best is None:
            return None
        rel = os.path.relpath(p, os.path.normpath(best.origin))
        return best.path if rel == "." else best.path / rel


def _refuse_on_group(scratch: Path, devs: Sequence[str]) -> None:
    """Before anything is made: the scratch directory (or, if it does not exist yet,
    its nearest existing parent) must not be on a volume of the group."""
    probe = Path(os.path.abspath(scratch))
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    st = os.stat(probe)
    dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    if dev in devs:
        raise UsageError(
            f"the drill's scratch directory {scratch} is on a volume of the group ({dev}): "
            "the drill would write to the live data's filesystem",
            "set [backup] verify_dir (or --dir) to a directory on another filesystem",
        )


@contextlib.contextmanager
def writable_copy(
    mounted: Sequence[tuple[str, Path]],
    *,
    scratch_root: str | Path,
    journal: Journal,
    group_devs: Sequence[str] = (),
) -> Iterator[WritableCopy]:
    """An overlay over each read-only snapshot mount (``(origin mount point, path)``),
    its upper layer in a fresh scratch directory under ``scratch_root``; all removed on
    exit (journaled first, so cleanup removes what a killed drill left)."""
    base = Path(scratch_root)
    _refuse_on_group(base, group_devs)
    for made in make_private_dirs(base):
        made.chmod(0o711)  # the server's user goes through (lists nothing)
    root = Path(tempfile.mkdtemp(prefix="quiesce-drill-", dir=base))
    root_entry = journal.intent("dir", path=str(root), recursive=True)
    root.chmod(0o711)  # the server's user must reach its data directory (traverse only)
    entries: list[int] = []
    vols: list[CopyVolume] = []
    try:
        for i, (origin, lower) in enumerate(mounted):
            upper, work, merged = (root / d / str(i) for d in ("upper", "work", "copy"))
            for d in (upper, work):
                d.mkdir(parents=True, mode=0o700)
            st = os.stat(lower)  # the overlay's root is the upper dir: as the volume's root
            os.chown(upper, st.st_uid, st.st_gid)
            upper.chmod(stat.S_IMODE(st.st_mode))
            merged.mkdir(parents=True, mode=0o711)
            (root / "copy").chmod(0o711)
            opts = f"lowerdir={lower},upperdir={upper},workdir={work}"
            eid = journal.intent("mount", target=str(merged), source="quiesce-drill")
            entries.append(eid)
            p = proc.run_tool("mount", "-t", "overlay", "quiesce-drill", "-o", opts, str(merged))
            if p.returncode != 0:
                raise DrillError(
                    f"cannot make a writable copy of {origin} (overlay on {lower}): "
                    f"{p.stderr.strip()}",
                    "the scratch directory's filesystem must support overlayfs upper layers "
                    "(ext4, xfs, btrfs, tmpfs): set [backup] verify_dir (or --dir)",
                )
            vols.append(CopyVolume(origin, merged))
        yield WritableCopy(root, vols)
    finally:
        for eid in reversed(entries):
            journal.undo(eid)  # raises if busy: the scratch dir then stays for cleanup
        journal.undo(root_entry)


# -- a server on the copy -------------------------------------------------------------------


def owner_of(path: Path) -> pwd.struct_passwd:
    """The user that owns ``path`` (the server runs as it: its data directory's owner)."""
    uid = path.stat().st_uid
    try:
        return pwd.getpwuid(uid)
    except KeyError:
        raise UsageError(
            f"{path} belongs to uid {uid}, which has no user on this machine",
            "create the application's user (as on the origin) to drill it here",
        ) from None


def check_reachable(path: Path, user: pwd.struct_passwd) -> None:
    """Refuse (RuntimeError) if ``user`` cannot traverse every directory above ``path``:
    the server would fail with a less clear message."""
    groups = set(os.getgrouplist(user.pw_name, user.pw_gid))
    for d in [*reversed(path.parents)]:
        st = d.stat()
        bit = (
            stat.S_IXUSR
            if st.st_uid == user.pw_uid
            else stat.S_IXGRP
            if st.st_gid in groups
            else stat.S_IXOTH
        )
        if not st.st_mode & bit:
            raise RuntimeError(
                f"user {user.pw_name} cannot reach {path}: {d} is closed to it; set "
                "[backup] verify_dir (or --dir) under a directory it can traverse (/var/tmp)"
            )


def private_dir(path: Path, user: pwd.struct_passwd) -> Path:
    path.mkdir(mode=0o700)
    os.chown(path, user.pw_uid, user.pw_gid)
    return path


@dataclass
class Server:
    """A server process on the copy, run as ``user`` and killed with its group on exit."""

    process: subprocess.Popen[Any]
    log: Path
    started: float  # monotonic

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, n: int = LOG_TAIL) -> str:
        """The log's errors (PANIC/FATAL/ERROR lines: the cause), then its last lines."""
        lines = self.log_text().splitlines()
        marks = ("PANIC:", "FATAL:", "ERROR:", "[ERROR]")
        errors = [line for line in lines if any(m in line for m in marks)][:5]
        last = [line for line in lines[-(n - len(errors)) :] if line not in errors]
        return "\n".join(errors + last)

    def wait_ready(self, ready: Any, timeout: float, what: str) -> float:
        """Poll ``ready()`` until true; the seconds from start. DrillFailed-like
        RuntimeError with the log's tail if the server exits or ``timeout`` passes."""
        deadline = self.started + timeout
        while not ready():
            if self.process.poll() is not None:
                raise RuntimeError(f"{what} exited ({self.process.returncode}) during recovery")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} was not ready within {timeout:g} s")
            time.sleep(0.01)
        return time.monotonic() - self.started


@contextlib.contextmanager
def server(argv: Sequence[str], user: pwd.struct_passwd, log: Path) -> Iterator[Server]:
    """Start ``argv`` as ``user`` (setpriv: no shell, PR_SET_PDEATHSIG after the switch,
    so it dies with quiesce even by SIGKILL) with its output in ``log``; killed (the
    whole process group: a throwaway copy needs no clean shutdown) on exit."""
    setpriv = shutil.which("setpriv") or "/usr/bin/setpriv"
    cmd = [
        setpriv, f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups",
        "--pdeathsig=KILL", "--", *argv,
    ]  # fmt: skip
    out: IO[bytes]
    with open(log, "wb") as out:
        os.chown(log, user.pw_uid, user.pw_gid)
        p = proc.spawn(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield Server(p, log, time.monotonic())
    finally:
        proc.kill_group(p, 0.0, signal.SIGKILL)


__all__ = [
    "DEFAULT_TIMEOUT",
    "AppDrill",
    "AppTarget",
    "DrillError",
    "DrillReport",
    "Server",
    "WritableCopy",
    "check_reachable",
    "owner_of",
    "private_dir",
    "server",
    "writable_copy",
]
