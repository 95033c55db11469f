"""The PostgreSQL writer against a real throwaway cluster on a loop filesystem.

The cluster's data directory lives on an ext4 image stored on an XFS (reflink) loop
filesystem; quiesce snapshots it with the reflink provider around the writer
(CHECKPOINT, pg_backup_start ... pg_backup_stop). A fresh postgres then starts on a
writable clone of the snapshot and must hold every row committed before the freeze.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import pytest
from helpers.dbtools import as_user, need, open_loops, pg_bin, shared_dir, start_row_writer
from helpers.jobtools import mounted_image

from quiesce import snapshot as snapshots

pytestmark = pytest.mark.timeout(180)

PORT, CLONE_PORT = 54391, 54392


class Cluster:
    """initdb + pg_ctl as the postgres user; socket and log outside the volumes."""

    def __init__(self, bin_dir: Path, data: Path, run_dir: Path, port: int) -> None:
        self.bin, self.data, self.run_dir, self.port = bin_dir, data, run_dir, port
        self.started = False

    def initdb(self) -> None:
        self.data.mkdir()
        shutil.chown(self.data, "postgres", "postgres")
        as_user("postgres", str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust",
                "-U", "postgres", "--no-sync", "--no-instructions")  # fmt: skip

    def start(self) -> None:
        opts = (f"-k {self.run_dir} -p {self.port} -c listen_addresses='' "
                "-c shared_buffers=16MB -c max_wal_size=64MB -c fsync=on")  # fmt: skip
        log = str(self.run_dir / f"log-{self.port}")
        as_user("postgres", str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", opts,
                "-l", log, "-w", "-t", "60", "start")  # fmt: skip
        self.started = True

    def stop(self) -> None:
        if self.started:
            as_user("postgres", str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast",
                    "-w", "-t", "60", "stop")  # fmt: skip
            self.started = False

    @property
    def dsn(self) -> str:
        return f"host={self.run_dir} port={self.port} user=postgres dbname=postgres"


def test_snapshot_of_a_live_cluster_starts_and_holds_every_committed_row(tmp_path):
    bin_dir = pg_bin()
    need(bin_dir is not None, "PostgreSQL server binaries")
    psycopg = pytest.importorskip("psycopg", reason="pip install 'quiesce[writers]'")
    from quiesce.apps.writers.postgresql import PostgresWriter

    run_dir = shared_dir("postgres")
    with open_loops() as loops:
        outer = loops("xfs")
        inner = loops("ext4", 256, image_dir=outer.mountpoint)
        inner.mountpoint.chmod(0o755)
        db = Cluster(bin_dir, inner.mountpoint / "pgdata", run_dir, PORT)
        clone_db: Cluster | None = None
        try:
            db.initdb()
            db.start()
            with psycopg.connect(db.dsn, autocommit=True) as conn:
                conn.execute("CREATE TABLE t (seq int PRIMARY KEY, pad text)")
            acked, stop, t = start_row_writer(
                lambda: psycopg.connect(db.dsn, autocommit=True),
                lambda c, n: c.execute("INSERT INTO t VALUES (%s, repeat('x', 500))", (n,)),
            )
            writer = PostgresWriter(db.dsn, backup=True, label="quiesce-test", timeout=30)
            manifest = snapshots.create(
                [inner.path], "reflink", job="pg", options={"dest": str(outer.mountpoint)},
                state_dir=tmp_path / "state", quiescers=[writer],
            )  # fmt: skip
            window_start_ns = manifest.window["start_ns"]
            stop.set()
            t.join(timeout=30)
            before_freeze = max(s for when, s in acked if when * 1e9 < window_start_ns)
            assert "START WAL LOCATION" in writer.info["backup_label"]
            assert writer.info["backup_stop_lsn"]
            db.stop()

            # A writable clone of the snapshot, with a fresh postgres on it.
            with mounted_image(manifest.snapshots[0].location, loops.base / "clone") as m:
                (m / "pgdata" / "postmaster.pid").unlink(missing_ok=True)  # the origin's
                clone_db = Cluster(bin_dir, m / "pgdata", run_dir, CLONE_PORT)
                clone_db.start()
                with psycopg.connect(clone_db.dsn) as c:
                    n, top = c.execute("SELECT count(*), max(seq) FROM t").fetchone()
                clone_db.stop()
            assert n == top  # whole transactions, no gaps
            assert n >= before_freeze >= 100
            print(f"rows: acked before the freeze {before_freeze}, in the snapshot {n}, "
                  f"acked in all {len(acked)}")  # fmt: skip
        finally:
            for cluster in (clone_db, db):
                if cluster is not None:
                    with contextlib.suppress(AssertionError):
                        cluster.stop()
            shutil.rmtree(run_dir, ignore_errors=True)


def test_password_env_reaches_the_server_and_never_a_message(monkeypatch):
    """A cluster that wants a password (scram-sha-256 on its socket): the job's
    `password_env` gets the writer in, given to libpq in memory; a wrong one fails
    without showing it."""
    bin_dir = pg_bin()
    need(bin_dir is not None, "PostgreSQL server binaries")
    assert bin_dir is not None
    pytest.importorskip("psycopg", reason="pip install 'quiesce[writers]'")
    from quiesce.apps.writers import WriterError
    from quiesce.job.build import build_writers
    from quiesce.job.schema import JobConfig

    password = "pg-pw-81d2"
    run_dir = shared_dir("postgres")
    db = Cluster(bin_dir, run_dir / "pgdata", run_dir, PORT + 10)
    try:
        pwfile = run_dir / "pwfile"
        pwfile.write_text(password + "\n")
        shutil.chown(pwfile, "postgres", "postgres")
        db.data.mkdir()
        shutil.chown(db.data, "postgres", "postgres")
        as_user("postgres", str(bin_dir / "initdb"), "-D", str(db.data), "-U", "postgres",
                "--auth=scram-sha-256", f"--pwfile={pwfile}", "--no-sync",
                "--no-instructions")  # fmt: skip
        db.start()
        config = JobConfig.model_validate({
            "volumes": ["/v"], "provider": {"type": "reflink"},
            "writers": {"postgresql": [{"dsn": db.dsn, "password_env": "QUIESCE_TEST_PG_PW",
                                        "timeout": 10}]},
        })  # fmt: skip
        monkeypatch.delenv("PGPASSWORD", raising=False)
        monkeypatch.setenv("PGPASSFILE", "/nonexistent")
        monkeypatch.setenv("QUIESCE_TEST_PG_PW", password)
        [writer] = build_writers(config)
        writer.before_freeze()  # CHECKPOINT: it got in
        writer.after_thaw(True)
        assert writer.info["server_version"] > 0

        monkeypatch.setenv("QUIESCE_TEST_PG_PW", "wrong-" + password)
        [wrong] = build_writers(config)
        with pytest.raises(WriterError) as e:
            wrong.before_freeze()
        assert "password authentication failed" in e.value.message
        assert password not in e.value.message
    finally:
        db.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
