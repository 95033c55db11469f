"""The second line: a watchdog that thaws what a killed guardian froze, by its deadline.

The guardian ignores the signals an operator sends and has an OOM score of -1000, but
SIGKILL still ends it. Then nothing would be left to thaw what it froze (issue 18,
cases 3 and 4). So before anything is frozen the guardian forks this watchdog (a
grandchild: nobody has to reap it). It keeps its own copies of the volume fds (the same
open file descriptions), hears each volume's state from the guardian through a pipe
(:meth:`SecondLine.note`: a few bytes, never blocking), and learns of the guardian's
death from the kernel: a pidfd of the guardian turns readable and the pipe reaches EOF.

A guardian that dies with a volume ``freezing``, ``frozen`` or ``thawing`` leaves the
watchdog a job: at the deadline (the group's first FIFREEZE call plus the timeout) it
asks the kernel whether each such volume is still frozen, with a FIFREEZE probe on one
thread per volume (a FIFREEZE the guardian left in the kernel, case 4, makes the probe
wait until the kernel completes it, and holds back no other volume):

* EBUSY: still frozen, the guardian's freeze: FITHAW (bounded retries);
* 0: it was not frozen any more (someone thawed it) and the probe just froze it: FITHAW
  at once to undo the probe;
* a volume the guardian noted ``lost`` or ``foreign`` (its freeze thawed, perhaps frozen
  again, by someone else) or that ``quiesce thaw`` thawed (a ``settled`` marker, see
  records.py) is never touched.

Each thaw is one line in the kernel log and syslog. The residual window of the probe:
a thaw *and* a refreeze by others after the guardian's death that nobody noted; the
probe then answers EBUSY and the refreeze is thawed.

For ``quiesce status`` and ``cleanup`` after a SIGKILL, the watchdog (never the guardian:
it must not wait) keeps a root-only record in the guardians' run directory
(``record-<guardian pid>.json``, written atomically by a thread of its own, so that a run
directory on a frozen filesystem blocks that thread only) and removes it when it leaves
with everything settled. records.py reads it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import select
import signal
import socket
import stat
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from quiesce.host import kernel

STATES = ("freezing", "frozen", "thawing", "thawed", "foreign", "failed", "lost")
AT_STAKE = frozenset({"freezing", "frozen", "thawing"})  # the guardian's death leaves a job
SETTLED = frozenset({"thawed", "foreign", "failed", "lost"})
_CODE = {s: i + 1 for i, s in enumerate(STATES)}
_STOP = 255
_MSG = struct.Struct("=HBxxxxxq")  # volume, state, call_ns (0: none): 16 bytes, atomic
_NO_CALL = -(2**63)
RECORD_PREFIX = "record-"
RECORD_SUFFIX = ".json"
SETTLED_SUFFIX = ".settled"  # record-<pid>.settled: devs `quiesce thaw` thawed
MAX_RECORD = 1 << 20
READY_S = 2.0  # start() waits this long, at most, for the watchdog's first record
PIPE_SIZE = 1 << 20  # notes are never dropped unless a megabyte is queued
THAW_RETRY_DELAYS = (0.01, 0.05, 0.2, 1.0, 2.0)  # errors other than EINVAL only
DYING_POLL_S = 0.05  # past a deadline with volumes at stake: is the guardian beyond acting?
STOPPED_GRACE_S = 1.0  # a SIGSTOPped guardian past its deadline by this much: act for it
NAME = b"quiesce-2nd"
SYSLOG_SOCKET = "/dev/log"
SYSLOG_TEST_ENV = "QUIESCE_TEST_SYSLOG"  # honoured only under pytest, as in daemon.py
_SYSLOG_PRI = 3 * 8 + 4  # LOG_DAEMON | LOG_WARNING
_PR_SET_NAME = 15
_LIBC = ctypes.CDLL(None, use_errno=True)


def record_name(guardian_pid: int) -> str:
    return f"{RECORD_PREFIX}{guardian_pid}{RECORD_SUFFIX}"


def settled_name(guardian_pid: int) -> str:
    return f"{RECORD_PREFIX}{guardian_pid}{SETTLED_SUFFIX}"


def read_trusted(dir_fd: int, name: str) -> tuple[Any, str | None]:
    """(the parsed file, None) or (None, why it is refused)."""
    try:
        fd = os.open(
            name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd
        )
    except OSError as e:
        if e.errno == errno.ELOOP:
            return None, "it is a symbolic link"
        return None, f"cannot open it: {e.strerror}"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None, "it is not a regular file"
        if st.st_uid != 0:
            return None, f"it is owned by uid {st.st_uid}, not root"
        if st.st_mode & 0o177:
            return None, f"its mode is {stat.S_IMODE(st.st_mode):04o}, not 0600"
        if st.st_size > MAX_RECORD:
            return None, "it is too large"
        try:
            return json.loads(os.read(fd, MAX_RECORD)), None
        except (ValueError, RecursionError):
            return None, "it is not JSON"
    finally:
        os.close(fd)


def write_private(dir_fd: int, name: str, data: bytes) -> None:
    tmp = f".{name}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp, dir_fd=dir_fd)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, 0o600, dir_fd=dir_fd)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


@contextlib.contextmanager
def settled_lock(dir_fd: int) -> Iterator[None]:
    """Serialise the read-modify-write of settled markers (watchdogs, `quiesce thaw`):
    flock on a fresh open of the run directory (an inherited fd would share the lock)."""
    fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _start_time(pid: int) -> int | None:
    """Clock ticks since boot when ``pid`` started (a recycled pid differs)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


class SecondLine:
    """The guardian's end: start the watchdog, tell it each volume's state, stop it."""

    def __init__(self, wfd: int, watchdog_pid: int) -> None:
        self._w = wfd
        self.watchdog_pid = watchdog_pid  # 0 if it did not say so within READY_S
        self.ready = False  # its first record was written within READY_S
        self._closed = False

    @property
    def fileno(self) -> int:
        """The pipe's write end: keep it open (a guardian that closes every fd it does
        not know would silence its notes; the watchdog would then guard nothing)."""
        return self._w

    @classmethod
    def start(
        cls,
        *,
        guardian_pid: int,
        fds: list[int],
        devs: list[str],
        names: list[str],
        timeout_s: float,
        dir_fd: int,
    ) -> SecondLine:
        """Fork the watchdog (call it before anything is frozen, and before threads
        start). Returns once its first record is written (``READY_S`` at most)."""
        if not len(fds) == len(devs) == len(names):
            raise ValueError("fds, devs and names must have one entry per volume")
        try:
            pidfd = os.pidfd_open(guardian_pid)
        except OSError:  # before Linux 5.3: the pipe's EOF alone (and /proc) tells
            pidfd = -1
        r, w = os.pipe2(os.O_CLOEXEC)
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        with contextlib.suppress(OSError):
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        spec = {
            "guardian_pid": guardian_pid,
            "guardian_start": _start_time(guardian_pid),
            "devs": list(devs),
            "names": list(names),
            "timeout_s": float(timeout_s),
        }
        try:
            pid = os.fork()
            if pid == 0:  # the intermediate: fork the watchdog, leave (init adopts it)
                code = 0
                try:
                    child = os.fork()
                    if child == 0:
                        os.close(w)
                        os.close(ready_r)
                        _Watchdog(spec, list(fds), r, pidfd, ready_w, dir_fd).run()
                    else:
                        os.write(ready_w, struct.pack("=i", child))
                except BaseException:
                    code = 70
                os._exit(code)
            os.waitpid(pid, 0)
        finally:
            for fd in (r, ready_w, pidfd):
                if fd >= 0:
                    os.close(fd)
        watchdog = 0
        try:
            end = time.monotonic() + READY_S
            got = b""
            while len(got) < 5 and (left := end - time.monotonic()) > 0:
                ready, _, _ = select.select([ready_r], [], [], left)
                chunk = os.read(ready_r, 5 - len(got)) if ready else b""
                if not chunk:
                    break  # the watchdog died, or is slow: go on without waiting
                got += chunk
            if len(got) >= 4:
                watchdog = struct.unpack("=i", got[:4])[0]
        finally:
            os.close(ready_r)
        os.set_blocking(w, False)
        line = cls(w, watchdog)
        line.ready = got[4:5] == b"R"
        return line

    def note(self, idx: int, state: str, *, call_ns: int | None = None) -> None:
        """Volume ``idx`` is now in ``state``; ``call_ns`` (CLOCK_MONOTONIC) of its
        FIFREEZE call. One non-blocking pipe write; never raises."""
        try:
            code = _CODE[state]
            os.write(self._w, _MSG.pack(idx, code, _NO_CALL if call_ns is None else call_ns))
        except (OSError, KeyError, struct.error, TypeError, ValueError):
            pass

    def stop(self) -> None:
        """Nothing of the guardian's is frozen any more: the watchdog leaves at once."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError, struct.error):
            os.write(self._w, _MSG.pack(0, _STOP, _NO_CALL))
        with contextlib.suppress(OSError):
            os.close(self._w)


# -- the watchdog process -----------------------------------------------------------------


def _kmsg(line: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open("/dev/kmsg", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            os.write(fd, f"<4>quiesce-2nd[{os.getpid()}]: {line}\n".encode())
        finally:
            os.close(fd)


def _syslog_target() -> str:
    path = os.environ.get(SYSLOG_TEST_ENV)
    if path and os.environ.get("PYTEST_CURRENT_TEST"):
        with contextlib.suppress(OSError):
            st = os.lstat(path)
            if stat.S_ISSOCK(st.st_mode) and st.st_uid == 0:
                return path
    return SYSLOG_SOCKET


def _detach(keep: set[int]) -> None:
    """A daemon that touches no file: own session, deaf to signals, only its fds."""
    os.setsid()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    devnull = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)
    os.chdir("/")
    with contextlib.suppress(OSError):
        fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY)
        try:
            os.write(fd, b"-1000")
        finally:
            os.close(fd)
    with contextlib.suppress(Exception):
        _LIBC.prctl(_PR_SET_NAME, ctypes.c_char_p(NAME), 0, 0, 0)


class _Watchdog:
    """Runs in the forked grandchild; never returns (the caller ``_exit``s)."""

    def __init__(
        self,
        spec: dict[str, Any],
        fds: Sequence[int],
        pipe_r: int,
        pidfd: int,
        ready_w: int,
        dir_fd: int,
    ) -> None:
        self.spec = spec
        self.gpid: int = spec["guardian_pid"]
        self.fds = list(fds)
        self.pipe_r = pipe_r
        self.pidfd = pidfd
        self.ready_w = ready_w
        self.dir_fd = dir_fd
        n = len(self.fds)
        self.state: list[str] = ["idle"] * n
        self.call_wall: list[float | None] = [None] * n
        self.first_call: int | None = None  # CLOCK_MONOTONIC ns of the first FIFREEZE
        self.stopped = False
        self.dead = False
        self.buf = b""
        self.started_wall = time.time()
        self.lock = threading.Lock()
        self.dirty = threading.Condition(self.lock)
        self.version = 0
        self.written = 0
        self.leaving = False
        self.syslog: socket.socket | None = None
        self.recorder: threading.Thread | None = None
        self.superseding: set[str] = set()  # devs our guardian froze (FIFREEZE returned 0)

    # -- the record (its own thread: a run directory on a frozen fs blocks it alone) --------
    def _snapshot(self) -> dict[str, Any]:
        deadline_wall = None
        if self.first_call is not None:
            ago = (time.monotonic_ns() - self.first_call) / 1e9
            deadline_wall = time.time() - ago + self.spec["timeout_s"]
        return {
            "version": 1,
            "guardian_pid": self.gpid,
            "guardian_start": self.spec["guardian_start"],
            "watchdog_pid": os.getpid(),
            "watchdog_start": _start_time(os.getpid()),
            "started": self.started_wall,
            "timeout_s": self.spec["timeout_s"],
            "deadline_wall": deadline_wall,
            "expedite": None,  # the rcu_expedited knob if the guardian held it (lead's slot)
            "volumes": [
                {"dev": d, "name": nm, "state": s, "call_wall": c}
                for d, nm, s, c in zip(
                    self.spec["devs"], self.spec["names"], self.state, self.call_wall, strict=True
                )
            ],
        }

    def _write_record(self, rec: dict[str, Any]) -> None:
        name = record_name(self.gpid)
        tmp = f".{name}.{os.getpid()}.tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=self.dir_fd)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o600, dir_fd=self.dir_fd)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, json.dumps(rec).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)

    def _recorder(self) -> None:
        first = True
        while True:
            with self.lock:
                while self.version == self.written and not self.leaving:
                    self.dirty.wait()
                if self.leaving:
                    return
                version, rec = self.version, self._snapshot()
                devs, self.superseding = self.superseding, set()
            with contextlib.suppress(OSError):
                self._write_record(rec)
            if devs:
                with contextlib.suppress(Exception):
                    self._supersede(devs)
            with self.lock:
                self.written = version
                self.dirty.notify_all()
            if first:
                first = False
                with contextlib.suppress(OSError):
                    os.write(self.ready_w, b"R")
                with contextlib.suppress(OSError):
                    os.close(self.ready_w)

    def _supersede(self, devs: set[str]) -> None:
        """Our guardian's FIFREEZE of ``devs`` returned 0: no earlier freeze of them was
        left. Another record that still has them at stake (a killed guardian's, whose
        freeze someone thawed) is history: its watchdog must never probe them, or it
        would thaw ours. Marked settled for it, and it is woken (SIGUSR1)."""
        for name in os.listdir(self.dir_fd):
            digits = name.removeprefix(RECORD_PREFIX).removesuffix(RECORD_SUFFIX)
            if name == record_name(self.gpid) or not name.startswith(RECORD_PREFIX):
                continue
            if not name.endswith(RECORD_SUFFIX) or not digits.isdigit():
                continue
            rec, why = read_trusted(self.dir_fd, name)
            vols = rec.get("volumes") if why is None and isinstance(rec, dict) else None
            if not isinstance(vols, list):
                continue
            claimed = {
                v.get("dev") for v in vols if isinstance(v, dict) and v.get("state") in AT_STAKE
            }
            stale = claimed & devs
            if not stale:
                continue
            with settled_lock(self.dir_fd):
                old, why = read_trusted(self.dir_fd, settled_name(int(digits)))
                ok = isinstance(old, list) and not why
                have = {d for d in old if isinstance(d, str)} if ok else set()
                if stale <= have:
                    continue
                data = json.dumps(sorted(have | stale)).encode()
                write_private(self.dir_fd, settled_name(int(digits)), data)
            wpid = rec.get("watchdog_pid")
            if (
                isinstance(wpid, int)
                and wpid > 0
                and _start_time(wpid) == rec.get("watchdog_start")
            ):
                with contextlib.suppress(OSError):
                    os.kill(wpid, signal.SIGUSR1)

    def _changed(self) -> None:
        with self.lock:
            self.version += 1
            self.dirty.notify_all()

    def _remove_record(self) -> None:
        """Last: after a write in flight (it would bring the record back)."""
        with self.lock:
            self.leaving = True
            self.dirty.notify_all()
        if self.recorder is not None:
            self.recorder.join(5.0)  # longer only on a run directory frozen by others
        for name in (record_name(self.gpid), settled_name(self.gpid)):
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=self.dir_fd)

    # -- notes ------------------------------------------------------------------------------
    def _apply(self, data: bytes) -> None:
        self.buf += data
        changed = False
        while len(self.buf) >= _MSG.size:
            idx, code, call = _MSG.unpack_from(self.buf)
            self.buf = self.buf[_MSG.size :]
            if code == _STOP:
                self.stopped = True
                continue
            if not 0 <= idx < len(self.fds) or not 1 <= code <= len(STATES):
                continue
            new = STATES[code - 1]
            if call != _NO_CALL:
                if self.first_call is None or call < self.first_call:
                    self.first_call = call
                ago = (time.monotonic_ns() - call) / 1e9
                self.call_wall[idx] = time.time() - ago
            elif new in AT_STAKE and self.first_call is None:
                self.first_call = time.monotonic_ns()  # no call time given: from now
            if new != self.state[idx]:
                with self.lock:
                    self.state[idx] = new
                    if new == "frozen":
                        self.superseding.add(self.spec["devs"][idx])
                changed = True
            if new in SETTLED and self.fds[idx] >= 0:
                # Not ours to guard any more: never pin its mount (umount).
                with contextlib.suppress(OSError):
                    os.close(self.fds[idx])
                self.fds[idx] = -1
        if changed:
            self._changed()

    def _read_pipe(self) -> bool:
        """Apply what is queued; False at EOF (the guardian is gone, or stopped)."""
        while True:
            try:
                data = os.read(self.pipe_r, 65536)
            except BlockingIOError:
                return True
            except OSError:
                return False
            if not data:
                return False
            self._apply(data)

    def _settled(self) -> bool:
        return all(s in SETTLED for s in self.state)

    def _at_stake(self) -> list[int]:
        return [i for i in range(len(self.state) - 1, -1, -1) if self.state[i] in AT_STAKE]

    # -- the guardian is gone -----------------------------------------------------------
    def _thawed_by_quiesce(self) -> set[str]:
        """Devs `quiesce thaw` thawed since the guardian died (records.mark_thawed)."""
        try:
            fd = os.open(
                settled_name(self.gpid),
                os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                dir_fd=self.dir_fd,
            )
        except OSError:
            return set()
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o077:
                return set()
            devs = json.loads(os.read(fd, 65536))
            return {d for d in devs if isinstance(d, str)} if isinstance(devs, list) else set()
        except (OSError, ValueError):
            return set()
        finally:
            os.close(fd)

    def _record(self, line: str) -> None:
        _kmsg(line)
        if self.syslog is not None:
            msg = f"<{_SYSLOG_PRI}>quiesce-2nd[{os.getpid()}]: {line}"
            with contextlib.suppress(OSError):
                self.syslog.sendto(msg.encode(), socket.MSG_DONTWAIT, _syslog_target())

    def _settle(self, i: int) -> None:
        """One volume after the guardian's death, at the deadline: probe, then thaw."""
        fd, name = self.fds[i], self.spec["names"][i]
        was = self.state[i]
        code = kernel.freeze_errno(fd)  # waits here while the kernel completes a freeze
        who = f"guardian {self.gpid} is gone"
        if code == errno.EBUSY:
            res = kernel.thaw_errno(fd, THAW_RETRY_DELAYS)
            since = self.call_wall[i]
            held = f" after {time.time() - since:.3f}s frozen" if since else ""
            tail = "" if res in (0, errno.EINVAL) else f"; FITHAW failed: errno {res}"
            self._record(f"thawed {name} ({who}: deadline){held}{tail}")
            new = "thawed" if res in (0, errno.EINVAL) else "failed"
        elif code == 0:
            res = kernel.thaw_errno(fd, THAW_RETRY_DELAYS)
            what = {
                "freezing": "was not frozen (its FIFREEZE failed or never ran)",
                "thawing": "was already thawed (the guardian's own FITHAW)",
            }.get(was, "was thawed by someone else")
            tail = "" if res in (0, errno.EINVAL) else f"; FITHAW failed: errno {res}"
            self._record(f"{name} {what} before the deadline ({who}): probe undone{tail}")
            new = "thawed" if res in (0, errno.EINVAL) else "failed"
        else:
            self._record(f"{name}: ownership probe failed: errno {code} ({who}); left alone")
            new = "failed"
        with self.lock:
            self.state[i] = new
            self.version += 1
            self.dirty.notify_all()

    def _spare(self, stake: list[int]) -> list[int]:
        """Drop the volumes `quiesce thaw` has thawed since the guardian died."""
        spared = self._thawed_by_quiesce()
        left = []
        for i in stake:
            if self.spec["devs"][i] in spared or self.fds[i] < 0:
                with self.lock:
                    self.state[i] = "thawed"
                    self.version += 1
                    self.dirty.notify_all()
            else:
                left.append(i)
        return left

    def _on_death(self, wake_r: int) -> None:
        """Wait for the deadline, then settle each volume at stake on its own thread.
        SIGUSR1 (`quiesce thaw` of one of them) wakes the wait: the spared leave it."""
        stake = self._at_stake()
        timeout_ns = int(self.spec["timeout_s"] * 1e9)
        start = self.first_call if self.first_call is not None else time.monotonic_ns()
        deadline = start + timeout_ns
        poller = select.poll()
        poller.register(wake_r, select.POLLIN)
        while stake and (left := deadline - time.monotonic_ns()) > 0:
            if poller.poll(min(left / 1e6, 60_000.0)):
                with contextlib.suppress(OSError):
                    os.read(wake_r, 4096)
                stake = self._spare(stake)
        threads = []
        for i in self._spare(stake):
            t = threading.Thread(target=self._settle, args=(i,), name=f"2nd-{i}", daemon=True)
            t.start()
            threads.append(t)
        for t in threads:
            t.join()

    def _deadline(self) -> int | None:
        if self.first_call is None:
            return None
        return self.first_call + int(self.spec["timeout_s"] * 1e9)

    def _poll_ms(self) -> float | None:
        """None (wait for the guardian) unless something is at stake: then until its
        deadline, and past it every ``DYING_POLL_S`` (see :meth:`_dying`)."""
        deadline = self._deadline()
        if deadline is None or not self._at_stake():
            return None
        left = (deadline - time.monotonic_ns()) / 1e6
        return left + 1 if left > 0 else DYING_POLL_S * 1e3

    def _dying(self) -> bool:
        """Past the deadline with volumes at stake, is the guardian beyond acting? Its
        pidfd says so only once every thread has left the kernel: a guardian SIGKILLed
        while one crew thread waits in FIFREEZE (case 4) would hold the thaw of every
        other volume until that FIFREEZE returns. So: killed (SIGKILL pending, or its
        main thread a zombie), or stopped (SIGSTOP) for ``STOPPED_GRACE_S`` past it."""
        try:
            with open(f"/proc/{self.gpid}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
            if state == b"Z":
                return True
            with open(f"/proc/{self.gpid}/status", "rb") as f:
                for line in f:
                    pending = line.startswith((b"SigPnd:", b"ShdPnd:"))
                    if pending and int(line.split()[1], 16) >> (signal.SIGKILL - 1) & 1:
                        return True
        except (OSError, IndexError, ValueError):
            return False  # gone: the pidfd tells
        deadline = self._deadline()
        late = deadline is not None and time.monotonic_ns() > deadline + STOPPED_GRACE_S * 1e9
        return state in (b"T", b"t") and late

    def _watch(self) -> None:
        """Until the guardian stops, settles everything, or dies (its pidfd; or past the
        deadline, :meth:`_dying`)."""
        poller = select.poll()
        poller.register(self.pipe_r, select.POLLIN)
        if self.pidfd >= 0:
            poller.register(self.pidfd, select.POLLIN)
        pipe_open = True
        while True:
            events = poller.poll(self._poll_ms())
            if pipe_open and not self._read_pipe():
                pipe_open = False
                poller.unregister(self.pipe_r)
                if self.pidfd < 0:  # no pidfd: the write end's last close is the death
                    self.dead = not self.stopped
                    return
            if self.stopped:
                return
            if any(fd == self.pidfd for fd, _ in events):
                if pipe_open:
                    self._read_pipe()  # what it said before it died counts
                self.dead = not self.stopped
                return
            if self._settled():
                return
            if not events and self._poll_ms() is not None and self._dying():
                self.dead = True
                return

    def run(self) -> None:
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        keep = {self.pipe_r, self.pidfd, self.ready_w, self.dir_fd, wake_r, wake_w, *self.fds}
        keep.discard(-1)
        _detach(keep)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGUSR1, lambda *_: None)
        self.syslog = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        os.set_blocking(self.pipe_r, False)
        self.recorder = threading.Thread(target=self._recorder, name="2nd-record", daemon=True)
        self.recorder.start()
        self._changed()  # the first record, before anything is frozen
        try:
            self._watch()
        except Exception:  # a bug here must not cost the second line: wait for the death
            with contextlib.suppress(Exception):
                while self.pidfd < 0 and os.path.exists(f"/proc/{self.gpid}"):
                    time.sleep(DYING_POLL_S)
                select.select([self.pidfd], [], [])
            self.dead = not self.stopped
        if self.dead:
            self._on_death(wake_r)
        self._remove_record()
