"""A timer run of a PostgreSQL job, restored, starts with `pg_ctl start` as it is
(issue 11): the backup_label of `backup = true` is kept in the manifest, shown in the
report, and written into the restored data directory; the restore's top directory lets
the postgres user through."""

from __future__ import annotations

import contextlib
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.dbtools import need, open_loops, pg_bin, shared_dir
from test_writers_postgresql import Cluster

from quiesce import snapshot as snapshots

pytestmark = pytest.mark.timeout(300)

PORT, RESTORED_PORT = 54393, 54394


def _quiesce(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "quiesce", *args], capture_output=True, text=True, timeout=240
    )


def _start(cluster: Cluster, run_dir: Path) -> None:
    try:
        cluster.start()
    except AssertionError as e:
        log = run_dir / f"log-{cluster.port}"
        raise AssertionError(f"{e}\n{log.read_text() if log.exists() else ''}") from None


@pytest.mark.parametrize("backup_mode", [True, False], ids=["backup-label", "checkpoint"])
def test_run_restore_and_pg_ctl_start_the_restored_copy(tmp_path: Path, backup_mode: bool):
    bin_dir = pg_bin()
    need(bin_dir is not None, "PostgreSQL server binaries")
    psycopg = pytest.importorskip("psycopg", reason="pip install 'quiesce[writers]'")
    run_dir = shared_dir("postgres")
    with open_loops() as loops:
        outer = loops("xfs")
        inner = loops("ext4", 256, image_dir=outer.mountpoint)
        inner.mountpoint.chmod(0o755)
        db = Cluster(bin_dir, inner.mountpoint / "pgdata", run_dir, PORT)
        restored: Cluster | None = None
        try:
            db.initdb()
            db.start()
            with psycopg.connect(db.dsn, autocommit=True) as conn:
                conn.execute("CREATE TABLE t AS SELECT generate_series(1, 1000) AS n")
            pw = tmp_path / "pw"
            pw.write_text("secret")
            job = tmp_path / "pg.toml"
            job.write_text(
                f'volumes = ["{inner.path}"]\nstate_dir = "{tmp_path / "state"}"\n'
                '[provider]\ntype = "reflink"\n\n'
                f'[[writers.postgresql]]\ndsn = "{db.dsn}"\n'
                f"backup = {str(backup_mode).lower()}\n\n"
                f'[backup]\ntarget = "restic"\nrepository = "{tmp_path / "repo"}"\n'
                f'password_file = "{pw}"\ninit = true\nverify = "none"\n'
                f'mount_root = "{tmp_path / "run"}"\n'
            )
            job.chmod(0o600)
            p = _quiesce("run", str(job))
            assert p.returncode == 0, p.stdout + p.stderr
            [man] = snapshots.list_manifests(tmp_path / "state")
            labels = [f for f in man.app_files if f["name"] == "backup_label"]
            if backup_mode:
                [label] = labels
                assert "START WAL LOCATION" in label["content"]
                assert label["path"] == "pgdata/backup_label"
                assert "backup_label" in p.stdout and "START WAL LOCATION" in p.stdout
            else:
                assert labels == []

            dest = loops.base / "restore"
            p = _quiesce("restore", str(job), str(dest))
            assert p.returncode == 0, p.stdout + p.stderr
            [slug] = [d.name for d in dest.iterdir()]
            assert stat.S_IMODE(dest.stat().st_mode) == 0o711
            assert stat.S_IMODE((dest / slug).stat().st_mode) == 0o755  # the volume root's
            data = dest / slug / "pgdata"
            assert data.owner() == "postgres" and stat.S_IMODE(data.stat().st_mode) == 0o700
            assert not (data / "postmaster.pid").exists()  # the origin's: it still runs
            if backup_mode:
                written = data / "backup_label.quiesce"  # inactive: see --pitr below
                assert written.read_text() == label["content"]
                assert written.owner() == "postgres"
                assert stat.S_IMODE(written.stat().st_mode) == 0o600
                assert f"wrote {written}" in p.stdout
                assert not (data / "backup_label").exists()
            restored = Cluster(bin_dir, data, run_dir, RESTORED_PORT)
            _start(restored, run_dir)  # as the postgres user, on the restored tree as it is
            with psycopg.connect(restored.dsn) as c:
                assert c.execute("SELECT count(*), max(n) FROM t").fetchone() == (1000, 1000)
            restored.stop()
            restored = None
            if backup_mode:
                # --pitr puts it in place: postgres then wants the WAL up to the end of
                # the backup (written after the thaw, so only in a WAL archive)
                pitr = loops.base / "pitr"
                p = _quiesce("restore", "--pitr", str(job), str(pitr))
                assert p.returncode == 0, p.stdout + p.stderr
                active = pitr / slug / "pgdata" / "backup_label"
                assert active.read_text() == label["content"]
                with pytest.raises(AssertionError, match="WAL ends before end of online backup"):
                    _start(Cluster(bin_dir, active.parent, run_dir, RESTORED_PORT), run_dir)
        finally:
            for cluster in (restored, db):
                if cluster is not None:
                    with contextlib.suppress(AssertionError):
                        cluster.stop()
            shutil.rmtree(run_dir, ignore_errors=True)
            for d in ("restore", "pitr"):
                shutil.rmtree(loops.base / d, ignore_errors=True)
