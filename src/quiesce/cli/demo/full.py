"""`quiesce demo`: the whole workflow on a throwaway machine-in-a-directory.

A loop XFS (reflink=1) holds the image of a loop ext4; on the ext4 an SQLite writer
commits rows non-stop. Two runs of a real job (sqlite writer -> freeze -> reflink
snapshot -> thaw), each followed by the backup phase (read-only mount at a stable
path -> restic backup -> verify a sample -> retention keep_last=1). Then the database
is restored from the backup and checked with ``PRAGMA integrity_check``. Everything it
made (writer, mounts, loop devices, images, repository) is removed at the end, also on
failure or Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from quiesce.errors import QuiesceError, UsageError
from quiesce.host import proc
from quiesce.util.units import human_bytes, human_duration

WRITER = r"""
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], timeout=60, isolation_level=None)
db.execute("PRAGMA journal_mode=WAL")
db.execute("CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY, item TEXT, t REAL)")
print("ready", flush=True)
n = 0
while True:
    db.execute("BEGIN IMMEDIATE")
    for _ in range(5):
        db.execute("INSERT INTO orders (item, t) VALUES (?, ?)", ("x" * 200, time.time()))
    db.execute("COMMIT")
    n += 5
    print(f"{time.time()} {n}", flush=True)
    time.sleep(0.005)
"""

NEEDS = {
    "mkfs.xfs": "xfsprogs",
    "mkfs.ext4": "e2fsprogs",
    "losetup": "util-linux",
    "restic": "restic",
}


class _Rows:
    """Reads the writer's "<time> <rows committed>" lines in a thread."""

    def __init__(self, writer: subprocess.Popen[bytes]) -> None:
        self.acks: list[tuple[float, int]] = []
        self.proc = writer
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            parts = line.split()
            if len(parts) == 2:
                self.acks.append((float(parts[0]), int(parts[1])))

    def committed_before(self, t: float) -> int:
        return max((n for when, n in self.acks if when < t), default=0)

    @property
    def total(self) -> int:
        return self.acks[-1][1] if self.acks else 0


def run_full_demo(
    console: Console | None, as_json: bool, directory: Path | None = None
) -> dict[str, Any]:
    """Run the demo; print as it goes (``console``) and/or return the result dict. It
    builds in ``directory``, else $TMPDIR, else /var/tmp (room for a sparse 512 MiB
    image, and not a tmpfs that a reboot-less machine fills)."""
    for tool, package in NEEDS.items():
        if shutil.which(tool) is None:
            raise UsageError(f"{tool} is not installed", f"apt-get install {package}")
    if os.geteuid() != 0:
        raise UsageError("the demo needs root", "run it with sudo: sudo quiesce demo")
    say = console.print if console is not None else (lambda *_a, **_k: None)
    t_start = time.monotonic()
    where = directory or os.environ.get("TMPDIR") or "/var/tmp"
    base = Path(tempfile.mkdtemp(prefix="quiesce-demo-", dir=where))
    mounted: list[Path] = []
    loops: list[str] = []
    writer: subprocess.Popen[bytes] | None = None
    try:
        host, data = base / "host", base / "data"
        host_img = base / "host-xfs.img"
        with open(host_img, "wb") as f:
            f.truncate(512 << 20)
        proc.check_tool("mkfs.xfs", "-q", "-f", "-m", "reflink=1", str(host_img))
        loops.append(proc.check_tool("losetup", "-f", "--show", str(host_img)).strip())
        host.mkdir()
        proc.check_tool("mount", loops[-1], str(host))
        mounted.append(host)
        data_img = host / "data-ext4.img"
        with open(data_img, "wb") as f:
            f.truncate(96 << 20)
        proc.check_tool("mkfs.ext4", "-q", "-F", str(data_img))
        # direct I/O: the inner writes do not pile up as dirty pages of the image in the
        # host's page cache, which FICLONE would have to flush inside the window
        loops.append(
            proc.check_tool("losetup", "-f", "--show", "--direct-io=on", str(data_img)).strip()
        )
        data.mkdir()
        proc.check_tool("mount", loops[-1], str(data))
        mounted.append(data)
        say(
            f"1. an ext4 volume at {escape(str(data))} ({loops[-1]}), its image on a "
            f"reflink-capable XFS ({loops[0]})"
        )
        db = data / "shop.sqlite"
        assets = data / "assets"
        assets.mkdir()
        for i in range(200):  # files that do not change between the runs
            (assets / f"img{i:03d}.bin").write_bytes(os.urandom(20_000))
        writer = proc.spawn([sys.executable, "-c", WRITER, str(db)], stderr=None)
        assert writer.stdout is not None
        if writer.stdout.readline().strip() != b"ready":
            raise QuiesceError("the demo's SQLite writer did not start")
        rows = _Rows(writer)
        time.sleep(0.5)
        say(f"2. an SQLite writer commits rows into {db.name} (WAL mode), non-stop")
        job_file, state, cfg = _job_files(base, data, db)
        runs = []
        for n in (1, 2):
            runs.append(_one_run(n, job_file, state, cfg, rows, console, say))
            time.sleep(0.7)
        proc.kill_group(writer, grace=30)
        restored = _restore_and_check(runs[-1], cfg, state, base, say)
        result = {
            "runs": [r["summary"] for r in runs],
            "restore": restored,
            "rows_committed_in_total": rows.total,
            "duration_s": round(time.monotonic() - t_start, 3),
        }
        if restored["integrity_check"] != "ok" or not restored["all_committed_rows_present"]:
            raise QuiesceError("demo check failed: the restored database is not consistent")
        say(f"done in {time.monotonic() - t_start:.1f} s")
        if as_json:
            sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n")
        return result
    finally:
        if writer is not None and writer.poll() is None:
            proc.kill_group(writer)
        _teardown(base, mounted, loops)
        say("cleaned up: writer stopped, volumes unmounted, loop devices detached, files removed")


def _job_files(base: Path, data: Path, db: Path) -> tuple[Path, Path, Any]:
    from quiesce.backup.config import BackupConfig

    state = base / "state"
    job_file = base / "demo.toml"
    job_file.write_text(
        f'name = "demo"\nvolumes = ["{data}"]\nstate_dir = "{state}"\n\n'
        '[provider]\ntype = "reflink"\n\n'
        f'[writers]\nsqlite = [{{ databases = ["{db}"] }}]\n\n'
        "[timeouts]\nfreeze = 10\n"
    )
    job_file.chmod(0o600)
    pw = base / "restic.pass"
    pw.write_text("demo password, never on a command line\n")
    pw.chmod(0o600)
    cfg = BackupConfig(
        target="restic",
        repository=str(base / "restic-repo"),
        password_file=str(pw),
        init=True,
        mount_root=str(base / "backup-mounts"),
        verify="sample",
        sample_files=5,
        verify_dir=str(base),
        tags=["demo"],
    )
    return job_file, state, cfg


def _one_run(
    n: int, job_file: Path, state: Path, cfg: Any, rows: _Rows, console: Console | None, say: Any
) -> dict[str, Any]:
    from quiesce import snapshot as snapshots
    from quiesce.backup.phase import run_backup
    from quiesce.backup.progress import progress_for
    from quiesce.job.run import run_job
    from quiesce.job.validate import load_job
    from quiesce.state.retention import RetentionPolicy

    job = load_job(job_file)
    report = run_job(job)
    if report.error:
        raise QuiesceError(f"run {n} failed: {report.error['message']}")
    man = snapshots.load(str(report.manifest_id), state)
    window = report.window or {}
    lock = next((p for p in report.phases if "writer" in p.name or "pre-freeze" in p.name), None)
    t_lock = lock.start if lock is not None and lock.start else report.started
    vol = (window.get("volumes") or [{}])[0]
    say(
        f"{n + 2}. run {n}: sqlite lock -> freeze -> reflink clone -> thaw: freeze window "
        f"[bold]{human_duration(window.get('window_s'))}[/] "
        f"(FIFREEZE {human_duration(vol.get('freeze_s'))}, "
        f"clone {human_duration(window.get('snapshot_s'))}, "
        f"frozen {human_duration(vol.get('frozen_for_s'))}), "
        f"snapshot {escape(man.id)} (consistency: {man.consistency})"
    )
    with progress_for(console, f"restic backup {n}", interval=5.0) as progress:
        bk = run_backup(
            man, cfg, job="demo", state=state, retention=RetentionPolicy(keep_last=1),
            progress=progress,
        )  # fmt: skip
    if not bk.ok:
        raise QuiesceError(f"backup {n} failed: {(bk.error or {}).get('message')}")
    r = bk.result
    assert r is not None and bk.verify is not None
    mount = bk.mounts[0]
    say(
        f"   backup: mounted read-only at {escape(mount['path'])} ({mount['options']}), "
        f"restic stored {human_bytes(r.bytes_added)} of {human_bytes(r.bytes)} "
        f"in {human_duration(r.duration_s)} "
        f"(unchanged files not reread: {r.files_unmodified} of {r.files})"
    )
    say(
        f"   verify (sample): {bk.verify.files_checked} files restored and compared byte for "
        f"byte: {'ok' if bk.verify.ok else 'FAILED'} in {bk.verify.duration_s:.2f} s"
    )
    ret = bk.retention or {}
    if ret.get("deleted"):
        say(f"   retention keep_last=1: deleted snapshot {escape(', '.join(ret['deleted']))}")
    return {
        "manifest": man,
        "backup": bk,
        "committed_before_lock": rows.committed_before(t_lock),
        "summary": {
            "snapshot": man.id,
            "freeze_window_s": window.get("window_s"),
            "consistency": man.consistency,
            "backup": bk.to_dict(),
        },
    }


def _restore_and_check(
    last: dict[str, Any], cfg: Any, state: Path, base: Path, say: Any
) -> dict[str, Any]:
    from quiesce.backup.phase import make_target

    bk = last["backup"]
    slug = bk.mounts[0]["slug"]
    target = make_target(cfg, "demo", state)
    dest = base / "restore"
    target.restore(bk.result.snapshot_id, dest, [slug])
    db = dest / slug / "shop.sqlite"
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        check = conn.execute("PRAGMA integrity_check").fetchone()[0]
        count, top = conn.execute("SELECT count(*), coalesce(max(id), 0) FROM orders").fetchone()
    finally:
        conn.close()
    before = last["committed_before_lock"]
    present = count == top and count >= before
    say(
        f"5. restored {db.name} from restic: PRAGMA integrity_check = [bold]{check}[/], "
        f"{count} rows (the writer had committed {before} when the lock was taken; "
        f"{'none missing' if present else 'ROWS MISSING'})"
    )
    return {
        "integrity_check": check,
        "rows": count,
        "committed_before_snapshot": before,
        "all_committed_rows_present": present,
    }


def _teardown(base: Path, mounted: list[Path], loops: list[str]) -> None:
    from quiesce.snapshot.cleanup import cleanup

    with contextlib.suppress(Exception):
        cleanup(base / "state")  # whatever a failed backup left mounted
    # inner first: its loop device keeps the image on the host filesystem busy
    for i in reversed(range(len(mounted))):
        for _ in range(50):
            if proc.try_tool("umount", str(mounted[i])):
                break
            time.sleep(0.1)
        if i < len(loops):
            proc.try_tool("losetup", "-d", loops[i])
    for dev in loops[len(mounted) :]:
        proc.try_tool("losetup", "-d", dev)
    shutil.rmtree(base, ignore_errors=True)


__all__ = ["run_full_demo"]
