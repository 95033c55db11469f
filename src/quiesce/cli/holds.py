"""`quiesce status` and `quiesce thaw`: what is frozen, and undoing it.

The commands people run when something is stuck, and that scripts poll: they print
through :mod:`quiesce.cli.plain` (no rich) and import no typer, so that the entry point
(:mod:`quiesce.cli.entry`) can serve them without loading the rest of the CLI. The typer
commands call the same functions: both paths behave alike, exit codes included.
"""

from __future__ import annotations

import errno
import os
import shlex
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

from quiesce.cli.plain import emit_json, line, print_error, say, table
from quiesce.errors import (
    FreezeExpired,
    FreezePending,
    GuardianError,
    NotFrozen,
    PermissionDenied,
    QuiesceError,
)
from quiesce.freezing import guardian
from quiesce.freezing.guardian import expedite, records
from quiesce.freezing.guardian.client import THAW_S, GuardianStatus, VolumeStatus, gone_guardians
from quiesce.host import kernel
from quiesce.host.mounts import MountTable, resolve


def _fail(e: QuiesceError, as_json: bool) -> int:
    data = e.to_dict()
    if as_json:
        emit_json(data)
    print_error(data)
    return int(e.exit_code)


def thaw(paths: list[str], as_json: bool = False) -> int:
    """Thaw each path; returns the exit code (the first failure's, else 0)."""
    try:
        mounts = MountTable.read()
    except QuiesceError as e:
        return _fail(e, as_json)
    results, first_error = [], None
    thawed: dict[str, dict[str, Any]] = {}  # dev -> its result: one thaw per volume
    for p in paths:
        vol = mounts.volume_of_path(os.path.realpath(p)) if os.path.exists(p) else None
        if vol is not None and vol.dev in thawed:  # a bind mount of a volume just thawed
            first = thawed[vol.dev]
            results.append(first | {"path": p, "thawed_by": f"with {first['path']}"})
            continue
        try:
            results.append(thaw_one_volume(p, mounts))
            if vol is not None:
                thawed[vol.dev] = results[-1]
        except QuiesceError as e:
            results.append({"path": p, "error": e.message, "exit_code": e.exit_code})
            first_error = first_error or e
            if not as_json:
                say("quiesce:", "bold red", e.message)
                if e.hint:
                    say("hint:", "dim", e.hint)
    if as_json:
        emit_json({"results": results})
    else:
        for r in results:
            if "error" not in r:
                line(f"thawed: {r['mount_point']} ({r['thawed_by']})")
    return int(first_error.exit_code) if first_error is not None else 0


def thaw_one_volume(path: str, mounts: MountTable) -> dict[str, Any]:
    """Thaw through the guardian on duty that holds it frozen, else with a plain FITHAW.

    Only guardians whose socket is root's and whose answer fits are believed; one that
    does not answer in time is passed over, and our own FITHAW says so. A finished
    guardian is history: it is never asked to thaw, and its story is told only when the
    volume turns out not to be frozen."""
    target = resolve(path, mounts)
    try:
        dev = target.volume.dev
        name = target.mount.mount_point
        fstype = target.mount.fstype
        seen = guardian.survey()
        for st in seen.active:
            held = ("frozen", "freezing")
            if not any(v["dev"] == dev and v["state"] in held for v in st["volumes"]):
                continue
            pid = st["pid"]
            try:
                reply = guardian.thaw(pid, [dev], timeout=THAW_S)
            except GuardianError as e:
                return _own_fithaw(path, target, f"guardian {pid} did not answer: {e.message}")
            if reply.get("ok"):
                return {"path": path, "mount_point": name, "thawed_by": f"guardian {pid}"}
            if reply.get("expired"):
                raise _expired_error(name, reply["expired"])
            if reply.get("pending"):
                secs = reply.get("freezing_for_s") or 0.0
                raise FreezePending(
                    f"{name}: the freeze is still being set up by the kernel (for {secs:.1f} s: "
                    f"it waits for writes in flight); guardian {pid} thaws it the moment it "
                    "completes"
                )
            if reply.get("checking"):
                raise GuardianError(
                    f"{name}: guardian {pid} is still checking that the freeze is its own "
                    f"({THAW_S:g} s: someone else's FITHAW on this machine is being judged)",
                    "run `quiesce thaw` again in a moment; the guardian's deadline thaws it "
                    "in any case",
                )
            if "errno" not in reply:
                raise GuardianError(
                    f"{name}: guardian {pid} did not thaw it: {reply.get('error')}",
                    "run `quiesce status` to see who holds it",
                )
            raise kernel.error_for(reply["errno"] or errno.EIO, "thaw", name, fstype)
        why = "no guardian held it"
        dead = records.holder_gone(dev)
        if dead is not None:
            why = f"guardian {dead['guardian_pid']} is gone (killed); the freeze was quiesce's"
        if seen.silent:
            why += "; not answering: " + ", ".join(
                f"guardian {p} ({w})" for p, w in sorted(seen.silent.items())
            )
        try:
            done = _own_fithaw(path, target, why)
            if dead is not None:  # its watchdog must not probe (and thaw) a refreeze
                records.mark_thawed(dead["guardian_pid"], [dev])
            return done
        except NotFrozen:
            story = _history_of(dev, seen.finished)
            if story is not None:
                raise _expired_error(name, story) from None
            raise
    finally:
        target.close()


def _own_fithaw(path: str, target: Any, why: str) -> dict[str, Any]:
    kernel.fithaw(target.fd, target.mount.mount_point, target.mount.fstype)
    return {"path": path, "mount_point": target.mount.mount_point, "thawed_by": f"FITHAW ({why})"}


def _history_of(dev: str, finished: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The newest finished guardian's expiry that thawed ``dev`` and was not superseded
    by a later freeze of it."""
    best = None
    for st in finished:
        if any(v["dev"] == dev and not v.get("superseded") for v in st["volumes"]):
            ex = st["expired"]
            thawed = ex and any(isinstance(t, dict) and t.get("dev") == dev for t in ex["thawed"])
            if thawed and (best is None or (ex.get("at") or 0) > (best.get("at") or 0)):
                best = ex
    return best


def _expired_error(name: str, expired: dict[str, Any]) -> FreezeExpired:
    when = time.strftime("%H:%M:%S", time.localtime(expired.get("at", 0)))
    return FreezeExpired(
        f"{name} was already thawed by the guardian at {when} ({expired.get('reason')})"
    )


STATUS_COLUMNS = ("volume", "state", "guardian", "controller", "frozen for", "deadline in", "lease")
WAITS = "the kernel waits for writes in flight"


def state_text(st: GuardianStatus, v: VolumeStatus, now: float) -> str:
    """The state column: the kernel's truth in words (``frozen — guardian 812 is gone
    (killed)``, ``freezing for 12.4 s``, ``lost — thawed by someone else``)."""
    state = v["state"]
    if state == "frozen" and st.get("gone"):
        why = st.get("gone_reason")
        return f"frozen — guardian {st['pid']} is gone" + (f" ({why})" if why else "")
    if state == "freezing":
        secs = v.get("freezing_for_s")
        if secs is None and v.get("freezing_since"):
            secs = now - v["freezing_since"]  # type: ignore[operator]
        return f"freezing for {secs:.1f} s" if secs is not None else "freezing"
    if state == "lost":
        return "lost — thawed by someone else"
    return state


def detail_lines(st: GuardianStatus, v: VolumeStatus, now: float) -> list[str]:
    """What an admin does about a volume that needs it: the thaw command for a freeze
    whose guardian is gone, the processes a pending FIFREEZE waits for."""
    mp = v["mount_point"]
    if v["state"] == "frozen" and st.get("gone"):
        return [f"{mp}: {state_text(st, v, now)}; thaw it: quiesce thaw {shlex.quote(mp)}"]
    if v["state"] == "lost":
        why = f" ({v['lost']})" if v.get("lost") else ""
        return [
            f"{mp}: someone else thawed it while guardian {st['pid']} held it{why}; quiesce "
            "will not thaw it again (the snapshot is only crash-consistent)"
        ]
    if v["state"] != "freezing":
        return []
    out = [f"{mp}: {state_text(st, v, now)}: {WAITS}"]
    blockers = v.get("blockers") or []
    holding = [b for b in blockers if b.get("holds_write")]
    for b in holding or blockers:
        out.append(f"  blocked by {_describe(b)}")
    if not blockers:
        out.append(
            "  no process has writes open on it (a flush, or the filesystem that holds its image)"
        )
    out.append(
        "  quiesce thaws it the moment the freeze completes; ending a blocker lets it complete "
        "(--end-blockers-after does it for unprivileged ones)"
    )
    return out


def _describe(b: dict[str, Any]) -> str:
    what = "; ".join(b.get("in_flight") or []) or ", ".join(b.get("files") or []) or "-"
    d = b.get("d_threads") or []
    ds = f", D threads {','.join(map(str, d))}" if d else ""
    return (
        f"pid {b['pid']} (uid {b['uid']}) {b['comm']} [{b['state']} {b.get('wchan') or '-'}"
        f"{ds}]: {what}"
    )


def _add_blockers(active: list[dict[str, Any]]) -> None:
    """Each freezing volume gets the processes its FIFREEZE waits for (from /proc)."""
    from quiesce.host.blockers import find_blockers

    for s in active:
        for v in s["volumes"]:
            if v.get("state") == "freezing":
                v["blockers"] = [b.to_dict() for b in find_blockers(v["dev"], exclude={s["pid"]})]


def status(as_json: bool = False, *, state: str | Path | None = None) -> int:
    """What quiesce holds frozen, what its guardians thawed lately, the jobs running now."""
    from quiesce.state.locks import running

    try:
        if os.geteuid() != 0:
            raise PermissionDenied(
                "cannot tell what quiesce has frozen: only root can ask its guardians",
                "run `quiesce status` as root",
            )
        jobs = running(
            Path(state) if state is not None else None
        )  # refused (exit 2) like cleanup: a dir others could write
        seen = guardian.survey()
        gone, refused = records.survey_gone()
        recorded = {g["pid"] for g in gone}
        sockets_left = [
            p for p in gone_guardians() if p not in {s["pid"] for s in seen.active} | recorded
        ]
    except QuiesceError as e:
        return _fail(e, as_json)
    _add_blockers(seen.active)
    rcu = expedite.holders()
    if as_json:
        emit_json(
            {
                "guardians": seen.active,
                "history": seen.finished,
                "not_answering": [{"pid": p, "why": w} for p, w in sorted(seen.silent.items())],
                "gone": gone,
                "refused_records": refused,
                "sockets_left": sockets_left,
                "running": [asdict(j) for j in jobs],
                "rcu_expedited": rcu,
            }
        )
        return 0
    rcu_line = expedite.describe(rcu)
    if rcu_line:
        dead = not any(h["alive"] for h in (rcu or {}).get("holders", []))
        say("warning:" if dead else "note:", "yellow", rcu_line)
    for j in jobs:
        since = time.strftime("%H:%M:%S", time.localtime(j.since))
        line(f"job {j.job}: {j.what} running since {since} (pid {j.pid})")
    for p, w in sorted(seen.silent.items()):
        say("warning:", "yellow", f"guardian {p} did not answer: {w}")
    for name, why in sorted(refused.items()):
        say("warning:", "yellow", f"record {name} not believed: {why}")
    for p in sockets_left:
        say(
            "warning:",
            "yellow",
            f"guardian {p} is gone (killed: its socket is left) and nothing answers for it: "
            "a volume it froze may still be frozen (`fsfreeze -u MOUNT` thaws one)",
        )
    held_by_gone = _gone_lines(gone)
    for text in held_by_gone:
        line(text)
    now = time.time()
    if not seen.active and not held_by_gone:
        line("nothing is frozen by quiesce")
    else:
        rows, details = [], []
        for s in seen.active:
            ctl = f"{s['controller_pid']}" + ("" if s["controller_alive"] else " (gone)")
            if s["detached"]:
                ctl += " (held)"
            st = cast(GuardianStatus, s)  # checked by protocol.check_status
            for v in st["volumes"]:
                rows.append((
                    v["mount_point"], state_text(st, v, now), str(s["pid"]), ctl,
                    f"{v['frozen_for_s']:.1f}s" if v["frozen_for_s"] is not None else "-",
                    f"{s['deadline_remaining_s']:.1f}s" if s["deadline_remaining_s"] else "-",
                    f"{s['lease_remaining_s']:.1f}s" if s["lease_remaining_s"] else "-",
                ))  # fmt: skip
                details += detail_lines(st, v, now)
        line(table(STATUS_COLUMNS, rows))
        for d in details:
            line(d)
    for s in seen.finished:
        ex = s["expired"] or {}
        at = ex.get("at") or now
        when = time.strftime("%H:%M:%S", time.localtime(at))
        for t in ex.get("thawed", []):
            if not isinstance(t, dict):
                continue
            bad = "" if t.get("errno") in (0, 22) else f", FITHAW FAILED (errno {t.get('errno')})"
            line(
                f"history: {t.get('volume')} thawed by {ex.get('reason')} at {when}, "
                f"{now - at:.0f} s ago (guardian {s['pid']}){bad}"
            )
    return 0


def _gone_lines(gone: list[dict[str, Any]]) -> list[str]:
    """One line per volume a killed guardian left frozen (the kernel's word) or in FIFREEZE."""
    out = []
    for g in gone:
        wd = f"; its watchdog {g['watchdog_pid']} thaws it" if g["watchdog_alive"] else ""
        if wd and g.get("deadline_wall"):
            wd += " at " + time.strftime("%H:%M:%S", time.localtime(g["deadline_wall"]))
        for v in g["volumes"]:
            mp = v["mount_point"]
            if v["state"] == "frozen":
                out.append(
                    f"{mp}: frozen — guardian {g['pid']} is gone (killed); "
                    f"thaw with: quiesce thaw {mp}{wd}"
                )
            elif v["state"] == "freezing":
                out.append(
                    f"{mp}: freezing — guardian {g['pid']} was killed inside FIFREEZE; "
                    f"the kernel completes it once the writes in flight end{wd}"
                )
    return out


__all__ = ["STATUS_COLUMNS", "detail_lines", "state_text", "status", "thaw", "thaw_one_volume"]
