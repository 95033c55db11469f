"""Expedited RCU grace periods while a group freezes, shared safely between runs.

Most of an idle FIFREEZE is three normal RCU grace periods (one per freeze level:
``percpu_down_write`` -> ``rcu_sync_enter``). With ``/sys/kernel/rcu_expedited`` = 1 they
end in microseconds. The knob is machine-wide, so it is set only from just before the
first FIFREEZE of a group until the last one returns, and every holder is recorded
*before* the knob changes, in a holders file in the guardians' root-only run directory
(flock'd): the first holder saves the value it found and sets 1, the last one out
restores it, dead holders are pruned. A holder killed in between (SIGKILL) leaves its
record: the next run, the controller that reaps the guardian, ``quiesce cleanup`` and
``quiesce status`` see it.

The knob is machine-wide, so its record is too: always in /run/quiesce, even when
``QUIESCE_RUN_DIR`` names another directory for the sockets (a record kept there would
vanish with that directory and leave the knob set, with nobody to restore it). Only a
test's stand-in knob keeps its record next to the sockets.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import threading
from dataclasses import dataclass
from typing import Any

from quiesce.freezing.guardian.protocol import RUN_DIR, open_run_dir, run_dir_path
from quiesce.host.pids import start_time

SYSFS_DIR = "/sys/kernel"
TEST_DIR_ENV = "QUIESCE_TEST_RCU_DIR"  # a directory standing for /sys/kernel; only under pytest
HOLDERS_FILE = "rcu-expedited.json"
TEST_HOLDERS_FILE = "rcu-expedited-test.json"  # a test's stand-in has its own record


def sysfs_dir() -> str:
    """/sys/kernel, or a test's stand-in (honoured only under pytest)."""
    path = os.environ.get(TEST_DIR_ENV)
    if path and os.environ.get("PYTEST_CURRENT_TEST") and os.path.isabs(path):
        return path
    return SYSFS_DIR


def _read(name: str) -> str | None:
    try:
        with open(os.path.join(sysfs_dir(), name), "rb") as f:
            return f.read(16).decode().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _write(name: str, value: str) -> None:
    fd = os.open(os.path.join(sysfs_dir(), name), os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode() + b"\n")
    finally:
        os.close(fd)


def _alive(holder: dict[str, Any]) -> bool:
    pid, start = holder.get("pid"), holder.get("start")
    return isinstance(pid, int) and pid > 0 and start_time(pid) == start


def _holders_file() -> str:
    return HOLDERS_FILE if sysfs_dir() == SYSFS_DIR else TEST_HOLDERS_FILE


def record_dir() -> str:
    """Where the holders record lives: /run/quiesce for the real knob (machine-wide, like
    the knob), the sockets' directory for a test's stand-in."""
    return RUN_DIR if sysfs_dir() == SYSFS_DIR else run_dir_path()


@contextlib.contextmanager
def _holders(create: bool, run_dir: int | None = None) -> Any:
    """The holders record, locked; yields (record, save) or None if there is none.
    ``run_dir``: the record's directory, already opened and checked (kept by a holder)."""
    name = _holders_file()
    kept = None if run_dir is None else os.dup(run_dir)
    dir_fd = open_run_dir(create=create, path=record_dir()) if kept is None else kept
    if dir_fd is None:
        yield None
        return
    try:
        fd = _open_locked(name, dir_fd, create)
        if fd is None:
            yield None
            return
        try:
            raw = os.pread(fd, 65536, 0)
            try:
                rec = json.loads(raw) if raw.strip() else {}
            except ValueError:
                rec = {}
            if not isinstance(rec, dict) or not isinstance(rec.get("holders"), list):
                rec = {"holders": []} | (rec if isinstance(rec, dict) else {})
                rec["holders"] = []

            def save(new: dict[str, Any] | None) -> None:
                if new is None or not new.get("holders"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(name, dir_fd=dir_fd)
                    return
                data = json.dumps(new).encode()
                # Write, then cut: truncating to 0 first made the last close of the
                # removed file cost 0.1-1 ms on tmpfs, and the release runs in the window.
                os.pwrite(fd, data, 0)
                os.ftruncate(fd, len(data))

            yield rec, save
        finally:
            os.close(fd)  # the unlink (if any) happened under the lock
    finally:
        os.close(dir_fd)


def _open_locked(name: str, dir_fd: int, create: bool) -> int | None:
    """The record's fd, flock'd; None if there is none (and ``create`` is false).

    The last holder out removes the record under the lock: a file opened just before
    that is no longer the record once its lock is granted. Open it again then, or an
    entry written into the removed file would be lost (and its value never restored)."""
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    while True:
        try:
            fd = os.open(name, flags, 0o600, dir_fd=dir_fd)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            st = os.fstat(fd)
            try:
                now = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                same = (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)
            except FileNotFoundError:
                same = False
        except BaseException:
            os.close(fd)
            raise
        if same:
            return fd
        os.close(fd)


def _why_not(code: int) -> str:
    if code == errno.EROFS:
        return "/sys is read-only here (a container?)"
    if code in (errno.EACCES, errno.EPERM):
        return "not permitted to write /sys/kernel/rcu_expedited"
    if code == errno.ENOENT:
        return "this kernel has no /sys/kernel/rcu_expedited"
    return f"writing /sys/kernel/rcu_expedited failed: {os.strerror(code)}"


@dataclass
class Expedite:
    """One holder (a guardian, or the controller without one). Thread-safe, idempotent."""

    pid: int
    state: str = "off"  # off | on | already-on | unavailable
    reason: str | None = None
    held: bool = False
    original: str = "0"  # what the first holder found, as this holder read the record
    # The record's directory, opened and checked at acquire, kept until release: the
    # release runs inside the window (after the last FIFREEZE); a fresh check costs 0.1 ms.
    _run_dir: int | None = None

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def acquire(self) -> str:
        """Expedite grace periods now; the state says what happened (never raises)."""
        with self._lock:
            if self.held or self.state in ("on", "already-on"):
                return self.state
            try:
                self._acquire()
            except Exception as e:  # a broken record must never stop a freeze
                self.state, self.reason = "unavailable", f"{type(e).__name__}: {e}"
            return self.state

    def _acquire(self) -> None:
        if _read("rcu_normal") == "1":
            self.state, self.reason = "unavailable", "rcu_normal=1 overrides expediting"
            return
        self._run_dir = open_run_dir(create=True, path=record_dir())
        try:
            self._take_or_leave()
        finally:
            if not self.held and self._run_dir is not None:
                os.close(self._run_dir)
                self._run_dir = None

    def _take_or_leave(self) -> None:
        with _holders(create=True, run_dir=self._run_dir) as got:
            assert got is not None
            rec, save = got
            live = [h for h in rec["holders"] if _alive(h)]
            current = _read("rcu_expedited")
            if current is None:
                self.state, self.reason = "unavailable", _why_not(errno.ENOENT)
                save({**rec, "holders": live})
                return
            if live or rec["holders"]:  # someone (perhaps dead) set it: keep their original
                original = rec.get("original", "0")
            elif current != "0":
                self.state = "already-on"  # the admin's setting: not ours to touch
                save(None)
                return
            else:
                original = current
            me = {"pid": self.pid, "start": start_time(self.pid)}
            save({"original": original, "holders": [*live, me]})  # recorded first
            self.original = original if original in ("0", "1") else "0"
            try:
                if current != "1":
                    _write("rcu_expedited", "1")
            except OSError as e:
                save({"original": original, "holders": live})
                self.state, self.reason = "unavailable", _why_not(e.errno or errno.EIO)
                return
            self.state, self.held = "on", True

    def release(self) -> None:
        """Leave; the last holder out restores the value the first one found."""
        with self._lock:
            if not self.held:
                return
            self.held = False
            with contextlib.suppress(Exception):
                # Our record gone (removed by hand, its directory deleted): nobody else
                # can be known to hold the knob, so put back what we found.
                gone = _leave(self.pid, self._run_dir) is _NO_RECORD
                if gone and _read("rcu_expedited") != self.original:
                    _write("rcu_expedited", self.original)
            if self._run_dir is not None:
                with contextlib.suppress(OSError):
                    os.close(self._run_dir)
                self._run_dir = None


_NO_RECORD = "no-record"


def _leave(pid: int | None, run_dir: int | None = None) -> str | None:
    """Drop ``pid`` (None: nobody) and the dead; restore if nobody is left. Returns the
    value restored, if any, or _NO_RECORD when there is no record at all."""
    with _holders(create=False, run_dir=run_dir) as got:
        if got is None:
            return _NO_RECORD
        rec, save = got
        live = [h for h in rec["holders"] if h.get("pid") != pid and _alive(h)]
        if live:
            save({**rec, "holders": live})
            return None
        original = rec.get("original", "0")
        original = original if original in ("0", "1") else "0"
        with contextlib.suppress(OSError):
            _write("rcu_expedited", original)  # no read first: this runs in the window
        save(None)
        return original


def holders() -> dict[str, Any] | None:
    """The record as it stands, with each holder's liveness (for `quiesce status`)."""
    with contextlib.suppress(Exception), _holders(create=False) as got:
        if got is None:
            return None
        rec, _ = got
        hs = [{"pid": h.get("pid"), "alive": _alive(h)} for h in rec["holders"]]
        return {"original": rec.get("original"), "current": _read("rcu_expedited"), "holders": hs}
    return None


def describe(rec: dict[str, Any] | None) -> str | None:
    """One line for `quiesce status` when a dead holder left rcu_expedited set."""
    if not rec or not rec["holders"]:
        return None
    dead = [h["pid"] for h in rec["holders"] if not h["alive"]]
    live = [h["pid"] for h in rec["holders"] if h["alive"]]
    cur = rec.get("current")
    if dead and not live:
        return (
            f"rcu_expedited={cur} set by quiesce guardian {', '.join(map(str, dead))} (dead): "
            f"run `quiesce cleanup` to restore {rec.get('original')}"
        )
    return f"rcu_expedited={cur} while quiesce freezes (held by {', '.join(map(str, live))})"


def restore_stale() -> str | None:
    """`quiesce cleanup`: restore the value a dead holder left. Says what it did."""
    rec = holders()
    if not rec or any(h["alive"] for h in rec["holders"]):
        return None
    restored = _leave(None)
    if restored in (None, _NO_RECORD):
        return None
    dead = ", ".join(str(h["pid"]) for h in rec["holders"])
    return f"restored rcu_expedited={restored} (left set by dead quiesce process {dead})"
