"""A PostgreSQL primary on one fleet host and MariaDB on another, one group snapshot (issue 13).

Both servers run inside their hosts' mount namespaces with their data on the hosts' loop
filesystems (tests/helpers/fleet_db.py). A load hops between them (row n into database
n mod 2, only after row n-1 committed). The collection's playbook quiesces each database
with its writer (``quiesce_writers`` in the host's vars: CHECKPOINT; BACKUP STAGE
BLOCK_COMMIT held across the window) and snapshots both, in mode ``hosts`` and in mode
``command``; then each database is started on a copy of its snapshot (crash recovery),
checked (pg_amcheck, CHECK TABLE) and read: the union of the rows must be a prefix
1..k of the sequence. The negative control takes the two snapshots one host after the
other (freezes that do not overlap) and must be caught as a non-prefix in most tries.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import fleet_db
from helpers.fleet_db import HoppingRows, HostMariadb, HostPostgres, restore_pair

from quiesce_testing.ground import Fleet, Host, freeze_host, thaw_host

ROOT = Path(__file__).resolve().parents[1]
PLAYBOOK = ROOT / "ansible_collections" / "quiesce" / "fleet" / "playbooks" / "group.yml"
TRIES = 4  # negative control

pytestmark = [
    pytest.mark.skipif(
        os.geteuid() != 0
        or not Path("/usr/sbin/sshd").exists()
        or not shutil.which("nsenter")
        or importlib.util.find_spec("ansible") is None,
        reason="needs root, Debian's sshd, nsenter and ansible-core (scripts/fleet-setup.sh)",
    ),
    pytest.mark.skipif(fleet_db.missing() is not None, reason=str(fleet_db.missing())),
    pytest.mark.timeout(300),
]


def say(capsys: pytest.CaptureFixture[str], text: str) -> None:
    with capsys.disabled():
        print(f"\n  [fleet-db] {text}", end="")


def snap_dir(h: Host) -> Path:
    return h.dir / "snaps"


def copy_provider(h: Host) -> dict[str, Any]:
    """The hosts' own provider here: `command`, copying the volume to the host's dir."""
    create = (
        f'd={snap_dir(h)}/"$QUIESCE_SNAPSHOT_NAME"; mkdir -p "$d" && '
        f'cp -a {h.data.mountpoint}/. "$d"/ && echo "$d"'
    )
    return {"type": "command", "options": {"create": ["sh", "-c", create],
                                           "delete": ["rm", "-rf", "{id}"]}}  # fmt: skip


@dataclass
class Ground:
    fleet: Fleet
    pg: HostPostgres
    my: HostMariadb
    load: HoppingRows
    run: Path
    up_s: float


@pytest.fixture(scope="module")
def ground() -> Iterator[Ground]:
    t0 = time.monotonic()
    run = fleet_db.run_dir()
    try:
        with Fleet(2, fstypes=("ext4",), size_mb=320) as f:
            pg, my = HostPostgres(f.hosts[0], run), HostMariadb(f.hosts[1], run)
            load: HoppingRows | None = None
            try:
                pg.start()
                my.start()
                hv = f.base / "ansible" / "host_vars"
                hv.mkdir()
                writers = {
                    "host0": [{"type": "postgresql", "dsn": pg.dsn, "timeout": 20}],
                    "host1": [{"type": "mysql", "unix_socket": str(my.sock), "user": "root",
                               "timeout": 20}],
                }  # fmt: skip
                for h in f.hosts:
                    snap_dir(h).mkdir()
                    (hv / f"{h.name}.yml").write_text(yaml.safe_dump(
                        {"quiesce_provider": copy_provider(h), "quiesce_writers": writers[h.name]}
                    ))  # fmt: skip
                load = HoppingRows(pg, my)
                load.wait_for(50)
                yield Ground(f, pg, my, load, run, time.monotonic() - t0)
            finally:
                if load is not None:
                    load.stop()
                my.stop()
                pg.stop()
    finally:
        shutil.rmtree(run, ignore_errors=True)


def play(g: Ground, name: str, **extra: Any) -> tuple[subprocess.CompletedProcess[str], dict]:
    report = g.fleet.base / f"report-{name}.json"
    ev = {"quiesce_name": name, "quiesce_report": str(report), **extra}
    p, _ = g.fleet.playbook(PLAYBOOK, "-e", json.dumps(ev), ANSIBLE_COLLECTIONS_PATH=str(ROOT))
    return p, (json.loads(report.read_text()) if report.exists() else {})


def assert_writers_quiesced(rep: dict[str, Any]) -> str:
    """Each host's writer quiesced its database inside the play (not only crash-consistent
    copies): PostgreSQL's CHECKPOINT on host0, MariaDB's commit lock taken and released on
    host1."""
    (pw,) = rep["per_host"]["host0"]["writers"]
    (mw,) = rep["per_host"]["host1"]["writers"]
    assert pw["kind"] == "postgresql" and pw["info"]["server_version"] >= 100000, pw
    assert mw["kind"] == "mysql" and mw["info"]["lock"] == "backup_stage", mw
    assert mw["info"]["locked"] is False, mw  # released after the thaw
    return f"writers {pw['quiesce_s'] * 1e3:.0f} / {mw['quiesce_s'] * 1e3:.0f} ms"


def size_mb(*dirs: Path) -> float:
    return sum(f.stat().st_size for d in dirs for f in d.rglob("*") if f.is_file()) / 2**20


def window(rep: dict[str, Any]) -> str:
    return (f"window {rep['window_s'] * 1e3:.1f} ms, skew {rep['skew_s'] * 1e3:.1f} ms, "
            f"overlap {rep['overlap_s'] * 1e3:.1f} ms")  # fmt: skip


def test_mode_hosts_quiesces_both_databases_and_restores_a_prefix(
    ground: Ground, capsys: pytest.CaptureFixture[str]
) -> None:
    g = ground
    g.load.wait_for(20)
    t0 = time.monotonic()
    # A lead far shorter than a CHECKPOINT: the writers must be done before the instant
    # is even picked (they were quiesced first, then the instant set), not race it.
    p, rep = play(g, "dh", quiesce_lead=0.02)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    took = time.monotonic() - t0
    g.load.wait_for(20)  # released: the load goes on after the thaw
    assert rep["consistent"] and rep["kept"], rep
    quiesced = assert_writers_quiesced(rep)
    for name, host in rep["per_host"].items():
        (w,) = host["writers"]
        assert w["done_ns"] < host["freeze_at_ns"], f"{name}: writer still busy at the instant"
    late = max(host["late_s"] for host in rep["per_host"].values())
    h0, h1 = g.fleet.hosts
    snaps = snap_dir(h0) / "dh-host0", snap_dir(h1) / "dh-host1"
    r = restore_pair(*snaps, g.run, 54601)
    assert r.prefix, f"not a prefix: {r.holes} hole(s), top {r.union[-4:]}"
    assert len(r.union) >= g.load.acked_before(t0) >= 50
    assert r.pg and r.my
    say(capsys, f"mode hosts (ansible-playbook {took:.1f} s): {window(rep)}, {quiesced}, "
                f"latest freeze {late * 1e3:.1f} ms after the instant (lead 20 ms), "
                f"attempts {rep['attempts']}; restored 1..{len(r.union)} ({'; '.join(r.notes)}); "
                f"snapshots {size_mb(*snaps):.0f} MiB (copied inside the window); "
                f"load {g.load.rate():.0f} rows/s; ground with both databases up in "
                f"{g.up_s:.1f} s (initdb {g.pg.init_s:.1f} s, "
                f"mariadb-install-db {g.my.init_s:.1f} s)")  # fmt: skip


def test_mode_command_quiesces_both_databases_and_restores_a_prefix(
    ground: Ground, capsys: pytest.CaptureFixture[str]
) -> None:
    """One group command (standing for an array's multi-volume snapshot) copies both
    hosts' volumes from inside their namespaces while both are frozen."""
    g = ground
    dest = g.fleet.base / "array-dc"
    copy = "; ".join(
        f"mkdir -p {dest}/{h.name} && nsenter --target {h.pid} --mount --root -- "
        f"cp -a {h.data.mountpoint}/. {dest}/{h.name}/"
        for h in g.fleet.hosts
    )
    g.load.wait_for(20)
    t0 = time.monotonic()
    p, rep = play(g, "dc", quiesce_mode="command", quiesce_command=["sh", "-c", copy])
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    took = time.monotonic() - t0
    g.load.wait_for(20)
    assert rep["consistent"] and rep["command"]["rc"] == 0, rep
    quiesced = assert_writers_quiesced(rep)
    r = restore_pair(dest / "host0", dest / "host1", g.run, 54602)
    assert r.prefix, f"not a prefix: {r.holes} hole(s), top {r.union[-4:]}"
    assert len(r.union) >= g.load.acked_before(t0)
    say(capsys, f"mode command (ansible-playbook {took:.1f} s): {window(rep)}, {quiesced}, command "
                f"{rep['command']['duration_s'] * 1e3:.0f} ms; restored 1..{len(r.union)}; "
                f"load {g.load.rate():.0f} rows/s")  # fmt: skip


def test_negative_control_snapshots_one_host_after_the_other_are_caught(
    ground: Ground, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each database's volume frozen and copied, then thawed, before the other's: each copy
    is crash-consistent alone (both restore and check clean), but rows committed between
    the two copies make the pair a non-prefix. The checker must see it in most tries."""
    g = ground
    h0, h1 = g.fleet.hosts
    caught, holes = 0, []
    for i in range(TRIES):
        g.load.wait_for(20)
        dest = g.fleet.base / f"neg{i}"
        for h in (h0, h1):  # PostgreSQL's host first, then MariaDB's: no common instant
            (dest / h.name).mkdir(parents=True)
            freeze_host(h)
            try:
                h.run("cp", "-a", f"{h.data.mountpoint}/.", f"{dest / h.name}/")
            finally:
                thaw_host(h)
        r = restore_pair(dest / "host0", dest / "host1", g.run, 54610 + i)
        shutil.rmtree(dest)
        holes.append(r.holes)
        caught += not r.prefix
    g.load.wait_for(10)
    say(capsys, f"negative control (one host after the other): {caught}/{TRIES} caught, "
                f"holes {holes}")  # fmt: skip
    assert caught > TRIES // 2, f"only {caught}/{TRIES} caught: the checker cannot fail"
