"""One group snapshot across hosts, driven by Ansible, always thawed (issue 13).

On the fleet ground (quiesce_testing/ground.py: sshd per host in its own mount namespace,
Ansible over real SSH), the collection's group playbook runs under the hopping writer
(records that hop between hosts, each acknowledged before the next): the hosts'
snapshots must hold a prefix of the records (check_cut). The negative control (cuts
taken host by host are caught) is in test_fleet_ground.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import select
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from quiesce_testing.ground import Fleet, Host, freeze_host, thaw_host
from quiesce_testing.ground_writer import check_cut

ROOT = Path(__file__).resolve().parents[1]
COLLECTIONS = ROOT  # ansible_collections/ lives at the repo root
PLAYBOOK = ROOT / "ansible_collections" / "quiesce" / "fleet" / "playbooks" / "group.yml"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0
    or not Path("/usr/sbin/sshd").exists()
    or not shutil.which("nsenter")
    or importlib.util.find_spec("ansible") is None,
    reason="needs root, Debian's sshd, nsenter and ansible-core (scripts/fleet-setup.sh)",
)


def say(capsys: pytest.CaptureFixture[str], text: str) -> None:
    with capsys.disabled():
        print(f"\n  [fleet-group] {text}", end="")


def snap_dir(h: Host) -> Path:
    return h.dir / "snaps"


def copy_provider(h: Host) -> dict[str, Any]:
    """The hosts' own provider here: `command`, copying the volume to the host's dir."""
    d = snap_dir(h)
    create = (
        f'd={d}/"$QUIESCE_SNAPSHOT_NAME"; mkdir -p "$d" && '
        f'cp -a {h.data.mountpoint}/. "$d"/ && echo "$d"'
    )
    return {"type": "command", "options": {"create": ["sh", "-c", create],
                                           "delete": ["rm", "-rf", "{id}"]}}  # fmt: skip


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    with Fleet(3) as f:
        hv = f.base / "ansible" / "host_vars"
        hv.mkdir()
        for h in f.hosts:
            snap_dir(h).mkdir()
            (hv / f"{h.name}.yml").write_text(
                yaml.safe_dump({"quiesce_provider": copy_provider(h)})
            )
        yield f


def play(fleet: Fleet, name: str, **extra: Any) -> tuple[subprocess.CompletedProcess[str], dict]:
    report = fleet.base / f"report-{name}.json"
    ev = {"quiesce_name": name, "quiesce_report": str(report), **extra}
    p, _ = fleet.playbook(PLAYBOOK, "-e", json.dumps(ev), ANSIBLE_COLLECTIONS_PATH=str(COLLECTIONS))
    data = json.loads(report.read_text()) if report.exists() else {}
    return p, data


def snapshot_copies(fleet: Fleet, name: str, file: str) -> list[bytes]:
    return [(snap_dir(h) / f"{name}-{h.name}" / file).read_bytes() for h in fleet.hosts]


def test_mode_hosts_group_snapshot_is_consistent(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    w = fleet.start_writer("a.log")
    w.wait_for(20)
    t0 = time.monotonic()
    p, rep = play(fleet, "ga1")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    w.wait_for(10)
    assert rep["consistent"] and rep["kept"], rep
    cut = check_cut(snapshot_copies(fleet, "ga1", "a.log"))
    assert cut.consistent and cut.prefix >= w.acked_before(t0) >= 20
    w.stop()
    say(
        capsys,
        f"mode hosts: window {rep['window_s'] * 1e3:.1f} ms, skew {rep['skew_s'] * 1e3:.1f} ms, "
        f"max host window {rep['max_host_window_s'] * 1e3:.1f} ms, "
        f"overlap {rep['overlap_s'] * 1e3:.1f} ms, attempts {rep['attempts']}",
    )


def test_mode_command_one_command_for_the_group_is_consistent(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    """Mode (b): the controller runs one command while every host is frozen (here it
    copies each host's file from inside its namespace, as an array snapshot would)."""
    dest = fleet.base / "array-gb1"
    dest.mkdir()
    copy = "; ".join(
        f"nsenter --target {h.pid} --mount --root -- "
        f"cat {h.data.mountpoint}/b.log > {dest}/{h.name}"
        for h in fleet.hosts
    )
    w = fleet.start_writer("b.log")
    w.wait_for(20)
    t0 = time.monotonic()
    p, rep = play(fleet, "gb1", quiesce_mode="command", quiesce_command=["sh", "-c", copy])
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    w.wait_for(10)
    assert rep["consistent"] and rep["command"]["rc"] == 0, rep
    cut = check_cut([(dest / h.name).read_bytes() for h in fleet.hosts])
    assert cut.consistent and cut.prefix >= w.acked_before(t0) >= 20
    w.stop()
    say(
        capsys,
        f"mode command: window {rep['window_s'] * 1e3:.1f} ms, skew {rep['skew_s'] * 1e3:.1f} ms, "
        f"command {rep['command']['duration_s'] * 1e3:.1f} ms, "
        f"overlap {rep['overlap_s'] * 1e3:.1f} ms",
    )


PROBE_START_S = 120.0  # nsenter + a Python start-up on a loaded machine: never the verdict


def start_probe(h: Host) -> subprocess.Popen[str]:
    """A write + fsync on ``h``'s volume, in its namespace; returns once the probe is
    about to write (its start-up, seconds on a busy machine, is not counted by callers).
    Once done it prints its CLOCK_MONOTONIC time (the hosts share the machine's clock)."""
    code = ("import os,sys,time; print('ready', flush=True); "
            "fd=os.open(sys.argv[1], os.O_CREAT|os.O_WRONLY|os.O_APPEND); "
            "os.write(fd, b'x'); os.fsync(fd); print(time.monotonic(), flush=True)")  # fmt: skip
    p = h.popen("python3", "-I", "-S", "-c", code, f"{h.data.mountpoint}/probe",
                stdout=subprocess.PIPE)  # fmt: skip
    assert p.stdout is not None
    ready = select.select([p.stdout], [], [], PROBE_START_S)[0]
    assert ready and p.stdout.readline() == "ready\n", f"{h.name}: the probe did not start"
    return p


def probe_done_at(p: subprocess.Popen[str], timeout: float) -> float | None:
    """When the probe's write completed (monotonic), or None if not within ``timeout``."""
    try:
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()  # it dies only once the volume thaws: reaped then, in the background
        threading.Thread(target=p.wait, daemon=True).start()
        return None
    out = p.stdout.read() if p.stdout else ""
    return float(out) if p.returncode == 0 and out.strip() else None


def writable(h: Host, timeout: float) -> bool:
    """The write completes within ``timeout`` s of the probe being ready."""
    return probe_done_at(start_probe(h), timeout) is not None


def thawed_within(fleet: Fleet, probes: list[Any], t0: float, bound: float) -> float:
    """Every host's waiting probe got its write through within ``bound`` s of ``t0``
    (the moment the write went through, not when a probe started after it); the latest."""
    took = 0.0
    for h, p in zip(fleet.hosts, probes, strict=True):
        done = probe_done_at(p, bound + 30.0)
        assert done is not None, f"{h.name} still frozen {bound + 30:g} s later"
        assert done - t0 <= bound, f"{h.name} thawed {done - t0:.2f} s later (bound {bound:g})"
        took = max(took, done - t0)
    return took


def test_sigkill_of_ansible_playbook_inside_the_window_thaws_every_host(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    lease = 2.0
    mark = fleet.base / "in-window"
    ev = {"quiesce_name": "gk", "quiesce_mode": "command", "quiesce_lease": lease,
          "quiesce_deadline": 120, "quiesce_command_timeout": 60,
          "quiesce_command": ["sh", "-c", f"touch {mark}; sleep 60"]}  # fmt: skip
    pb = subprocess.Popen(
        [sys.executable, "-m", "ansible", "playbook", str(PLAYBOOK), "-e", json.dumps(ev)],
        env=fleet.ansible_env(ANSIBLE_COLLECTIONS_PATH=str(COLLECTIONS)), cwd=fleet.base,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not mark.exists():
            assert pb.poll() is None and time.monotonic() < deadline, "never reached the window"
            time.sleep(0.02)
        assert not writable(fleet.hosts[0], 0.3), "host0 is not frozen inside the window"
        probes = [start_probe(h) for h in fleet.hosts]  # waiting in the frozen write
        os.kill(pb.pid, signal.SIGKILL)
        t_kill = time.monotonic()
        took = thawed_within(fleet, probes, t_kill, lease + 1.0)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pb.pid, signal.SIGKILL)
        pb.wait()
    say(
        capsys,
        f"SIGKILL of ansible-playbook: every host writable {took:.2f} s later (lease {lease:g} s)",
    )


def test_a_foreign_freeze_on_one_host_thaws_all_and_keeps_nothing(fleet: Fleet) -> None:
    h1 = fleet.hosts[1]
    freeze_host(h1, deadline=60)
    try:
        p, rep = play(fleet, "gf")
    finally:
        thaw_host(h1)
    assert p.returncode != 0
    assert not rep["consistent"] and not rep["kept"]
    assert [f["host"] for f in rep["failed"]] == ["host1"], rep["failed"]
    assert "already frozen" in rep["failed"][0]["why"], rep["failed"]
    assert "host1" in p.stdout and "already frozen" in p.stdout
    for h in fleet.hosts:
        assert not (snap_dir(h) / f"gf-{h.name}").exists(), f"{h.name}: snapshot kept"
        assert writable(h, 5.0)


def test_a_host_unreachable_at_the_start_freezes_nothing_anywhere(fleet: Fleet) -> None:
    hv = fleet.base / "ansible" / "host_vars" / "host2.yml"
    saved = hv.read_text()
    hv.write_text(saved + "ansible_port: 1\n")  # nothing listens there
    w = fleet.start_writer("u.log")
    try:
        w.wait_for(10)
        p, rep = play(fleet, "gu")
        w.wait_for(10)
        assert max(w.latencies) < 2.0, "a host was frozen"
    finally:
        hv.write_text(saved)
        w.stop()
    assert p.returncode != 0 and rep == {}
    assert "host2" in p.stdout and "UNREACHABLE" in p.stdout
    assert "TASK [Freeze everywhere" not in p.stdout


def test_coordinator_unreachable_host_reports_it_and_freezes_nothing(fleet: Fleet) -> None:
    from quiesce.integrations.fleet.coordinator import run_group

    members = [member(fleet, h) for h in fleet.hosts]
    members[2].ssh[members[2].ssh.index("-p") + 1] = "1"
    rep = run_group(members, name="gu2", connect_s=10)
    assert not rep["consistent"] and [f["host"] for f in rep["failed"]] == ["host2"]
    assert all(v.get("thaw_reason") is None for v in rep["per_host"].values()), rep
    for h in fleet.hosts:
        assert not (snap_dir(h) / f"gu2-{h.name}").exists()


def member(fleet: Fleet, h: Host, **kw: Any) -> Any:
    from quiesce.integrations.fleet.coordinator import Member
    from quiesce_testing.ground import PYTHON, SRC

    ssh = ["ssh", "-p", str(h.port), "-i", str(fleet.key), "-o", "BatchMode=yes",
           "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
           "-o", "LogLevel=ERROR", f"root@{h.address}"]  # fmt: skip
    return Member(h.name, ssh, [h.data.mountpoint], PYTHON, str(SRC), copy_provider(h), **kw)


# A database writer per host (SQLite, WAL): row n goes to host n % 2 and is committed
# before row n+1 is sent, so the two databases together must hold a prefix 1..k.
_DB_AGENT = r"""
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], timeout=30, isolation_level=None)
db.execute("PRAGMA journal_mode=wal")
db.execute("CREATE TABLE IF NOT EXISTS rec (n INTEGER PRIMARY KEY)")
print("ready", flush=True)
for line in sys.stdin:
    db.execute("INSERT INTO rec VALUES (?)", (int(line),))
    print("ack", flush=True)
"""


def test_sqlite_on_two_hosts_quiesced_by_their_writers_restore_consistent(
    fleet: Fleet, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """SQLite databases on two hosts, each quiesced by quiesce's SQLite writer through the
    play (PostgreSQL and MariaDB on two hosts: tests/test_fleet_databases.py)."""
    hosts = fleet.hosts[:2]
    hv = fleet.base / "ansible" / "host_vars"
    saved = {h.name: (hv / f"{h.name}.yml").read_text() for h in hosts}
    agents = []
    for h in hosts:
        db = f"{h.data.mountpoint}/app.db"
        writers = [{"type": "sqlite", "databases": [db], "busy_timeout": 20}]
        (hv / f"{h.name}.yml").write_text(
            saved[h.name] + yaml.safe_dump({"quiesce_writers": writers})
        )
        a = h.popen(sys.executable, "-I", "-S", "-c", _DB_AGENT, db,
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
        assert a.stdout is not None and a.stdout.readline() == "ready\n"
        agents.append(a)
    acked = 0
    stop = False

    def drive() -> None:
        nonlocal acked
        while not stop:
            a = agents[(acked + 1) % 2]
            assert a.stdin is not None and a.stdout is not None
            a.stdin.write(f"{acked + 1}\n")
            a.stdin.flush()
            assert a.stdout.readline() == "ack\n"
            acked += 1

    t = threading.Thread(target=drive, daemon=True)
    t.start()
    try:
        while acked < 20:
            time.sleep(0.01)
        before = acked
        p, rep = play(fleet, "gs")
        assert p.returncode == 0, p.stdout[-6000:]
        assert rep["consistent"], rep
    finally:
        stop = True
        t.join(timeout=30)
        for a in agents:
            a.stdin.close()  # type: ignore[union-attr]
            a.wait(timeout=10)
        for h in hosts:
            (hv / f"{h.name}.yml").write_text(saved[h.name])
    rows = []
    for h in hosts:  # restore: the snapshot's files into a fresh place, opened by SQLite
        dest = tmp_path / h.name
        shutil.copytree(snap_dir(h) / f"gs-{h.name}", dest)
        db = sqlite3.connect(dest / "app.db")
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        rows.append([n for (n,) in db.execute("SELECT n FROM rec ORDER BY n")])
        db.close()
    assert all(n % 2 == i for i, ns in enumerate(rows) for n in ns)
    union = sorted(rows[0] + rows[1])
    assert union == list(range(1, len(union) + 1)) and len(union) >= before, union[-5:]
    say(capsys, f"sqlite on 2 hosts: restored prefix 1..{len(union)} (of {acked} committed)")


def test_a_broken_network_lets_every_host_thaw_by_its_lease(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    """The controller's channels stop carrying anything (its ssh clients SIGSTOPped: no
    renewal reaches any host) inside the window: every host thaws within its lease + 1 s
    by itself, and the group, whose command outlived the thaws, is not kept."""
    from quiesce.integrations.fleet.coordinator import run_group

    lease = 1.5
    mark = fleet.base / "in-window-net"
    members = [member(fleet, h) for h in fleet.hosts]
    out: dict[str, Any] = {}
    cmd = ["sh", "-c", f"touch {mark}; sleep {lease + 3}"]
    t = threading.Thread(
        target=lambda: out.update(
            run_group(members, name="gn", mode="command", command=cmd, lease_s=lease)
        )
    )
    t.start()
    clients: list[int] = []
    try:
        deadline = time.monotonic() + 30
        while not mark.exists():
            assert t.is_alive() and time.monotonic() < deadline
            time.sleep(0.01)
        clients = [p for p in _children(os.getpid()) if b"fleet.agent" in _cmdline(p)]
        assert len(clients) == 3
        probes = [start_probe(h) for h in fleet.hosts]  # waiting in the frozen write
        for pid in clients:
            os.kill(pid, signal.SIGSTOP)
        t_cut = time.monotonic()
        took = thawed_within(fleet, probes, t_cut, lease + 1.0)
    finally:
        for pid in clients:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        t.join(timeout=60)
    assert not out["consistent"] and not out["kept"], out
    reasons = {v.get("thaw_reason") for v in out["per_host"].values()}
    assert reasons <= {"controller-lease", None}, out["per_host"]
    say(capsys, f"network cut: every host writable {took:.2f} s later (lease {lease:g} s)")


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(entry))
    return kids


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_a_hold_too_short_is_caught_by_the_verdict_and_retried(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    """Mode hosts with no hold, each host armed only once the previous one has thawed
    (stagger_s: causality, not a clock offset, which overlapped under load): the hosts'
    frozen spans cannot overlap. The verdict must say so every time (the group's negative
    control: nothing kept); without the stagger, retries find a hold long enough for how
    late the hosts froze, and a cut the verdict calls consistent is consistent."""
    from quiesce.integrations.fleet.coordinator import run_group

    members = [member(fleet, h) for h in fleet.hosts]
    w = fleet.start_writer("h.log")
    caught = 0
    for i in range(4):
        w.wait_for(10)
        rep = run_group(members, name=f"gh{i}", hold_s=0.0, attempts=1, stagger_s=0.05)
        dirs = [snap_dir(h) / f"gh{i}-{h.name}" for h in fleet.hosts]
        if not rep["consistent"]:
            caught += 1
        assert "no proven instant" in " ".join(rep["reasons"]), rep["reasons"]
        assert not rep["kept"] and rep["overlap_s"] is not None and rep["overlap_s"] < 0, rep
        assert not any(d.exists() for d in dirs), "an unproven group was kept"
    w.wait_for(10)
    rep = run_group(members, name="ghr", hold_s=0.0, attempts=4)
    assert rep["consistent"], rep["reasons"]
    cut = check_cut([(snap_dir(h) / f"ghr-{h.name}" / "h.log").read_bytes() for h in fleet.hosts])
    assert cut.consistent
    w.stop()
    assert caught == 4, f"{4 - caught} disjoint group(s) called consistent"
    say(
        capsys,
        f"hold 0: {caught}/4 groups unproven and deleted; retried to hold "
        f"{rep['hold_s'] * 1e3:.0f} ms after {len(rep['retries'])} retries: consistent",
    )


def test_check_refuses_a_volume_quiesce_holds_and_thaw_releases_it(fleet: Fleet) -> None:
    """The per-host modules: check names a volume another quiesce run holds frozen; the
    play's safety net (thaw) asks that guardian to thaw it."""
    from quiesce_testing.ground import PYTHON, AnsibleFailed

    h = fleet.hosts[0]
    mp = h.data.mountpoint
    # As the hosts' own sessions do: the machine's run dir, not the tests' private one.
    held = h.run("env", "-u", "QUIESCE_RUN_DIR", PYTHON, "-m", "quiesce", "freeze", mp,
                 "--timeout", "60", "--lease", "0", check=False)  # fmt: skip
    assert held.returncode == 0, held.stdout + held.stderr
    try:
        assert not writable(h, 0.3)
        env = {"ANSIBLE_COLLECTIONS_PATH": str(COLLECTIONS)}
        with pytest.raises(AnsibleFailed) as e:
            fleet.ansible("quiesce.fleet.check", f"volumes={mp}", pattern=h.name, **env)
        assert "already frozen by quiesce" in e.value.results[h.name]["msg"]
        r = fleet.ansible("quiesce.fleet.thaw", f"volumes={mp}", pattern=h.name, **env)
        assert r[h.name]["thawed"] == [mp] and r[h.name]["changed"]
        assert writable(h, 5.0)
        r = fleet.ansible("quiesce.fleet.thaw", f"volumes={mp}", pattern=h.name, **env)
        assert r[h.name]["thawed"] == [] and not r[h.name]["changed"]
    finally:
        h.ioctl("thaw-quiet")


def test_mode_command_negative_control_a_host_thawed_before_the_command_is_caught(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    """Mode command's negative control: one host runs an agent with a fault
    (quiesce_testing.faults: it thaws by itself right after its freeze), so the group
    command's instant is not inside every host's frozen span although every host said
    "frozen" before it started and none was told to thaw before it ended. The verdict
    must say inconsistent every time and nothing be kept; the same group without the
    fault is consistent (the verdict can say both)."""
    from quiesce.integrations.fleet.coordinator import run_group

    members = [member(fleet, h) for h in fleet.hosts]
    cmd = ["sleep", "0.1"]
    w = fleet.start_writer("nc.log")
    faults = [("host0", 0.0), ("host1", 0.0), ("host2", 0.02), ("host1", 0.05)]
    caught = 0
    reasons = []
    for i, (host, after) in enumerate(faults):
        w.wait_for(10)
        faulty = ("-m", "quiesce_testing.faults", "early-thaw", str(after))
        group = [dataclasses.replace(m, agent=faulty) if m.name == host else m for m in members]
        rep = run_group(group, name=f"gnc{i}", mode="command", command=cmd)
        assert rep["per_host"][host]["thaw_reason"] == "test-early", rep["per_host"]
        if not rep["consistent"]:
            caught += 1
            assert not rep["kept"] and rep["command"]["rc"] == 0, rep
            reasons += rep["reasons"]
    w.wait_for(10)
    rep = run_group(members, name="gnc-ok", mode="command", command=cmd)
    w.stop()
    assert rep["consistent"] and rep["kept"], rep["reasons"]
    say(
        capsys,
        f"mode command, one host thawed early: {caught}/{len(faults)} groups caught "
        f"({'; '.join(sorted({r.split(':')[0][:50] for r in reasons}))}); "
        f"without the fault: consistent, window {rep['window_s'] * 1e3:.0f} ms",
    )
    assert caught == len(faults), f"{len(faults) - caught} early thaw(s) not caught"
