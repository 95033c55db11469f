"""Both sides of a hypervisor, in one booted guest (``pytest -m vm``).

The guest (quiesce.cli.demo.vmhost: virtme-ng, Debian's kernel, software emulation) runs
Debian's qemu-guest-agent with quiesce as its fsfreeze hook (integrations/qga) and a writer
whose acknowledged records hop between two data disks; the host side is the ``qemu``
provider (providers/qemu.py) talking to the agent's socket and reflink-cloning the disks.
One guest serves every test (booting costs minutes under emulation); each test leaves it
thawed, with its agent running. Missing tooling skips with a reason naming vm-setup.sh.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from quiesce import snapshot as snapshots
from quiesce.backup.config import BackupConfig
from quiesce.backup.phase import run_backup
from quiesce.backup.restoring import restore
from quiesce.cli.demo import vmhost
from quiesce.errors import QuiesceError
from quiesce.providers.qemu import GuestGroup, GuestRefused, QemuProvider
from quiesce.providers.qga import AgentError, GuestAgent

pytestmark = [pytest.mark.vm, pytest.mark.timeout(7200)]
DEADLINE, LEASE = 60.0, 2.0  # the guest job's watchdog (above the thaw hook's start-up)
AGENT_TIMEOUT = 900.0  # a freeze runs the guest's hook: minutes under emulation on a busy host


@pytest.fixture(scope="module")
def guest() -> Iterator[vmhost.Guest]:
    why = vmhost.missing()
    if why:
        pytest.skip(why)
    g = vmhost.boot(deadline=DEADLINE, lease=LEASE, timeout=900)
    try:
        with GuestAgent(str(g.agent), timeout=AGENT_TIMEOUT) as a:  # the agent answers
            assert a.status() == "thawed"
        print(f"guest booted in {g.boot_s:.0f}s")
        yield g
    finally:
        print(g.tail(60))
        print(g.kmsg())
        g.close()


@pytest.fixture
def settled(guest: vmhost.Guest) -> vmhost.Guest:
    """The guest thawed, its agent running and answering, its writer moving."""
    guest.command("cont-agent")
    with GuestAgent(str(guest.agent), timeout=AGENT_TIMEOUT) as a:
        if a.status() != "thawed":
            a.thaw()
    guest.wait_acks(2)
    return guest


def _clones(g: vmhost.Guest) -> list[Path]:
    return sorted((g.xfs / "snaps").iterdir())


def _remove_clones(g: vmhost.Guest) -> None:
    for p in _clones(g):
        p.unlink()


def test_snapshot_holds_every_acknowledged_record_and_the_control_is_caught(
    settled: vmhost.Guest,
) -> None:
    """Frozen through the agent: both disks' clones hold a prefix with every record acked
    before the freeze. Negative control, no freeze: disk a cloned, three more records
    acknowledged, disk b cloned: the cut misses a record that a later one follows."""
    g = settled
    p = QemuProvider(g.options(agent_timeout=AGENT_TIMEOUT))
    p.prepare([], "good")
    acked = g.acks()
    snaps = p.snapshot([])
    try:
        ok, why = vmhost.check_cut(g.records([Path(s.location) for s in snaps]), acked)
        assert ok, why
        extra = snaps[0].extra
        assert extra["thawed_by"] == "agent" and extra["frozen"] is True
        assert extra["guest_window_s"] > 0 and extra["host_window_s"] > 0
        # the host saw the guest frozen for part of what the guest measured (the guest's
        # thaw time is its thaw hook's start, in clock ticks: 10 ms), and waited longer
        assert extra["host_window_s"] <= extra["guest_window_s"] + 0.011
        assert extra["guest_window_s"] <= extra["host_wait_s"]
        print(
            f"RESULT host_window_s={extra['host_window_s']:.3f} "
            f"host_wait_s={extra['host_wait_s']:.3f} "
            f"guest_window_s={extra['guest_window_s']:.3f} {why}"
        )
        # the stock hook directory's script ran on both sides of the freeze
        assert (g.rw / "hookdir.log").read_text().split()[-2:] == ["freeze", "thaw"]
    finally:
        _remove_clones(g)
    # negative control: the two disks cloned at two instants, three records apart
    a, b = g.xfs / "snaps/ctl-a.raw", g.xfs / "snaps/ctl-b.raw"
    try:
        g.clone(g.disks[0], a)
        g.wait_acks(3)
        g.clone(g.disks[1], b)
        ok, why = vmhost.check_cut(g.records([a, b]), 0)
        assert not ok, f"the negative control was not caught: {why}"
        print(f"RESULT negative_control_caught=1 ({why})")
    finally:
        _remove_clones(g)


def test_backup_of_a_guest_snapshot_restores_every_acknowledged_record(
    settled: vmhost.Guest, tmp_path: Path
) -> None:
    """The running guest snapshotted by the qemu provider (through the engine, as a job
    runs it), then the backup phase: each disk clone mounted read-only on the host as the
    ext4 it holds (no journal replay needed: the guest froze it), backed up with restic,
    verified by sample; the backup restored into a temp dir: the two restored ``records``
    files hold one cut with every record acknowledged before the snapshot."""
    g = settled
    state = tmp_path / "state"
    (tmp_path / "pw").write_text("secret")
    cfg = BackupConfig(
        target="restic", repository=str(tmp_path / "repo"), password_file=str(tmp_path / "pw"),
        init=True, host="h", mount_root=str(tmp_path / "run"), verify="sample",
        sample_files=2, verify_dir=str(tmp_path),
    )  # fmt: skip
    t0 = time.monotonic()
    acked = g.acks()
    man = snapshots.create(
        [str(g.xfs)], "qemu", job="guest", options=g.options(agent_timeout=AGENT_TIMEOUT),
        state_dir=state,
    )  # fmt: skip
    try:
        snapped = time.monotonic()
        assert [s.fstype for s in man.snapshot_objects()] == ["image", "image"]
        rep = run_backup(man, cfg, job="guest", state=state)
        assert rep.ok, rep.error
        assert [m["fstype"] for m in rep.mounts] == ["ext4", "ext4"]
        assert not [w for w in rep.warnings if "journal recovery" in w], rep.warnings
        assert rep.verify is not None and rep.verify.ok
        backed = time.monotonic()
        got = restore(cfg, job="guest", state=state, dest=tmp_path / "restored")
        slugs = [m["slug"] for m in rep.mounts]
        assert sorted(got.volumes) == sorted(slugs)
        cut = [
            [int(x) for x in (tmp_path / "restored" / s / "records").read_text().split()]
            for s in slugs
        ]
        ok, why = vmhost.check_cut(cut, acked)
        assert ok, why
        print(
            f"RESULT restored_records {why}; snapshot {snapped - t0:.1f}s, "
            f"backup+verify {backed - snapped:.1f}s, restore {time.monotonic() - backed:.1f}s"
        )
        assert not any((tmp_path / "run").rglob("*"))  # unmounted, nothing left
    finally:
        with contextlib.suppress(QuiesceError):
            snapshots.delete(man.id, state)
        _remove_clones(g)


_CONTROLLER = """
import json, sys, time
from quiesce.providers.options import QemuOptions
from quiesce.providers.qemu import GuestGroup
grp = GuestGroup(QemuOptions.parse(json.loads(sys.argv[1])))
grp.connect()
grp.freeze()
print("frozen", flush=True)
time.sleep(3600)
"""


def test_host_killed_inside_the_window_guest_writable_by_its_deadline(
    settled: vmhost.Guest,
) -> None:
    """The host's controller is SIGKILLed with the guest frozen: the guest's watchdog
    thaws it by its deadline (writes resume), says so in the kernel log, and a later
    thaw from the host finds nothing frozen."""
    g = settled
    opts = json.dumps(g.options(agent_timeout=AGENT_TIMEOUT).model_dump(mode="json"))
    env = dict(os.environ, PYTHONPATH=str(Path(vmhost.__file__).resolve().parents[3]))
    ctl = subprocess.Popen(
        [sys.executable, "-c", _CONTROLLER, opts], stdout=subprocess.PIPE, env=env, text=True
    )
    try:
        assert ctl.stdout is not None and ctl.stdout.readline().strip() == "frozen"
        before = g.acks()
        os.kill(ctl.pid, signal.SIGKILL)
        t_kill = time.monotonic()
    finally:
        ctl.kill()
        ctl.wait()
    g.wait_for(lambda: g.acks() > before + 1, DEADLINE + 600, "writes after the host died")
    to_writable = time.monotonic() - t_kill
    print(f"RESULT host_death_to_writable_s={to_writable:.1f} (guest deadline {DEADLINE:g}s)")
    assert "deadline of" in g.kmsg()
    with GuestAgent(str(g.agent), timeout=AGENT_TIMEOUT) as a:
        assert a.thaw() == 0  # the agent still believed it was frozen; nothing was
        rec = json_record(a)
    assert rec["event"] == "watchdog" and rec["thawed_by"] == "guest-watchdog"
    assert all(v["after"] in ("thawed", "not-frozen") for v in rec["volumes"])


def json_record(a: GuestAgent) -> dict[str, object]:
    data = a.read_file("/run/quiesce/qga/last.json")
    assert data is not None
    return dict(json.loads(data))


def test_host_never_thaws_guest_thaws_itself_and_the_snapshot_is_refused(
    settled: vmhost.Guest,
) -> None:
    """Frozen, clones made, and the host's thaw comes after the guest's deadline: the
    guest thawed itself (kernel log, record), and the host refuses the clones (its thaw
    found nothing frozen)."""
    g = settled
    grp = GuestGroup(g.options(agent_timeout=AGENT_TIMEOUT))
    grp.connect()
    try:
        grp.freeze()
        n = len(g.kmsg().splitlines())
        g.wait_for(
            lambda: any("deadline of" in x for x in g.kmsg().splitlines()[n:]),
            DEADLINE + 600, "the guest watchdog's thaw",
        )  # fmt: skip
        grp.thaw()
    finally:
        grp.close()
    assert grp.broken(), "the host did not notice the guest thawed before its thaw"
    instant = grp.verdict()
    assert not instant.consistent and "thawed early" in " ".join(instant.reasons)
    assert grp.guests[0].record["thawed_by"] == "guest-watchdog"
    g.wait_acks(2, timeout=60)


def test_agent_stopped_inside_the_window_guest_watchdog_thaws(settled: vmhost.Guest) -> None:
    """The agent is SIGSTOPped with the guest frozen: the watchdog's lease lapses and it
    thaws; the host's thaw times out and fails cleanly. After SIGCONT the agent works."""
    g = settled
    grp = GuestGroup(g.options(agent_timeout=AGENT_TIMEOUT))
    grp.connect()
    try:
        grp.freeze()
        before = g.acks()
        g.command("stop-agent")
        t_stop = time.monotonic()
        g.wait_for(lambda: g.acks() > before + 1, DEADLINE + 600, "writes with the agent stopped")
        took = time.monotonic() - t_stop
        print(f"RESULT agent_stopped_to_writable_s={took:.1f} (lease {LEASE:g}s)")
        assert "was stopped" in g.kmsg()
        for st in grp.guests:
            st.agent.timeout = 5
        with pytest.raises(AgentError, match="did not answer"):
            grp.thaw()
    finally:
        g.command("cont-agent")
        grp.close()
    with GuestAgent(str(g.agent), timeout=AGENT_TIMEOUT) as a:  # stale answers dropped by the sync
        if a.status() == "frozen":
            a.thaw()
        assert a.status() == "thawed"


def test_failing_guest_quiescer_no_freeze_clear_host_error_nothing_left(
    settled: vmhost.Guest,
) -> None:
    """A guest pre-freeze hook fails: the agent does not freeze, the host's error names
    the hook and its message, no clone is left and the guest keeps writing."""
    g = settled
    flag = g.rw / "fail-quiescer"
    flag.write_text("")
    p = QemuProvider(g.options(agent_timeout=AGENT_TIMEOUT))
    try:
        p.prepare([], "refused")
        with pytest.raises(GuestRefused, match="app-flush") as err:
            p.snapshot([])
        p.abort()
        print(f"host error: {err.value.message}")
        assert "nothing was snapshotted" in err.value.message
    finally:
        flag.unlink()
    assert _clones(g) == []
    with GuestAgent(str(g.agent), timeout=AGENT_TIMEOUT) as a:
        assert a.status() == "thawed"
    g.wait_acks(2, timeout=60)
