"""`quiesce status` and `quiesce thaw`: what is frozen, and undoing it.

The commands people run when something is stuck, and that scripts poll: they print
through :mod:`quiesce.cli.plain` (no rich) and import no typer, so that the entry point
(:mod:`quiesce.cli.entry`) can serve them without loading the rest of the CLI. The typer
commands call the same functions: both paths behave alike, exit codes included.
"""

from __future__ import annotations

import errno
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from quiesce.cli.plain import emit_json, line, print_error, say, table
from quiesce.errors import FreezeExpired, GuardianError, NotFrozen, PermissionDenied, QuiesceError
from quiesce.freezing import guardian
from quiesce.freezing.guardian import expedite
from quiesce.freezing.guardian.client import THAW_S
from quiesce.sys import kernel
from quiesce.sys.mounts import MountTable, resolve


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
            if not any(v["dev"] == dev and v["state"] == "frozen" for v in st["volumes"]):
                continue
            pid = st["pid"]
            try:
                reply = guardian.ask(pid, {"op": "thaw", "devs": [dev]}, timeout=THAW_S)
            except GuardianError as e:
                return _own_fithaw(path, target, f"guardian {pid} did not answer: {e.message}")
            if reply.get("ok"):
                return {"path": path, "mount_point": name, "thawed_by": f"guardian {pid}"}
            if reply.get("expired"):
                raise _expired_error(name, reply["expired"])
            raise kernel.error_for(reply.get("errno") or errno.EIO, "thaw", name, fstype)
        why = "no guardian held it"
        if seen.silent:
            why += "; not answering: " + ", ".join(
                f"guardian {p} ({w})" for p, w in sorted(seen.silent.items())
            )
        try:
            return _own_fithaw(path, target, why)
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


def status(as_json: bool = False, *, state: str | Path | None = None) -> int:
    """What quiesce holds frozen, what its guardians thawed lately, the jobs running now."""
    from quiesce.state.locks import running

    try:
        if os.geteuid() != 0:
            raise PermissionDenied(
                "cannot tell what quiesce has frozen: only root can ask its guardians",
                "run `quiesce status` as root",
            )
        jobs = running(state)  # refused (exit 2) like cleanup: a dir others could write
        seen = guardian.survey()
    except QuiesceError as e:
        return _fail(e, as_json)
    rcu = expedite.holders()
    if as_json:
        emit_json(
            {
                "guardians": seen.active,
                "history": seen.finished,
                "not_answering": [{"pid": p, "why": w} for p, w in sorted(seen.silent.items())],
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
    if not seen.active:
        line("nothing is frozen by quiesce")
    else:
        rows = []
        for s in seen.active:
            ctl = f"{s['controller_pid']}" + ("" if s["controller_alive"] else " (gone)")
            if s["detached"]:
                ctl += " (held)"
            for v in s["volumes"]:
                rows.append((
                    v["mount_point"], v["state"], str(s["pid"]), ctl,
                    f"{v['frozen_for_s']:.1f}s" if v["frozen_for_s"] is not None else "-",
                    f"{s['deadline_remaining_s']:.1f}s" if s["deadline_remaining_s"] else "-",
                    f"{s['lease_remaining_s']:.1f}s" if s["lease_remaining_s"] else "-",
                ))  # fmt: skip
        line(table(STATUS_COLUMNS, rows))
    now = time.time()
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


__all__ = ["STATUS_COLUMNS", "status", "thaw", "thaw_one_volume"]
