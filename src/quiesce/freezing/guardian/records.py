"""What a killed guardian held: the second line's records, read for `status`, `thaw` and
`cleanup`.

The watchdog (second.py) keeps ``record-<guardian pid>.json`` in the guardians' root-only
run directory while it guards. A record is believed only if it is a regular file that
root owns with mode 0600, opened without following links through the verified directory
(protocol.open_run_dir), and fits its schema; anything else is refused and named. What a
record says about a volume is only a lead: the state shown is the kernel's, from a
FIFREEZE probe (EBUSY: frozen; 0: it was not frozen, the probe is thawed at once).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import signal
from typing import Any

from quiesce.freezing.guardian.protocol import open_run_dir
from quiesce.freezing.guardian.second import (
    AT_STAKE,
    RECORD_PREFIX,
    RECORD_SUFFIX,
    STATES,
    read_trusted,
    record_name,
    settled_lock,
    settled_name,
    write_private,
)
from quiesce.host import kernel
from quiesce.host.mounts import MountTable
from quiesce.host.pids import pid_alive, start_time, stat_fields

_NAME = re.compile(rf"{RECORD_PREFIX}([1-9][0-9]{{0,9}}){re.escape(RECORD_SUFFIX)}")
_DEV = re.compile(r"[0-9]{1,10}:[0-9]{1,10}")
_TMP = re.compile(r"\.record-[0-9]+\.(?:json|settled)\.([0-9]+)\.tmp")  # a writer's, half made


def _num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check(rec: Any, pid: int) -> str | None:
    """Why ``rec`` does not fit the schema, or None."""
    if not isinstance(rec, dict):
        return "not a JSON object"
    if rec.get("guardian_pid") != pid:
        return f"it names guardian {rec.get('guardian_pid')!r}, not {pid}"
    for key in ("watchdog_pid",):
        if not _int(rec.get(key)) or rec[key] <= 0:
            return f"no valid {key}"
    for key in ("guardian_start", "watchdog_start"):
        if rec.get(key) is not None and not _int(rec[key]):
            return f"no valid {key}"
    if not _num(rec.get("timeout_s")):
        return "no valid timeout_s"
    for key in ("deadline_wall", "started"):
        if rec.get(key) is not None and not _num(rec[key]):
            return f"no valid {key}"
    vols = rec.get("volumes")
    if not isinstance(vols, list) or not vols:
        return "no volumes"
    for v in vols:
        if not (
            isinstance(v, dict)
            and isinstance(v.get("dev"), str)
            and _DEV.fullmatch(v["dev"])
            and isinstance(v.get("name"), str)
            and v.get("state") in (*STATES, "idle")
            and (v.get("call_wall") is None or _num(v["call_wall"]))
        ):
            return "a malformed volume"
    return None


def scan(dir_fd: int) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Every believed record in the run directory, and the refused ones (name -> why)."""
    found: list[dict[str, Any]] = []
    refused: dict[str, str] = {}
    for name in sorted(os.listdir(dir_fd)):
        m = _NAME.fullmatch(name)
        if m is None:
            continue
        rec, why = read_trusted(dir_fd, name)
        if why is None:
            why = _check(rec, int(m.group(1)))
        if why is not None:
            refused[name] = why
            continue
        found.append(rec)
    return found, refused


def _spared(dir_fd: int, gpid: int) -> set[str]:
    """Devs that `quiesce thaw` thawed since guardian ``gpid`` died."""
    devs, why = read_trusted(dir_fd, settled_name(gpid))
    if why is not None or not isinstance(devs, list):
        return set()
    return {d for d in devs if isinstance(d, str)}


def _guardian(rec: dict[str, Any]) -> str:
    """Alive, dying (killed, a thread still inside an ioctl) or gone."""
    pid = rec["guardian_pid"]
    fields = stat_fields(pid)
    if fields is None or fields[0] == "X":
        return "gone"
    with contextlib.suppress(IndexError, ValueError):
        if rec.get("guardian_start") is not None and int(fields[19]) != rec["guardian_start"]:
            return "gone"  # a recycled pid
    if fields[0] == "Z":
        try:
            tasks = len(os.listdir(f"/proc/{pid}/task"))
        except OSError:
            return "gone"
        return "dying" if tasks > 1 else "gone"
    return "dying" if _sigkill_pending(pid) else "alive"


def _sigkill_pending(pid: int) -> bool:
    """SIGKILLed, but a thread is still inside the kernel (an uninterruptible FIFREEZE)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("SigPnd:", "ShdPnd:")) and int(line.split()[1], 16) & (
                    1 << (signal.SIGKILL - 1)
                ):
                    return True
    except (OSError, ValueError, IndexError):
        pass
    return False


def _watchdog_alive(rec: dict[str, Any]) -> bool:
    start = start_time(rec["watchdog_pid"])
    return start is not None and start == rec.get("watchdog_start", start)


def _kernel_state(dev: str, name: str, table: MountTable) -> tuple[str, str]:
    """(state, fstype) of ``dev`` as the kernel has it, from a FIFREEZE probe."""
    vol = table.volumes.get(dev)
    if vol is None:
        return "not mounted", ""
    path = name if any(m.mount_point == name for m in vol.mounts) else vol.mount_point
    try:
        fd = kernel.open_dir(path)
    except OSError:
        return "unknown", vol.fstype
    try:
        if table.volume_of_mount_id(kernel.fd_mount_id(fd)) is not vol:
            return "unknown", vol.fstype  # remounted since: not the same superblock
        code = kernel.freeze_errno(fd)
        if code == errno.EBUSY:
            return "frozen", vol.fstype
        if code == 0:  # it was not frozen: our probe froze it, undo that now
            kernel.thaw_errno(fd)
            return "thawed", vol.fstype
        return "unknown", vol.fstype
    finally:
        os.close(fd)


def _reply(rec: dict[str, Any], life: str, spared: set[str], table: MountTable) -> dict[str, Any]:
    vols = []
    for v in rec["volumes"]:
        state, fstype = v["state"], ""
        if v["dev"] in spared:
            state = "released"  # thawed by `quiesce thaw`, or frozen anew by a later run
        elif state == "freezing" and life == "dying":
            pass  # its FIFREEZE is still in the kernel: a probe would wait behind it
        elif state in AT_STAKE:
            state, fstype = _kernel_state(v["dev"], v["name"], table)
        vols.append(
            {"mount_point": v["name"], "dev": v["dev"], "fstype": fstype, "state": state,
             "recorded": v["state"]}
        )  # fmt: skip
    return {
        "pid": rec["guardian_pid"],
        "gone": True,
        "dying": life == "dying",
        "watchdog_pid": rec["watchdog_pid"],
        "watchdog_alive": _watchdog_alive(rec),
        "deadline_wall": rec.get("deadline_wall"),
        "timeout_s": rec["timeout_s"],
        "expedite": rec.get("expedite"),
        "volumes": vols,
    }


def gone_guardians() -> list[dict[str, Any]]:
    """For each record whose guardian is dead, a status-like reply; each volume's state
    is the kernel's ("frozen", "thawed", "freezing" while a dead guardian's FIFREEZE is
    still in the kernel, or the recorded state of a volume that was not at stake)."""
    out, _ = survey_gone()
    return out


def survey_gone() -> tuple[list[dict[str, Any]], dict[str, str]]:
    """:func:`gone_guardians` and the refused records (name -> why)."""
    dir_fd = open_run_dir(create=False)
    if dir_fd is None:
        return [], {}
    try:
        recs, refused = scan(dir_fd)
        out = []
        table: MountTable | None = None
        for rec in recs:
            life = _guardian(rec)
            if life == "alive":
                continue  # it answers for itself
            table = table or MountTable.read()
            out.append(_reply(rec, life, _spared(dir_fd, rec["guardian_pid"]), table))
        return out, refused
    finally:
        os.close(dir_fd)


def holder_gone(dev: str) -> dict[str, Any] | None:
    """The gone guardian whose record has ``dev`` at stake (its freeze was quiesce's)."""
    dir_fd = open_run_dir(create=False)
    if dir_fd is None:
        return None
    try:
        recs, _ = scan(dir_fd)
        for rec in recs:
            at_stake = any(v["dev"] == dev and v["state"] in AT_STAKE for v in rec["volumes"])
            if (
                at_stake
                and dev not in _spared(dir_fd, rec["guardian_pid"])
                and _guardian(rec) != "alive"
            ):
                return rec
        return None
    finally:
        os.close(dir_fd)


def mark_thawed(guardian_pid: int, devs: list[str]) -> bool:
    """Someone of quiesce's (`quiesce thaw`, a controller that lost its guardian) thawed
    ``devs`` of guardian ``guardian_pid``'s freeze: its watchdog must never touch them
    again (a refreeze by someone else would answer its probe with EBUSY). Written next to
    the record; the watchdog is woken (SIGUSR1) to read it. False if there is no record."""
    dir_fd = open_run_dir(create=False)
    if dir_fd is None:
        return False
    try:
        rec, why = read_trusted(dir_fd, record_name(guardian_pid))
        if why is not None or _check(rec, guardian_pid) is not None:
            return False
        with settled_lock(dir_fd):
            devs = sorted(_spared(dir_fd, guardian_pid) | set(devs))
            write_private(dir_fd, settled_name(guardian_pid), json.dumps(devs).encode())
    finally:
        os.close(dir_fd)
    if _watchdog_alive(rec):
        with contextlib.suppress(OSError):
            os.kill(rec["watchdog_pid"], signal.SIGUSR1)
    return True


def clean_stale(*, dry_run: bool = False) -> tuple[list[dict[str, Any]], list[str]]:
    """`quiesce cleanup`: for each record whose guardian and watchdog are both dead, thaw
    what the kernel still has frozen of it (the record says it was quiesce's freeze), then
    remove the record. Returns (what was done, errors)."""
    done: list[dict[str, Any]] = []
    errors: list[str] = []
    dir_fd = open_run_dir(create=False)
    if dir_fd is None:
        return done, errors
    try:
        for name in os.listdir(dir_fd):
            m = _TMP.fullmatch(name)
            if m and not dry_run and not pid_alive(int(m.group(1))):
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=dir_fd)  # its writer was killed mid-write
        recs, _ = scan(dir_fd)
        for rec in recs:
            gpid = rec["guardian_pid"]
            if _guardian(rec) != "gone" or _watchdog_alive(rec):
                continue  # alive, or its watchdog still guards it
            spared = _spared(dir_fd, gpid)
            table = MountTable.read()
            failed = False
            for v in rec["volumes"]:
                if v["state"] not in AT_STAKE or v["dev"] in spared:
                    continue
                if dry_run:
                    state = "frozen?"
                else:
                    state, _ = _kernel_state(v["dev"], v["name"], table)
                    if state == "frozen":
                        code = _thaw(v["dev"], v["name"], table)
                        if code not in (0, errno.EINVAL):
                            errors.append(f"could not thaw {v['name']}: errno {code}")
                            failed = True
                            continue
                done.append(
                    {"kind": "guardian-record", "target": f"{v['name']} ({state})",
                     "run": f"dead quiesce guardian {gpid}"}
                )  # fmt: skip
            if dry_run or failed:
                continue
            for name in (record_name(gpid), settled_name(gpid)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=dir_fd)
            if not any(d["run"].endswith(f" {gpid}") for d in done):
                done.append(
                    {"kind": "guardian-record", "target": record_name(gpid),
                     "run": f"dead quiesce guardian {gpid}"}
                )  # fmt: skip
    finally:
        os.close(dir_fd)
    return done, errors


def _thaw(dev: str, name: str, table: MountTable) -> int:
    vol = table.volumes.get(dev)
    if vol is None:
        return errno.ENOENT
    path = name if any(m.mount_point == name for m in vol.mounts) else vol.mount_point
    fd = kernel.open_dir(path)
    try:
        return kernel.thaw_errno(fd)
    finally:
        os.close(fd)


__all__ = ["clean_stale", "gone_guardians", "holder_gone", "mark_thawed", "scan", "survey_gone"]
