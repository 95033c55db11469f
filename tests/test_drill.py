"""The restore drill (issue 19): each application started on a throwaway overlay copy of
a snapshot, recovered, checked with its own tool, and everything removed again.

Real servers on loop filesystems (helpers/dbtools.py). The negative controls prove that
the drill can fail: a PostgreSQL group captured volume by volume (the WAL volume before
the data volume, a CHECKPOINT in between) and a group with its WAL volume left out.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.dbtools import as_user, need, open_loops, pg_bin, shared_dir, start_row_writer
from hypothesis import given
from hypothesis import strategies as st
from test_writers_postgresql import Cluster

from quiesce import snapshot as snapshots
from quiesce.apps.drills import AppTarget, drill_mounted, drill_snapshot
from quiesce.errors import OutsideGroup
from quiesce.host.mounts import MountTable

pytestmark = pytest.mark.timeout(300)
PORT = 54411


def _drill_mounts() -> list[str]:
    return [m.mount_point for m in MountTable.read().mounts if m.source == "quiesce-drill"]


def _servers_in(path: Path) -> list[int]:
    """Pids of processes working in ``path`` (a drill's server: postgres and mariadbd
    chdir to their data directory, and so do all their children)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/cwd").startswith(str(path) + "/"):
                found.append(int(pid))
    return found


def _assert_nothing_left(scratch: Path) -> None:
    assert _drill_mounts() == []
    assert list(scratch.iterdir()) == []  # the copy (upper layer, sockets, logs) is gone
    assert _servers_in(scratch) == []


def _pg_group(loops, bin_dir: Path, run_dir: Path) -> tuple[Cluster, Path, Path]:
    """A cluster with its data on one loop volume and its WAL on another (a group)."""
    data_vol = loops("ext4", 256, image_dir=loops.outer)
    wal_vol = loops("ext4", 256, image_dir=loops.outer)
    for v in (data_vol, wal_vol):
        v.mountpoint.chmod(0o755)
    data, wal = data_vol.mountpoint / "pgdata", wal_vol.mountpoint / "pg_wal"
    for d in (data, wal):
        d.mkdir()
        shutil.chown(d, "postgres", "postgres")
    as_user("postgres", str(bin_dir / "initdb"), "-D", str(data), "--waldir", str(wal),
            "-A", "trust", "-U", "postgres", "--no-sync", "--no-instructions")  # fmt: skip
    db = Cluster(bin_dir, data, run_dir, PORT)
    db.start()
    return db, data_vol.mountpoint, wal_vol.mountpoint


@contextlib.contextmanager
def _pg_setup():
    bin_dir = pg_bin()
    need(bin_dir is not None, "PostgreSQL server binaries")
    psycopg = pytest.importorskip("psycopg", reason="pip install 'quiesce[writers]'")
    run_dir = shared_dir("postgres")
    with open_loops() as loops:
        loops.outer = loops("xfs").mountpoint  # reflink clones and inner images live here
        db = None
        try:
            db, data_mp, wal_mp = _pg_group(loops, bin_dir, run_dir)
            with psycopg.connect(db.dsn, autocommit=True) as conn:
                conn.execute("CREATE TABLE t (seq int PRIMARY KEY, pad text)")
                conn.execute("CREATE INDEX ON t (pad)")
            yield psycopg, loops, db, data_mp, wal_mp
        finally:
            if db is not None:
                with contextlib.suppress(AssertionError):
                    db.stop()
            shutil.rmtree(run_dir, ignore_errors=True)


def _quiesce(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "quiesce", *args], capture_output=True, text=True, timeout=240
    )


def test_run_with_verify_app_drills_the_snapshot_under_writes(tmp_path: Path):
    """A nightly job with verify = ["repository", "app"] under writes: the drill passes,
    and its result is in the report (--json and human), the manifest and the metrics."""
    with _pg_setup() as (psycopg, loops, db, data_mp, wal_mp):
        scratch = loops.base / "scratch"
        _acked, stop, t = start_row_writer(
            lambda: psycopg.connect(db.dsn, autocommit=True),
            lambda c, n: c.execute("INSERT INTO t VALUES (%s, repeat('x', 300))", (n,)),
        )
        try:
            job = tmp_path / "pg.toml"
            job.write_text(
                f'volumes = ["{data_mp}", "{wal_mp}"]\nstate_dir = "{tmp_path / "state"}"\n'
                f'metrics_file = "{tmp_path / "m.prom"}"\n'
                f'[provider]\ntype = "reflink"\ndest = "{loops.outer}"\n\n'
                f'[[writers.postgresql]]\ndsn = "{db.dsn}"\n\n'
                f'[backup]\ntarget = "tar"\ndirectory = "{tmp_path / "tar"}"\n'
                f'verify = ["repository", "app"]\nverify_dir = "{scratch}"\n'
                f'mount_root = "{tmp_path / "run"}"\n'
            )
            job.chmod(0o600)
            p = _quiesce("run", "--json", str(job))
        finally:
            stop.set()
            t.join()
        assert p.returncode == 0, p.stdout + p.stderr
        report = json.loads(p.stdout)
        drill = report["backup"]["drill"]
        assert drill["ok"] is True, drill
        [app] = drill["apps"]
        assert app["kind"] == "postgresql" and app["path"] == str(data_mp / "pgdata")
        assert "no corruption" in app["check"] and app["recovery_s"] > 0
        assert app["replayed"] and app["replayed_bytes"] is not None  # crash recovery ran
        assert any(n.startswith("pg_wal -> ") for n in app["notes"])  # into the copy
        [man] = snapshots.list_manifests(tmp_path / "state")
        assert man.drill is not None and man.drill["ok"] is True
        assert man.drill["recovery_s"] == drill["recovery_s"]
        prom = (tmp_path / "m.prom").read_text()
        assert 'quiesce_drill_success{job="pg"} 1' in prom
        assert 'quiesce_drill_recovery_seconds{job="pg"}' in prom
        _assert_nothing_left(scratch)
        # the drill wrote nothing on the live volumes and left the snapshot as it was
        p = _quiesce("verify", "--app", man.id, "--job", str(job))
        assert p.returncode == 0, p.stdout + p.stderr
        assert "restore drill: ok" in p.stdout and "no corruption" in p.stdout
        _assert_nothing_left(scratch)


def _clone_volume(src_mp: Path, image: Path, dest: Path) -> None:
    """A copy of a live volume's image without the freeze: syncfs, then FICLONE."""
    fd = os.open(src_mp, os.O_RDONLY)
    try:
        os.sync()
    finally:
        os.close(fd)
    subprocess.run(["cp", "--reflink=always", str(image), str(dest)], check=True)


@contextlib.contextmanager
def _mounted_clones(images: list[Path], base: Path):
    """Each clone attached read-write (ext4 replays its journal into the clone: like
    after a power cut) and mounted read-only."""
    made = []
    try:
        for i, img in enumerate(images):
            dev = subprocess.run(["losetup", "-f", "--show", str(img)], capture_output=True,
                                 text=True, check=True).stdout.strip()  # fmt: skip
            mp = base / f"clone{i}"
            mp.mkdir()
            made.append((dev, mp))
            subprocess.run(["mount", "-o", "ro", dev, str(mp)], check=True)
        yield [mp for _, mp in made]
    finally:
        for dev, mp in reversed(made):
            subprocess.run(["umount", str(mp)], check=False)
            subprocess.run(["losetup", "-d", dev], check=False)


def _torn_drill(psycopg, loops, db, data_mp, wal_mp, n: int, scratch: Path, state: Path):
    """The WAL volume copied first, then rows and a CHECKPOINT, then the data volume."""
    from quiesce.state.journal import Journal

    imgs = {m: next(f.image for f in loops.made if f.mountpoint == m) for m in (data_mp, wal_mp)}
    clones = [loops.outer / f"torn{n}-data.img", loops.outer / f"torn{n}-wal.img"]
    _clone_volume(wal_mp, imgs[wal_mp], clones[1])
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO t SELECT g, repeat('y', 300) FROM generate_series(%s, %s) g",
            (1_000_000 * (n + 1), 1_000_000 * (n + 1) + 2000),
        )
        conn.execute("CHECKPOINT")
    _clone_volume(data_mp, imgs[data_mp], clones[0])
    try:
        with _mounted_clones(clones, loops.base) as (d, w), Journal.open(state) as j:
            return drill_mounted(
                [(str(data_mp), d), (str(wal_mp), w)],
                [AppTarget("postgresql", "pg", str(data_mp / "pgdata"))],
                snapshot=f"torn{n}", journal=j, scratch_root=scratch, timeout=120,
            )  # fmt: skip
    finally:
        for c in clones:
            c.unlink(missing_ok=True)


def test_drill_passes_on_a_group_snapshot_and_catches_a_torn_copy(tmp_path: Path):
    """Positive control: the group frozen together passes. Negative control: the same
    group copied volume by volume (WAL first, a CHECKPOINT, then the data) fails the
    drill (the cluster cannot find its checkpoint); and so does a snapshot without the
    WAL volume. Nothing is left behind either way."""
    from quiesce.apps.writers.postgresql import PostgresWriter

    with _pg_setup() as (psycopg, loops, db, data_mp, wal_mp):
        scratch = loops.base / "scratch"
        state = tmp_path / "state"
        target = [AppTarget("postgresql", "pg", str(data_mp / "pgdata"))]
        man = snapshots.create(
            [str(data_mp), str(wal_mp)], "reflink", job="pg",
            options={"dest": str(loops.outer)}, state_dir=state,
            quiescers=[PostgresWriter(db.dsn)],
        )  # fmt: skip
        good = drill_snapshot(man, state=state, targets=target, scratch_root=scratch,
                              mount_root=tmp_path / "run", timeout=120)  # fmt: skip
        assert good.ok, good.to_dict()
        _assert_nothing_left(scratch)

        torn = _torn_drill(psycopg, loops, db, data_mp, wal_mp, 0, scratch, state)
        assert not torn.ok
        [app] = torn.apps
        assert app.check == "did not start"
        assert "checkpoint" in app.detail.lower(), app.detail
        _assert_nothing_left(scratch)

        # the WAL volume left out of the group: with its writer, quiesce refuses the job
        # (the writer's files are not all on the group); without one, the snapshot is
        # made, and the drill catches that pg_wal points outside it
        with pytest.raises(OutsideGroup):
            snapshots.create(
                [str(data_mp)], "reflink", job="pg", options={"dest": str(loops.outer)},
                state_dir=state, quiescers=[PostgresWriter(db.dsn)], allow_self=False,
            )  # fmt: skip
        data_only = snapshots.create(
            [str(data_mp)], "reflink", job="pg", options={"dest": str(loops.outer)},
            state_dir=state, quiescers=[], allow_self=False,
        )  # fmt: skip
        missing = drill_snapshot(data_only, state=state, targets=target, scratch_root=scratch,
                                 mount_root=tmp_path / "run", timeout=60)  # fmt: skip
        assert not missing.ok and "not on the snapshot" in missing.apps[0].detail
        _assert_nothing_left(scratch)
        for m in (man, data_only):
            snapshots.delete(m.id, state)


def test_sqlite_drill_passes_and_catches_a_corrupt_database(tmp_path: Path, loopfs):
    """SQLite in WAL mode: integrity_check on the copy (its -wal replayed) passes; a
    database with a damaged page fails it; the live file is never written."""
    outer = loopfs("xfs")
    inner = loopfs("ext4", 64, image_dir=outer.mountpoint)
    db = inner.mountpoint / "app.db"
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA wal_autocheckpoint=0")
    conn.execute("CREATE TABLE t (a INTEGER PRIMARY KEY, b TEXT)")
    conn.execute("CREATE INDEX tb ON t (b)")
    conn.executemany("INSERT INTO t (b) VALUES (?)", [(f"row {i}" * 5,) for i in range(3000)])
    state, scratch = tmp_path / "state", tmp_path / "scratch"
    target = [AppTarget("sqlite", "app", str(db))]
    opts = {"dest": str(outer.mountpoint)}
    man = snapshots.create([inner.path], "reflink", job="s", options=opts, state_dir=state)
    live_before = db.read_bytes()
    on_group = inner.mountpoint / "drill-scratch"  # refused before anything is made
    r = drill_snapshot(man, state=state, targets=target, scratch_root=on_group,
                       mount_root=tmp_path / "run")  # fmt: skip
    assert not r.ok and "on a volume of the group" in str(r.error)
    assert not on_group.exists() and _drill_mounts() == []
    r = drill_snapshot(man, state=state, targets=target, scratch_root=scratch,
                       mount_root=tmp_path / "run")  # fmt: skip
    assert r.ok, r.to_dict()
    assert r.apps[0].replayed.endswith("WAL frame(s)")  # the -wal held the rows
    assert db.read_bytes() == live_before
    assert list(scratch.iterdir()) == [] and _drill_mounts() == []

    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    page = 4096
    with open(db, "r+b") as f:  # a leaf page of the index, overwritten
        f.seek(page * 5 + 100)
        f.write(b"\xff" * 600)
    bad = snapshots.create([inner.path], "reflink", job="s", options=opts, state_dir=state)
    r = drill_snapshot(bad, state=state, targets=target, scratch_root=scratch,
                       mount_root=tmp_path / "run")  # fmt: skip
    assert not r.ok
    assert r.apps[0].check.endswith("FAILED") or "malformed" in r.apps[0].detail
    assert list(scratch.iterdir()) == [] and _drill_mounts() == []
    for m in (man, bad):
        snapshots.delete(m.id, state)


def test_mariadb_drill_found_on_the_snapshot_recovers_and_checks(tmp_path: Path):
    """MariaDB under writes, snapshotted with its writer: the drill finds the datadir on
    the snapshot (no target given), InnoDB recovers, every table checks OK."""
    from helpers.dbtools import mariadb_bin
    from test_writers_mysql import Server

    from quiesce.apps.writers.mysql import MysqlWriter

    tools = mariadb_bin()
    need(tools is not None, "MariaDB server binaries")
    pymysql = pytest.importorskip("pymysql", reason="pip install 'quiesce[writers]'")
    run_dir = shared_dir("mysql")
    with open_loops() as loops:
        outer = loops("xfs")
        inner = loops("ext4", 320, image_dir=outer.mountpoint)
        inner.mountpoint.chmod(0o755)
        db = Server(tools, inner.mountpoint / "data", run_dir, "origin")
        try:
            db.install()
            db.start()

            def connect():  # type: ignore[no-untyped-def]
                return pymysql.connect(unix_socket=str(db.socket), user="root", autocommit=True)

            with connect() as c, c.cursor() as cur:
                cur.execute("CREATE DATABASE app")
                cur.execute("CREATE TABLE app.t (seq INT PRIMARY KEY, pad TEXT, KEY (pad(20)))")
            _acked, stop, t = start_row_writer(
                connect,
                lambda c, n: c.cursor().execute(
                    "INSERT INTO app.t VALUES (%s, REPEAT('x', 300))", (n,)
                ),
            )
            try:
                man = snapshots.create(
                    [inner.path], "reflink", job="m", options={"dest": str(outer.mountpoint)},
                    state_dir=tmp_path / "state",
                    quiescers=[MysqlWriter(unix_socket=str(db.socket), user="root")],
                )  # fmt: skip
            finally:
                stop.set()
                t.join()
            scratch = loops.base / "scratch"
            r = drill_snapshot(man, state=tmp_path / "state", scratch_root=scratch,
                               mount_root=tmp_path / "run", timeout=180)  # fmt: skip
            assert r.ok, r.to_dict()
            [app] = r.apps
            assert app.kind == "mysql" and app.path == str(inner.mountpoint / "data")
            assert "table(s) OK" in app.check and app.recovery_s and app.recovery_s > 0
            assert _drill_mounts() == [] and list(scratch.iterdir()) == []
            assert _servers_in(scratch) == []  # no mariadbd either
            snapshots.delete(man.id, tmp_path / "state")
        finally:
            db.stop()
            shutil.rmtree(run_dir, ignore_errors=True)


def test_a_drill_killed_midway_is_removed_by_cleanup(tmp_path: Path):
    """SIGKILL to `quiesce verify --app` while the cluster recovers: the server dies with
    it (PR_SET_PDEATHSIG), and `quiesce cleanup` removes the overlay, the scratch
    directory and the snapshot's read-only mounts."""
    import signal
    import time

    from quiesce.apps.writers.postgresql import PostgresWriter

    with _pg_setup() as (psycopg, loops, db, data_mp, wal_mp):
        scratch, state = loops.base / "scratch", tmp_path / "state"
        with psycopg.connect(db.dsn, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO t SELECT g, repeat('z', 300) FROM generate_series(1, 20000) g"
            )
        man = snapshots.create(
            [str(data_mp), str(wal_mp)], "reflink", job="pg",
            options={"dest": str(loops.outer)}, state_dir=state,
            quiescers=[PostgresWriter(db.dsn, checkpoint=False)],
        )  # fmt: skip
        p = subprocess.Popen(
            [sys.executable, "-m", "quiesce", "verify", "--app", man.id, "--state-dir",
             str(state), "--dir", str(scratch)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while not _servers_in(scratch):  # the drill's cluster is up (or recovering)
                assert p.poll() is None, "the drill ended before its cluster was seen"
                assert time.monotonic() < deadline
                time.sleep(0.01)
            assert _drill_mounts()
            os.kill(p.pid, signal.SIGKILL)
            p.wait()
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        deadline = time.monotonic() + 30
        while _servers_in(scratch):  # postmaster got SIGKILL; its children follow
            assert time.monotonic() < deadline, "the drill's cluster outlived quiesce"
            time.sleep(0.05)
        c = _quiesce("cleanup", "--state-dir", str(state))
        assert c.returncode == 0, c.stdout + c.stderr
        _assert_nothing_left(scratch)
        assert not [m for m in MountTable.read().mounts if ".drill" in m.mount_point]
        snapshots.delete(man.id, state)


def test_a_failed_drill_fails_the_run_with_14_and_prunes_nothing(tmp_path: Path, loopfs):
    """A job whose SQLite database is damaged: the run exits 14, the report, manifest and
    metrics say the drill failed, and retention keeps the older snapshot."""
    outer = loopfs("xfs")
    inner = loopfs("ext4", 64, image_dir=outer.mountpoint)
    db = inner.mountpoint / "app.db"
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE t (a INTEGER PRIMARY KEY, b TEXT)")
        conn.execute("CREATE INDEX tb ON t (b)")
        conn.executemany("INSERT INTO t (b) VALUES (?)", [(f"row {i}" * 5,) for i in range(3000)])
    job = tmp_path / "s.toml"
    job.write_text(
        f'name = "s"\nvolumes = ["{inner.path}"]\nstate_dir = "{tmp_path / "state"}"\n'
        f'metrics_file = "{tmp_path / "m.prom"}"\n'
        f'[provider]\ntype = "reflink"\ndest = "{outer.mountpoint}"\n'
        f'[[writers.sqlite]]\ndatabases = ["{db}"]\n'
        f'[backup]\ntarget = "tar"\ndirectory = "{tmp_path / "tar"}"\nverify = "app"\n'
        f'verify_dir = "{tmp_path / "scratch"}"\nmount_root = "{tmp_path / "run"}"\n'
        "[retention]\nkeep_last = 1\n"
    )
    job.chmod(0o600)
    p = _quiesce("run", "--json", str(job))
    assert p.returncode == 0, p.stdout + p.stderr
    [first] = snapshots.list_manifests(tmp_path / "state")
    assert first.drill is not None and first.drill["ok"] is True
    with open(db, "r+b") as f:  # a page of the table, overwritten
        f.seek(4096 * 5 + 100)
        f.write(b"\xff" * 600)
    p = _quiesce("run", "--json", str(job))
    assert p.returncode == 14, p.stdout + p.stderr
    report = json.loads(p.stdout)
    assert report["backup"]["drill"]["ok"] is False
    assert report["error"]["exit_code"] == 14 and "restore drill" in report["error"]["message"]
    mans = snapshots.list_manifests(tmp_path / "state")
    assert mans[0].id == first.id and len(mans) == 2  # nothing pruned
    assert mans[1].drill is not None and mans[1].drill["ok"] is False
    assert 'quiesce_drill_success{job="s"} 0' in (tmp_path / "m.prom").read_text()
    assert 'quiesce_last_run_exit_code{job="s"} 14' in (tmp_path / "m.prom").read_text()
    assert _drill_mounts() == [] and list((tmp_path / "scratch").iterdir()) == []
    for m in mans:
        snapshots.delete(m.id, tmp_path / "state")


# -- the pure parts: configuration, logs, metrics -------------------------------------------


def test_verify_takes_app_alone_or_beside_one_backup_check(tmp_path: Path):
    from pydantic import ValidationError

    from quiesce.backup.config import BackupConfig

    def cfg(verify):
        return BackupConfig(target="tar", directory=str(tmp_path), verify=verify)

    assert (cfg("sample").check, cfg("sample").drill) == ("sample", False)  # as before
    assert (cfg("app").check, cfg("app").drill) == ("none", True)
    assert (cfg(["full", "app"]).check, cfg(["full", "app"]).drill) == ("full", True)
    for bad in (["sample", "full"], [], ["none", "app"], ["app", "app"], ["restore"]):
        with pytest.raises(ValidationError):
            cfg(bad)


def test_a_job_with_a_bad_verify_list_names_the_key(tmp_path: Path):
    from quiesce.job.schema import JobConfigError
    from quiesce.job.validate import load_job

    job = tmp_path / "j.toml"
    job.write_text(
        'volumes = ["/srv/db"]\n[provider]\ntype = "reflink"\n[backup]\ntarget = "tar"\n'
        f'directory = "{tmp_path}"\nverify = ["sample", "full"]\n'
    )
    job.chmod(0o600)
    with pytest.raises(JobConfigError) as e:
        load_job(job, check_volumes=False)
    assert e.value.exit_code == 2
    assert any(p.path.startswith("backup") and "verify" in p.message for p in e.value.problems)


@given(a=st.integers(0, 2**40), n=st.integers(0, 2**32), form=st.sampled_from(["{:X}", "{:08X}"]))
def test_the_wal_replayed_is_read_from_postgresql_s_log(a: int, n: int, form: str):
    from quiesce.apps.drills.postgresql import replayed_from_log

    def text(x: int) -> str:
        return f"{x >> 32:X}/{form.format(x & 0xFFFFFFFF)}"

    log = (
        f"LOG:  database system was interrupted; last known up at ...\n"
        f"LOG:  redo starts at {text(a)}\nLOG:  invalid record length at ...\n"
        f"LOG:  redo done at {text(a + n)} system usage: CPU: user: 0.01 s\n"
    )
    said, replayed = replayed_from_log(log)
    assert replayed == n and said is not None and text(a) in said
    assert replayed_from_log("LOG:  redo is not required\n")[1] == 0
    assert replayed_from_log("FATAL:  could not locate a valid checkpoint record\n") == (
        None, None,
    )  # fmt: skip


def test_drill_metrics_come_from_the_backup_report():
    from quiesce.job.metrics import render, run_metrics

    ok = {"drill": {"ok": True, "recovery_s": 1.5}}
    text = render({"j": run_metrics("j", success=True, duration_s=1, freeze_window_s=0.01,
                                    backup=ok).samples()})  # fmt: skip
    assert 'quiesce_drill_success{job="j"} 1' in text
    assert 'quiesce_drill_recovery_seconds{job="j"} 1.5' in text
    bad = run_metrics("j", success=False, duration_s=1, freeze_window_s=None,
                      backup={"drill": {"ok": False, "recovery_s": None}}).samples()  # fmt: skip
    assert bad["drill_success"] == 0.0 and "drill_recovery_seconds" not in bad
    assert (
        "drill_success"
        not in run_metrics(
            "j", success=True, duration_s=1, freeze_window_s=None, backup={"drill": None}
        ).samples()
    )


def test_mariadb_check_output_and_redo_log_are_read():
    from quiesce.apps.drills.mysql import _check_failed, replayed_from_log

    ok = "app.t                                              OK\nmysql.user          OK\n"
    assert _check_failed(ok) == []
    bad = ok + "app.u\nerror    : Table 'u' is marked as crashed\nwarning  : 1 client\n"
    assert _check_failed(bad) == [
        "app.u", "error    : Table 'u' is marked as crashed", "warning  : 1 client",
    ]  # fmt: skip
    log = (
        "[Note] InnoDB: Starting crash recovery from checkpoint LSN=46846\n"
        "[Note] InnoDB: End of log at LSN=1046846\n[Note] mariadbd: ready for connections.\n"
    )
    assert replayed_from_log(log) == ("redo log LSN 46846 to 1046846", 1_000_000)
    assert replayed_from_log("[Note] mariadbd: ready for connections.\n")[1] == 0


def test_the_dry_run_names_the_drill(tmp_path: Path, loopfs):
    from quiesce.job.run import run_job
    from quiesce.job.validate import load_job

    job = tmp_path / "j.toml"
    job.write_text(
        f'volumes = ["{loopfs("ext4").path}"]\nstate_dir = "{tmp_path / "state"}"\n'
        '[provider]\ntype = "command"\ncreate = ["true"]\n'
        f'[backup]\ntarget = "tar"\ndirectory = "{tmp_path}"\nverify = ["sample", "app"]\n'
    )
    job.chmod(0o600)
    report = run_job(load_job(job), dry_run=True)
    steps = " | ".join(report.steps)
    assert report.error is None, report.error
    assert "verify (sample)" in steps and "restore drill (verify = app)" in steps
