"""MariaDB's (and MySQL's) restore drill: ``mariadbd`` on the copy, InnoDB's crash
recovery, then ``CHECK TABLE ... EXTENDED`` on every table (``mariadb-check --extended
--all-databases``).

The server runs with no option file of the origin (``--no-defaults``: it may name live
paths), no networking, a private socket, no binary log and ``--skip-grant-tables`` (the
socket is reachable by root and the server's user only). Recovery time is from the
start until the log says "ready for connections"; what InnoDB replayed comes from its
log (the checkpoint LSN it started from and the LSN it recovered to).
"""

from __future__ import annotations

import os
import re
import shutil
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

CHECKPOINT = re.compile(r"crash recovery from checkpoint LSN=(\d+)")
END = re.compile(r"(?:End of log at LSN=|to LSN=|recovered up to LSN=)(\d+)")
LINES = 12


def tool(name: str, *alt: str) -> str | None:
    for n in (name, *alt):
        found = shutil.which(n) or next(
            (f"{d}/{n}" for d in ("/usr/sbin", "/usr/bin") if os.path.exists(f"{d}/{n}")), None
        )
        if found:
            return found
    return None


def replayed_from_log(text: str) -> tuple[str | None, int | None]:
    start = CHECKPOINT.search(text)
    if not start:
        return ("no redo (shut down cleanly)", 0) if "ready for connections" in text else (
            None, None,
        )  # fmt: skip
    ends = [int(m.group(1)) for m in END.finditer(text)]
    a = int(start.group(1))
    if ends and max(ends) >= a:
        return f"redo log LSN {a} to {max(ends)}", max(ends) - a
    return f"redo log from LSN {a}", None


def _check_failed(out: str) -> list[str]:
    """mariadb-check's lines that are not a table's OK (errors, warnings on a table)."""
    bad = []
    for line in out.splitlines():
        s = line.strip()
        if not s or s.endswith(" OK") or s == "OK":
            continue
        if s.lower().startswith(("note", "status   : ok")):
            continue
        bad.append(s)
    return bad


def drill(target: AppTarget, copy: WritableCopy, *, timeout: float) -> AppDrill:
    r = AppDrill(target.name, "mysql", target.path)
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
    if data is None or not data.is_dir() or not (data / "mysql").is_dir():
        raise RuntimeError(f"no MariaDB/MySQL data directory at {target.path} on the snapshot")
    daemon, check = tool("mariadbd", "mysqld"), tool("mariadb-check", "mysqlcheck")
    if daemon is None or check is None:
        raise RuntimeError("mariadbd (or mysqld) and mariadb-check are not installed here")
    user = owner_of(data)
    check_reachable(data, user)
    work = private_dir(copy.root / f"mysql-{abs(hash(target.path)) % 10**6}", user)
    sock = work / "mysqld.sock"
    argv = [
        daemon, "--no-defaults", f"--datadir={data}", f"--socket={sock}",
        f"--pid-file={work / 'mysqld.pid'}", "--skip-networking", "--skip-grant-tables",
        "--skip-log-bin", "--innodb-buffer-pool-size=64M", f"--tmpdir={work}",
        "--skip-slave-start", "--innodb-flush-log-at-trx-commit=0",
    ]  # fmt: skip
    with server(argv, user, work / "log") as srv:

        def ready() -> bool:
            return sock.exists() and "ready for connections" in srv.log_text()

        try:
            r.recovery_s = srv.wait_ready(ready, timeout, "mariadbd")
        except RuntimeError:
            r.replayed, r.replayed_bytes = replayed_from_log(srv.log_text())
            r.check = "did not start"
            r.detail = srv.tail()
            raise
        r.replayed, r.replayed_bytes = replayed_from_log(srv.log_text())
        left = max(timeout - (time.monotonic() - srv.started), 10.0)
        done = proc.run_bounded(
            [check, f"--socket={sock}", "--all-databases", "--extended"],
            timeout=left,
            merge_stderr=True,
        )
        said = done.stdout.decode(errors="replace")
        bad = _check_failed(said)
        if done.timed_out or done.returncode != 0 or bad:
            r.check = "CHECK TABLE ... EXTENDED: FAILED"
            r.detail = "\n".join(bad[:LINES]) or f"mariadb-check exited {done.returncode}"
            return
        tables = sum(1 for line in said.splitlines() if line.rstrip().endswith("OK"))
        r.check = f"CHECK TABLE ... EXTENDED: {tables} table(s) OK"
        r.ok = True


def datadir_of(path: Path) -> bool:
    """Whether ``path`` looks like a MariaDB/MySQL data directory."""
    return (path / "mysql").is_dir() and any(
        (path / f).exists() for f in ("ibdata1", "aria_log_control", "ib_logfile0")
    )


__all__ = ["datadir_of", "drill", "replayed_from_log"]
