"""Databases on fleet hosts: a PostgreSQL primary on one, MariaDB on another (issue 13).

Each server runs *inside* its host's mount namespace (started through the host's held
namespace fd), as its own user, with its data directory on the host's loop filesystem
and its socket in a run directory under /tmp that the test process also sees (a unix
socket is found by inode: the machine's /tmp is the same in every namespace). No TCP:
PostgreSQL has ``listen_addresses=''``, MariaDB ``--skip-networking``. Every server gets
a parent-death signal (``setpriv --pdeathsig``), so a killed test leaves none running.

The load hops between them: row n goes to database n mod 2 (0: PostgreSQL, 1: MariaDB)
and is inserted only after row n-1 was committed. So the union of two snapshots taken at
one instant holds a prefix 1..k of the rows; a pair that holds row n without row n-1 was
not taken at one instant. :func:`restore_postgres` / :func:`restore_mariadb` start each
database on a copy of its snapshot (crash recovery), check it (pg_amcheck, CHECK TABLE)
and read its rows back.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from helpers.dbtools import mariadb_bin, pg_bin

from quiesce_testing.ground import Host

PG_PORT = 5432  # names the socket only (no TCP)


def missing() -> str | None:
    """Why the database tests cannot run here (None: they can)."""
    import importlib.util

    lacking = []
    if pg_bin() is None:
        lacking.append("PostgreSQL server binaries")
    if mariadb_bin() is None:
        lacking.append("MariaDB server binaries")
    for mod, pkg in (("psycopg", "psycopg"), ("pymysql", "PyMySQL")):
        if importlib.util.find_spec(mod) is None:
            lacking.append(pkg)
    if not lacking:
        return None
    return (
        f"{', '.join(lacking)} not installed: run `bash scripts/install.sh --test` "
        "(or scripts/db-setup.sh)"
    )


def run_dir() -> Path:
    """Sockets, logs and restores: root-owned 0755 under /tmp (the servers' users traverse
    it; the fleet's own temp dir is 0700)."""
    d = Path(tempfile.mkdtemp(prefix="qfleetdb-", dir="/tmp"))
    d.chmod(0o755)
    for sub, owner in (("pg", "postgres"), ("my", "mysql")):
        (d / sub).mkdir(mode=0o755)
        shutil.chown(d / sub, owner, owner)
    return d


def _as(user: str) -> list[str]:
    """setpriv to ``user`` with a parent-death signal (no forking runuser in between)."""
    return ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups",
            "--pdeathsig", "TERM", "--"]  # fmt: skip


def _wait_socket(path: Path, p: subprocess.Popen[Any], log: Path, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        if p.poll() is not None or time.monotonic() > end:
            text = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"server did not come up (rc={p.poll()}): {text}")
        time.sleep(0.02)


def _stop(p: subprocess.Popen[Any] | None, sig: int) -> None:
    if p is None or p.poll() is not None:
        return
    p.send_signal(sig)
    try:
        p.wait(timeout=60)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(timeout=10)


# -- the servers on the hosts ---------------------------------------------------------


@dataclass
class HostPostgres:
    """A PostgreSQL primary inside ``host``'s namespace; data on its loop filesystem."""

    host: Host
    run: Path  # run_dir()
    proc: subprocess.Popen[str] | None = None
    init_s: float = 0.0

    @property
    def data(self) -> str:
        return f"{self.host.data.mountpoint}/pgdata"

    @property
    def sock(self) -> Path:
        return self.run / "pg"

    @property
    def dsn(self) -> str:
        return f"host={self.sock} port={PG_PORT} user=postgres dbname=postgres"

    def start(self) -> None:
        bin_dir = pg_bin()
        assert bin_dir is not None
        t0 = time.monotonic()
        h = self.host
        h.run("install", "-d", "-o", "postgres", "-g", "postgres", "-m", "0700", self.data)
        h.run(*_as("postgres"), str(bin_dir / "initdb"), "-D", self.data, "-A", "trust",
              "-U", "postgres", "--no-sync", "--no-instructions", timeout=120)  # fmt: skip
        self.init_s = time.monotonic() - t0
        log = self.run / "pg" / "host.log"
        with open(log, "ab") as out:
            self.proc = h.popen(
                *_as("postgres"), str(bin_dir / "postgres"), "-D", self.data,
                "-k", str(self.sock), "-p", str(PG_PORT), "-c", "listen_addresses=",
                "-c", "shared_buffers=16MB", "-c", "max_wal_size=64MB", "-c", "fsync=on",
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        _wait_socket(self.sock / f".s.PGSQL.{PG_PORT}", self.proc, log)

    def stop(self) -> None:
        _stop(self.proc, signal.SIGINT)  # fast shutdown


@dataclass
class HostMariadb:
    """MariaDB inside ``host``'s namespace; datadir on its loop filesystem."""

    host: Host
    run: Path
    proc: subprocess.Popen[str] | None = None
    init_s: float = 0.0

    @property
    def data(self) -> str:
        return f"{self.host.data.mountpoint}/mysql"

    @property
    def sock(self) -> Path:
        return self.run / "my" / "host.sock"

    def start(self) -> None:
        tools = mariadb_bin()
        assert tools is not None
        t0 = time.monotonic()
        h = self.host
        h.run("install", "-d", "-o", "mysql", "-g", "mysql", "-m", "0750", self.data)
        h.run(*_as("mysql"), tools["mariadb-install-db"], "--no-defaults",
              f"--datadir={self.data}", "--auth-root-authentication-method=normal",
              "--skip-test-db", "--skip-name-resolve", timeout=120)  # fmt: skip
        self.init_s = time.monotonic() - t0
        log = self.run / "my" / "host.err"
        self.proc = h.popen(*_as("mysql"), *mariadbd_args(tools, self.data, self.sock, log),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
        _wait_socket(self.sock, self.proc, log)

    def stop(self) -> None:
        _stop(self.proc, signal.SIGTERM)


def mariadbd_args(tools: dict[str, str], data: str, sock: Path, log: Path) -> list[str]:
    return [tools["mariadbd"], "--no-defaults", f"--datadir={data}", f"--socket={sock}",
            f"--pid-file={sock.with_suffix('.pid')}", f"--log-error={log}",
            "--skip-networking", "--innodb-buffer-pool-size=16M",
            "--innodb-log-file-size=8M", "--skip-log-bin",
            "--innodb-flush-log-at-trx-commit=1"]  # fmt: skip


# -- the load -------------------------------------------------------------------------


@dataclass
class HoppingRows:
    """Row n into PostgreSQL if n is even, MariaDB if odd; each after n-1 committed."""

    pg: HostPostgres
    my: HostMariadb
    acked: int = 0
    ack_times: list[float] = field(default_factory=list)
    error: BaseException | None = None

    def __post_init__(self) -> None:
        import psycopg
        import pymysql

        self.pgc = psycopg.connect(self.pg.dsn, autocommit=True)
        self.pgc.execute("CREATE TABLE rec (n int PRIMARY KEY, pad text)")
        self.myc = pymysql.connect(unix_socket=str(self.my.sock), user="root", autocommit=True)
        with self.myc.cursor() as cur:
            cur.execute("CREATE DATABASE app")
            cur.execute("CREATE TABLE app.rec (n INT PRIMARY KEY, pad TEXT) ENGINE=InnoDB")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hopping-rows", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                n = self.acked + 1
                if n % 2 == 0:
                    self.pgc.execute("INSERT INTO rec VALUES (%s, repeat('x', 200))", (n,))
                else:
                    with self.myc.cursor() as cur:
                        cur.execute("INSERT INTO app.rec VALUES (%s, REPEAT('x', 200))", (n,))
                self.ack_times.append(time.monotonic())
                self.acked = n
        except BaseException as e:
            self.error = e

    def wait_for(self, rows: int, timeout: float = 30) -> None:
        target, end = self.acked + rows, time.monotonic() + timeout
        while self.acked < target:
            if self.error or time.monotonic() > end:
                raise RuntimeError(f"load stalled at {self.acked}: {self.error!r}")
            time.sleep(0.002)

    def acked_before(self, t: float) -> int:
        return sum(1 for at in list(self.ack_times) if at < t)

    def rate(self) -> float:
        """Rows per second over the last (up to) 200 rows."""
        t = list(self.ack_times[-200:])
        return (len(t) - 1) / (t[-1] - t[0]) if len(t) > 1 and t[-1] > t[0] else 0.0

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        for c in (self.pgc, self.myc):
            with contextlib.suppress(Exception):
                c.close()
        if self.error:
            raise RuntimeError(f"hopping rows failed: {self.error!r}")


# -- restore and check ----------------------------------------------------------------


def restore_postgres(snap: Path, work: Path, port: int) -> tuple[list[int], str]:
    """Start PostgreSQL on a copy of ``snap`` (a copy of the host's volume): it must recover;
    pg_amcheck must find nothing; returns the rows' n and pg_amcheck's account."""
    import psycopg

    bin_dir = pg_bin()
    assert bin_dir is not None
    data = work / "pgdata"
    subprocess.run(["cp", "-a", str(snap / "pgdata"), str(data)], check=True, timeout=120)
    (data / "postmaster.pid").unlink(missing_ok=True)  # the origin's
    subprocess.run(["chown", "-R", "postgres:postgres", str(work)], check=True)
    log = work / "pg.log"
    with open(log, "ab") as out:
        p = subprocess.Popen(
            [*_as("postgres"), str(bin_dir / "postgres"), "-D", str(data), "-k", str(work),
             "-p", str(port), "-c", "listen_addresses=", "-c", "shared_buffers=16MB"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        _wait_socket(work / f".s.PGSQL.{port}", p, log)
        dsn = f"host={work} port={port} user=postgres dbname=postgres"
        for _ in range(300):  # the socket appears before recovery ends
            try:
                with psycopg.connect(dsn) as c:
                    rows = [n for (n,) in c.execute("SELECT n FROM rec ORDER BY n")]
                break
            except psycopg.OperationalError:
                time.sleep(0.05)
        else:
            raise RuntimeError(f"restored PostgreSQL never accepted connections: {log}")
        chk = subprocess.run(
            [str(bin_dir / "pg_amcheck"), "-h", str(work), "-p", str(port), "-U", "postgres",
             "--install-missing", "--heapallindexed", "-d", "postgres"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        if chk.returncode != 0:
            raise AssertionError(f"pg_amcheck: rc={chk.returncode} {chk.stdout}{chk.stderr}")
        recovered = "redo done" in log.read_text(errors="replace")
        return rows, f"pg_amcheck clean, crash recovery {'ran' if recovered else 'not needed'}"
    finally:
        _stop(p, signal.SIGINT)


def restore_mariadb(snap: Path, work: Path) -> tuple[list[int], str]:
    """Start MariaDB on a copy of ``snap``: InnoDB recovers; CHECK TABLE must say OK."""
    import pymysql

    tools = mariadb_bin()
    assert tools is not None
    data = work / "mysql"
    subprocess.run(["cp", "-a", str(snap / "mysql"), str(data)], check=True, timeout=120)
    subprocess.run(["chown", "-R", "mysql:mysql", str(work)], check=True)
    sock, log = work / "my.sock", work / "my.err"
    p = subprocess.Popen([*_as("mysql"), *mariadbd_args(tools, str(data), sock, log)],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        _wait_socket(sock, p, log)
        with pymysql.connect(unix_socket=str(sock), user="root") as c, c.cursor() as cur:
            cur.execute("CHECK TABLE app.rec EXTENDED")
            status = [r[3] for r in cur.fetchall() if r[2] == "status"]
            if status != ["OK"]:
                raise AssertionError(f"CHECK TABLE app.rec: {status}")
            cur.execute("SELECT n FROM app.rec ORDER BY n")
            rows = [n for (n,) in cur.fetchall()]
        return rows, "CHECK TABLE OK"
    finally:
        _stop(p, signal.SIGTERM)


@dataclass
class Restored:
    pg: list[int]
    my: list[int]
    notes: list[str]

    @property
    def union(self) -> list[int]:
        return sorted(self.pg + self.my)

    @property
    def prefix(self) -> bool:
        """The union is 1..k (each row after the one before it: one instant)."""
        return self.union == list(range(1, len(self.union) + 1))

    @property
    def holes(self) -> int:
        """Rows missing below the highest one present (0 for a consistent pair)."""
        u = self.union
        return (u[-1] - len(u)) if u else 0


def restore_pair(pg_snap: Path, my_snap: Path, base: Path, port: int) -> Restored:
    """Both databases restored (in parallel: they are independent) and read back."""
    work = Path(tempfile.mkdtemp(prefix="restore-", dir=base))
    work.chmod(0o755)
    (work / "pg").mkdir()
    (work / "my").mkdir()
    out: dict[str, Any] = {}

    def one(key: str, fn: Any, *a: Any) -> None:
        try:
            out[key] = fn(*a)
        except BaseException as e:
            out[key] = e

    t = threading.Thread(target=one, args=("my", restore_mariadb, my_snap, work / "my"))
    t.start()
    one("pg", restore_postgres, pg_snap, work / "pg", port)
    t.join(timeout=180)
    try:
        for key in ("pg", "my"):
            if isinstance(out.get(key), BaseException):
                raise out[key]
        pg_rows, pg_note = out["pg"]
        my_rows, my_note = out["my"]
        assert all(n % 2 == 0 for n in pg_rows) and all(n % 2 == 1 for n in my_rows)
        return Restored(pg_rows, my_rows, [pg_note, my_note])
    finally:
        shutil.rmtree(work, ignore_errors=True)
