"""PostgreSQL's restore drill: a temporary cluster on the copy, its crash recovery, then
``pg_amcheck --heapallindexed`` over every database.

The cluster gets a configuration of its own (the origin's postgresql.conf may name live
paths: archive_command, ssl files, log directories): no TCP (``listen_addresses = ''``),
a private socket directory, no archiving, no standby, no preloaded libraries; it trusts
its own socket, which only root and the cluster's user can reach. ``pg_wal`` and
tablespace links that point at a volume of the group are repointed into the copy; one
that points outside the group fails the drill (the snapshot does not hold those files,
and the drill must not touch the live ones). The origin's ``postmaster.pid`` and
standby signal files are removed from the copy. Recovery time is from the postmaster's
start until it says "ready" in postmaster.pid; what was replayed comes from its log
("redo starts at" / "redo done at").
"""

from __future__ import annotations

import glob
import os
import random
import re
import time
from pathlib import Path

from quiesce.apps.drills.base import (
    AppDrill,
    AppTarget,
    WritableCopy,
    check_reachable,
    owner_of,
    private_dir,
    server,
)
from quiesce.host import proc

REDO_START = re.compile(r"redo starts at ([0-9A-F]+)/([0-9A-F]+)")
REDO_DONE = re.compile(r"redo done at ([0-9A-F]+)/([0-9A-F]+)")
SETTINGS = {
    "listen_addresses": "",
    "archive_mode": "off",
    "hot_standby": "off",
    "shared_preload_libraries": "",
    "logging_collector": "off",
    "log_destination": "stderr",
    "ssl": "off",
    "shared_buffers": "32MB",
    "max_connections": "20",
    "max_wal_senders": "0",
    "max_replication_slots": "0",
    "wal_level": "minimal",
    "fsync": "off",  # a throwaway copy: nothing it writes must survive a crash
    "full_page_writes": "off",
    "synchronous_commit": "off",
}


def lsn(hi: str, lo: str) -> int:
    return (int(hi, 16) << 32) | int(lo, 16)


def replayed_from_log(text: str) -> tuple[str | None, int | None]:
    """What recovery said it replayed: ('0/1A2B3C8 to 0/2F00010', bytes), or 'nothing'."""
    if "redo is not required" in text:
        return "no WAL (shut down cleanly)", 0
    start, done = REDO_START.search(text), REDO_DONE.search(text)
    if start and done:
        a, b = lsn(*start.groups()), lsn(*done.groups())
        return f"WAL {start.group(1)}/{start.group(2)} to {done.group(1)}/{done.group(2)}", b - a
    return None, None


def bin_dir(data: Path) -> Path | None:
    """The server binaries of the data directory's major version (Debian's layout, then
    pg_config's)."""
    major = (data / "PG_VERSION").read_text().strip()
    for cand in (f"/usr/lib/postgresql/{major}/bin", f"/usr/pgsql-{major}/bin"):
        if os.path.exists(os.path.join(cand, "postgres")):
            return Path(cand)
    p = proc.run_tool("pg_config", "--bindir") if os.path.exists("/usr/bin/pg_config") else None
    if p is not None and p.returncode == 0:
        d = Path(p.stdout.strip())
        pgv = proc.run_tool(str(d / "postgres"), "--version") if (d / "postgres").exists() else None
        if pgv is not None and re.search(rf"\b{re.escape(major)}\.", pgv.stdout):
            return d
    return None


def _repoint(link: Path, copy: WritableCopy, what: str, result: AppDrill) -> None:
    """A link (pg_wal, a tablespace) that names an origin path: into the copy, or fail."""
    target = os.readlink(link)
    inside = copy.locate(target) if os.path.isabs(target) else link.parent / target
    if inside is None or not os.path.lexists(inside):
        raise RuntimeError(
            f"{what} points to {target}, which is not on the snapshot (a volume of the "
            "group is missing): the copy cannot recover"
        )
    st = os.lstat(link)
    os.unlink(link)
    os.symlink(str(inside), link)
    os.lchown(link, st.st_uid, st.st_gid)
    result.notes.append(f"{what} -> {inside}")


def drill(target: AppTarget, copy: WritableCopy, *, timeout: float) -> AppDrill:
    """Start a cluster on the copy of ``target.path``, let it recover, check it, kill it."""
    r = AppDrill(target.name, "postgresql", target.path)
    t0 = time.monotonic()
    try:
        _drill(r, target, copy, timeout)
    except (RuntimeError, OSError) as e:
        r.ok = False
        r.detail = f"{e}" + (f"\n{r.detail}" if r.detail else "")
    r.duration_s = time.monotonic() - t0
    return r


def _drill(r: AppDrill, target: AppTarget, copy: WritableCopy, timeout: float) -> None:
    data = copy.locate(target.path)
    if data is None or not (data / "PG_VERSION").is_file():
        raise RuntimeError(f"no PostgreSQL data directory at {target.path} on the snapshot")
    bins = bin_dir(data)
    if bins is None:
        major = (data / "PG_VERSION").read_text().strip()
        raise RuntimeError(f"PostgreSQL {major}'s server binaries are not installed here")
    user = owner_of(data)
    check_reachable(data, user)
    for link in [data / "pg_wal", *sorted((data / "pg_tblspc").glob("*"))]:
        if link.is_symlink():
            _repoint(link, copy, str(link.relative_to(data)), r)
    for name in ("postmaster.pid", "standby.signal", "recovery.signal"):
        if (data / name).exists():
            (data / name).unlink()
            if name != "postmaster.pid":
                r.notes.append(f"removed {name}: the drill recovers to the snapshot's end")
    work = private_dir(copy.root / f"pg-{len(glob.glob(str(copy.root / 'pg-*')))}", user)
    conf = work / "postgresql.conf"
    conf.write_text("# quiesce restore drill: settings are on the command line\n")
    hba = work / "pg_hba.conf"
    hba.write_text("local all all trust\n")
    ident = work / "pg_ident.conf"
    ident.write_text("")
    for f in (conf, hba, ident):
        os.chown(f, user.pw_uid, user.pw_gid)
    port = random.randint(20000, 60000)
    settings = SETTINGS | {
        "config_file": str(conf), "hba_file": str(hba), "ident_file": str(ident),
        "port": str(port), "unix_socket_directories": str(work),
        "external_pid_file": "", "archive_command": "", "restore_command": "",
        "primary_conninfo": "",
    }  # fmt: skip
    argv = [str(bins / "postgres"), "-D", str(data)]
    for k, v in settings.items():
        argv += ["-c", f"{k}={v}"]
    pidfile = data / "postmaster.pid"

    def ready() -> bool:
        try:
            lines = pidfile.read_text().splitlines()
        except OSError:
            return False
        return len(lines) >= 8 and lines[7].strip() == "ready"

    with server(argv, user, work / "log") as srv:
        try:
            r.recovery_s = srv.wait_ready(ready, timeout, "postgres")
        except RuntimeError:
            r.replayed, r.replayed_bytes = replayed_from_log(srv.log_text())
            r.check = "did not start"
            r.detail = srv.tail()
            raise
        r.replayed, r.replayed_bytes = replayed_from_log(srv.log_text())
        left = max(timeout - (time.monotonic() - srv.started), 10.0)
        amcheck = [
            str(bins / "pg_amcheck"), "-h", str(work), "-p", str(port), "-U", user.pw_name,
            "--all", "--heapallindexed", "--install-missing", "--no-password",
        ]  # fmt: skip
        done = proc.run_bounded(amcheck, timeout=left, merge_stderr=True)
        said = done.stdout.decode(errors="replace").strip()
        if done.returncode != 0 and "does not exist" in said and user.pw_name != "postgres":
            amcheck[amcheck.index("-U") + 1] = "postgres"
            done = proc.run_bounded(amcheck, timeout=left, merge_stderr=True)
            said = done.stdout.decode(errors="replace").strip()
        if done.timed_out or done.returncode != 0:
            r.check = "pg_amcheck --heapallindexed: FAILED"
            lines = said.splitlines()
            r.detail = "\n".join(lines[:LINES]) or f"pg_amcheck exited {done.returncode}"
            return
        r.check = "pg_amcheck --heapallindexed --all: no corruption"
        r.ok = True


LINES = 12

__all__ = ["drill", "replayed_from_log"]
