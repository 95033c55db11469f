"""Levels named by what a restore needs, and every writer's files proven on the group,
against a real PostgreSQL cluster on loop filesystems (issue 19).

The cluster's data directory lives on volume A (an ext4 image on an XFS reflink host);
volume B holds nothing of it. The label test starts a writable copy of the snapshot and
reads PostgreSQL's own log: it runs crash recovery (so ``clean`` would have been false:
the negative control of the label) and replays no more WAL than the report's bound.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.dbtools import need, open_loops, pg_bin, shared_dir, start_row_writer
from helpers.jobtools import mounted_image
from test_writers_postgresql import Cluster

pytestmark = pytest.mark.timeout(300)

PORT, COPY_PORT, DEAD_PORT = 54395, 54396, 54397


def _quiesce(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "quiesce", *args], capture_output=True, text=True, timeout=240
    )


class Pg:
    """One cluster for the module: data on ``a``; ``b`` is another volume."""

    def __init__(self, cluster: Cluster, a: object, b: object, outer: object, run_dir: Path):
        self.cluster, self.a, self.b, self.outer, self.run_dir = cluster, a, b, outer, run_dir
        self.base = Path("/")

    def sql(self, query: str, user: str = "postgres") -> None:
        import psycopg

        dsn = self.cluster.dsn.replace("user=postgres", f"user={user}")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(query)

    def dsn(self, user: str = "postgres", port: int = PORT) -> str:
        return f"host={self.run_dir} port={port} user={user} dbname=postgres"


@pytest.fixture(scope="module")
def pg() -> Iterator[Pg]:
    bin_dir = pg_bin()
    need(bin_dir is not None, "PostgreSQL server binaries")
    pytest.importorskip("psycopg", reason="pip install 'quiesce[writers]'")
    run_dir = shared_dir("postgres")
    with open_loops() as loops:
        outer = loops("xfs")
        a = loops("ext4", 256, image_dir=outer.mountpoint)
        b = loops("ext4", 64, image_dir=outer.mountpoint)
        for v in (a, b):
            v.mountpoint.chmod(0o755)
        cluster = Cluster(bin_dir, a.mountpoint / "pgdata", run_dir, PORT)
        try:
            cluster.initdb()
            cluster.start()
            pg = Pg(cluster, a, b, outer, run_dir)
            pg.base = loops.base  # others may traverse it (pytest's tmp_path is 0700)
            pg.sql("CREATE TABLE t (seq int PRIMARY KEY, pad text)")
            pg.sql("CREATE ROLE plain LOGIN")  # no privilege at all
            pg.sql("CREATE ROLE reader LOGIN IN ROLE pg_read_all_settings")  # no CHECKPOINT
            yield pg
        finally:
            with contextlib.suppress(AssertionError):
                cluster.stop()
            shutil.rmtree(run_dir, ignore_errors=True)


def _job(tmp_path: Path, volumes: list[str], body: str, name: str = "pg.toml") -> Path:
    job = tmp_path / name
    vols = ", ".join(f'"{v}"' for v in volumes)
    job.write_text(
        f'volumes = [{vols}]\nstate_dir = "{tmp_path / "state"}"\n'
        '[provider]\ntype = "reflink"\n\n' + body
    )
    job.chmod(0o600)
    return job


def _writer(dsn: str) -> str:
    return f'[[writers.postgresql]]\ndsn = "{dsn}"\n'


def _lsn(text: str) -> int:
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) + int(lo, 16)


def test_the_label_is_atomic_with_the_checkpoint_and_a_wal_bound_that_recovery_keeps(
    pg: Pg, tmp_path: Path
):
    import psycopg

    _acked, stop, thread = start_row_writer(
        lambda: psycopg.connect(pg.cluster.dsn, autocommit=True),
        lambda c, n: c.execute(
            "INSERT INTO t VALUES (%s, repeat('x', 2000)) ON CONFLICT DO NOTHING", (n,)
        ),
    )
    try:
        job = _job(tmp_path, [str(pg.a.path)], _writer(pg.dsn()))
        p = _quiesce("run", str(job), "--json")
    finally:
        stop.set()
        thread.join()
    assert p.returncode == 0, p.stdout + p.stderr
    report = json.loads(p.stdout)
    reason = report["consistency_reason"]
    assert report["consistency"] == "atomic", reason  # never clean: nothing holds PostgreSQL
    m = re.search(
        r"writer postgresql\[0\]: CHECKPOINT ([\d.]+ \w+) before the freeze: "
        r"recovery replays ≤ ([\d.]+ \w+) of WAL",
        reason,
    )
    assert m, reason
    assert f"files proven on the group: writer postgresql[0]'s 2 file(s) on {pg.a.path}" in reason
    bound = report["writers"][0]["info"]["wal_since_checkpoint_bytes"]
    assert bound > 0
    man = json.loads((tmp_path / "state/snapshots" / f"{report['manifest_id']}.json").read_text())
    assert (man["consistency"], man["consistency_reason"]) == ("atomic", reason)

    # What a restore sees: a writable copy of the snapshot, started as it is.
    clone = Path(man["snapshots"][0]["location"])
    copy = pg.outer.mountpoint / "copy.img"
    subprocess.run(["cp", "--reflink=always", str(clone), str(copy)], check=True)
    started: Cluster | None = None
    try:
        with mounted_image(copy, pg.base / "copy") as root:
            root.chmod(0o755)
            (root / "pgdata" / "postmaster.pid").unlink()  # the origin's: it still runs
            started = Cluster(pg.cluster.bin, root / "pgdata", pg.run_dir, COPY_PORT)
            started.start()
            started.stop()
            started = None
    finally:
        if started is not None:
            with contextlib.suppress(AssertionError):
                started.stop()
        copy.unlink()
    log = (pg.run_dir / f"log-{COPY_PORT}").read_text()
    # the negative control of the label: the restore does crash recovery, so "clean"
    # (or the old "application") would have promised more than it sees
    assert "database system was not properly shut down; automatic recovery in progress" in log
    starts = re.search(r"redo starts at ([0-9A-F]+/[0-9A-F]+)", log)
    done = re.search(r"redo done at ([0-9A-F]+/[0-9A-F]+)", log)
    assert starts and done, log
    replayed = _lsn(done.group(1)) - _lsn(starts.group(1))
    assert 0 < replayed <= bound, (replayed, bound)
    print(f"CHECKPOINT {m.group(1)} before the freeze; bound {bound} B; replayed {replayed} B")


def _one_error_line(stderr: str) -> str:
    """The error, once (stderr is a pipe here: issue 19 saw every line twice)."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("quiesce: ")]
    assert len(errors) == 1, stderr
    return errors[0]


def test_a_writer_whose_data_is_off_the_group_is_refused_by_check_and_run(pg, tmp_path):
    job = _job(tmp_path, [str(pg.b.path)], _writer(pg.dsn()))
    data = pg.a.mountpoint / "pgdata"
    want = f"writer postgresql[0] depends on {data} (data_directory), which is on {pg.a.path} ("
    c = _quiesce("check", str(job))
    assert c.returncode == 2, c.stdout + c.stderr
    assert want in c.stderr and f"outside the group ({pg.b.path})" in c.stderr, c.stderr
    r = _quiesce("run", str(job))
    assert r.returncode == 2, r.stdout + r.stderr
    line = _one_error_line(r.stderr)
    assert want in line and f"outside the group ({pg.b.path})" in line
    assert not list((tmp_path / "state" / "snapshots").glob("*.json"))  # nothing was made
    # the control: the same job on the cluster's volume passes check
    ok = _quiesce("check", str(_job(tmp_path, [str(pg.a.path)], _writer(pg.dsn()), "ok.toml")))
    assert ok.returncode == 0, ok.stderr


def test_a_tablespace_on_another_volume_is_asked_from_the_server_and_refused(pg, tmp_path):
    where = pg.b.mountpoint / "ts"
    where.mkdir()
    shutil.chown(where, "postgres", "postgres")
    pg.sql(f"CREATE TABLESPACE ts LOCATION '{where}'")
    try:
        job = _job(tmp_path, [str(pg.a.path)], _writer(pg.dsn()))
        c = _quiesce("check", str(job))
        assert c.returncode == 2, c.stdout + c.stderr
        assert f"depends on {where} (tablespace ts), which is on {pg.b.path}" in c.stderr
        both = _job(tmp_path, [str(pg.a.path), str(pg.b.path)], _writer(pg.dsn()), "both.toml")
        r = _quiesce("run", str(both), "--json")
        assert r.returncode == 0, r.stderr
        reason = json.loads(r.stdout)["consistency_reason"]
        assert "writer postgresql[0]'s 3 file(s) on " in reason, reason
    finally:
        pg.sql("DROP TABLESPACE ts")


# Every refusal a run can meet before it touches anything: `check` must meet it too.
# (id, how the job is made, what check and run both say, run's exit code)
def _refusals(pg: Pg, tmp_path: Path) -> list[tuple[str, Path, str, int]]:
    a, b = str(pg.a.path), str(pg.b.path)
    pw1, pw2 = tmp_path / "pw1", tmp_path / "pw2"
    pw1.write_text("right")
    pw2.write_text("wrong")
    for f in (pw1, pw2):
        f.chmod(0o600)
    garbage = pg.a.mountpoint / "garbage.db"
    garbage.write_bytes(b"not a database" * 100)
    repo = tmp_path / "repo"
    env = os.environ | {"RESTIC_PASSWORD_FILE": str(pw1), "RESTIC_REPOSITORY": str(repo)}
    subprocess.run(["restic", "init"], env=env, check=True, capture_output=True)
    restic = (
        f'[backup]\ntarget = "restic"\nrepository = "{repo}"\npassword_file = "{pw2}"\n'
        f'init = true\nverify = "none"\nmount_root = "{tmp_path / "mnt"}"\n'
    )
    return [
        ("off-group", _job(tmp_path, [b], _writer(pg.dsn()), "r1.toml"),
         "outside the group", 2),
        # a port nothing listens on: as PostgreSQL stopped at check time
        ("server-down", _job(tmp_path, [a], _writer(pg.dsn(port=DEAD_PORT)), "r2.toml"),
         "postgresql: cannot connect", 11),
        ("no-settings", _job(tmp_path, [a], _writer(pg.dsn("plain")), "r3.toml"),
         "postgresql: cannot read data_directory", 11),
        ("no-checkpoint", _job(tmp_path, [a], _writer(pg.dsn("reader")), "r4.toml"),
         "CHECKPOINT", 11),
        ("sqlite-not-a-database", _job(tmp_path, [a], '[[writers.sqlite]]\ndatabases = '
                                       f'["{garbage}"]\n', "r5.toml"),
         "sqlite: cannot lock", 11),
        ("hook-off-group", _job(tmp_path, [a], '[[hooks.pre_freeze]]\nname = "app"\n'
                                'command = ["true"]\n'
                                f'depends_on = ["{pg.b.mountpoint}/app.db"]\n', "r7.toml"),
         "hook 'app' depends on", 2),
        ("wrong-password-init", _job(tmp_path, [b], restic, "r6.toml"),
         "restic repository exists at", 12),
    ]  # fmt: skip


def test_every_refusal_of_a_run_is_a_refusal_of_check(pg, tmp_path):
    failures = []
    for name, job, says, code in _refusals(pg, tmp_path):
        c = _quiesce("check", str(job))
        r = _quiesce("run", str(job))
        if c.returncode != 2 or says not in c.stderr:
            failures.append(f"{name}: check exit {c.returncode}: {c.stdout}{c.stderr}")
        if r.returncode != code or says not in r.stderr:
            failures.append(f"{name}: run exit {r.returncode}: {r.stderr}")
        said = [ln for ln in r.stderr.splitlines() if ln.startswith(("quiesce:", "hint:"))]
        if len(said) != len(set(said)):
            failures.append(f"{name}: an error line printed twice: {r.stderr}")
        if "config file already exists" in r.stderr:
            failures.append(f"{name}: the run hid the cause: {r.stderr}")
    assert not failures, "\n".join(failures)


def test_stopping_the_writer_between_check_and_run_is_refused_before_anything_is_made(pg, tmp_path):
    """The run asks the server for its files before the provider makes anything."""
    job = _job(tmp_path, [str(pg.a.path)], _writer(pg.dsn(port=DEAD_PORT)), "down.toml")
    before = set(pg.outer.mountpoint.iterdir())
    r = _quiesce("run", str(job), "--json")
    assert r.returncode != 0
    assert "postgresql: cannot connect" in json.loads(r.stdout)["error"]["message"]
    assert not list((tmp_path / "state" / "snapshots").glob("*.json"))
    assert set(pg.outer.mountpoint.iterdir()) == before  # no clone was made


def test_mariadb_declares_its_files_and_check_knows_its_privileges(tmp_path):
    """datadir (and InnoDB's and Aria's logs) asked from the server; an account without
    RELOAD/BACKUP_ADMIN is refused by check as by the run."""
    from helpers.dbtools import mariadb_bin
    from test_writers_mysql import Server

    tools = mariadb_bin()
    need(tools is not None, "MariaDB server binaries")
    assert tools is not None
    pymysql = pytest.importorskip("pymysql", reason="pip install 'quiesce[writers]'")
    run_dir = shared_dir("mysql")
    with open_loops() as loops:
        outer = loops("xfs")
        a = loops("ext4", 320, image_dir=outer.mountpoint)
        b = loops("ext4", 64, image_dir=outer.mountpoint)
        a.mountpoint.chmod(0o755)
        db = Server(tools, a.mountpoint / "data", run_dir, "levels")
        try:
            db.install()
            db.start()
            with pymysql.connect(unix_socket=str(db.socket), user="root") as c, c.cursor() as cur:
                cur.execute("CREATE USER 'plain'@'localhost'")
            writer = f'[[writers.mysql]]\nunix_socket = "{db.socket}"\n'
            off = _job(tmp_path, [str(b.path)], writer, "off.toml")
            c = _quiesce("check", str(off))
            assert c.returncode == 2, c.stdout + c.stderr
            assert f"writer mysql[0] depends on {a.mountpoint / 'data'} (datadir)" in c.stderr
            on = _job(tmp_path, [str(a.path)], writer, "on.toml")
            assert _quiesce("check", str(on)).returncode == 0  # the control
            plain = _job(tmp_path, [str(a.path)], writer + 'user = "plain"\n', "plain.toml")
            c = _quiesce("check", str(plain))
            r = _quiesce("run", str(plain))
            assert c.returncode == 2 and "RELOAD" in c.stderr, c.stdout + c.stderr
            assert r.returncode == 11 and "RELOAD" in r.stderr, r.stdout + r.stderr
        finally:
            db.stop()
            shutil.rmtree(run_dir, ignore_errors=True)
