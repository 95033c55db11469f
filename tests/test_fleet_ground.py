"""The fleet test ground: simulated hosts reached by Ansible over real SSH (issue 13).

Each host is an sshd of the test's own in a mount namespace of its own, with its own
loop-image filesystem (quiesce_testing/ground.py). These tests prove the ground itself: it
comes up and goes away leaving nothing, Ansible reaches every host and each host sees only
its own volumes, a cut taken with overlapping freezes is consistent (and, as the negative
control, one taken host by host is caught), and the quiesce.fleet collection builds,
installs and runs against it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import quiesce
from quiesce_testing.ground import (
    PYTHON,
    SRC,
    Fleet,
    Host,
    alive,
    freeze_host,
    mnt_ns_of,
    pids_in_ns,
    snapshot_one_by_one,
    snapshot_overlapping,
    thaw_host,
)
from quiesce_testing.ground_writer import check_cut

ROOT = Path(__file__).resolve().parents[1]
COLLECTION = ROOT / "ansible_collections" / "quiesce" / "fleet"
TRIES = 10

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0
    or not Path("/usr/sbin/sshd").exists()
    or not shutil.which("nsenter")
    or importlib.util.find_spec("ansible") is None,
    reason="needs root, Debian's sshd, nsenter and ansible-core (scripts/fleet-setup.sh)",
)


class FailedHere(Exception):
    """Raised inside a live fleet to prove that teardown runs on failure."""


def say(capsys: pytest.CaptureFixture[str], text: str) -> None:
    """Print past pytest's capture: the numbers are part of what these tests report."""
    with capsys.disabled():
        print(f"\n  [fleet] {text}", end="")


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    """Three hosts for the module; torn down (and checked empty) at its end."""
    with Fleet(3) as f:
        yield f


def test_ground_comes_up_isolated_and_goes_down_leaving_nothing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Teardown after a failure, with a filesystem frozen and a writer blocked on it."""
    f = Fleet(3)
    with pytest.raises(FailedHere), f:
        own_ns = mnt_ns_of("self")
        namespaces = {h.ns for h in f.hosts}
        assert len(namespaces) == 3 and own_ns not in namespaces
        mountinfo = Path("/proc/self/mountinfo").read_text()
        assert "/srv/fleet" not in mountinfo, "a host's mount leaked into the machine's table"
        for h in f.hosts:
            inside = h.run("cat", "/proc/self/mountinfo").stdout
            assert f" {h.data.mountpoint} " in inside
            assert f" - {h.data.fstype} {h.data.device} " in inside
            others = [o.data.mountpoint for o in f.hosts if o is not h]
            assert not any(o in inside for o in others)
            # Born with a copy of the machine's table, it keeps no other test's loop mount.
            loops = [ln for ln in inside.splitlines() if " /dev/loop" in ln]
            assert loops and all(f" {h.data.device} " in ln for ln in loops), loops
        attached = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
        assert all(str(h.data.image) in attached for h in f.hosts)
        w = f.start_writer()
        w.wait_for(30)
        freeze_host(f.hosts[1])  # the writer blocks on its next record for host 1
        sshd_pids = [h.pid for h in f.hosts]
        images = [str(h.data.image) for h in f.hosts]
        raise FailedHere  # close() runs from __exit__, with host 1 frozen
    assert f.teardown_errors == [] and f.leftovers() == []
    attached = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert not any(image in attached for image in images)
    assert not any(alive(pid) for pid in sshd_pids)
    assert all(pids_in_ns(ns) == [] for ns in namespaces)
    assert not f.base.exists()
    say(capsys, f"ground up {f.timings['up_s']:.2f} s, down {f.timings['down_s']:.2f} s")


def _probe_write(host: Host) -> subprocess.Popen[str]:
    """A child that writes and fsyncs a file on the host's data volume (blocks while frozen)."""
    code = (
        "import os,sys; fd=os.open(sys.argv[1], os.O_CREAT|os.O_WRONLY|os.O_APPEND); "
        "os.write(fd, b'x'); os.fsync(fd)"
    )
    return host.popen(PYTHON, "-I", "-S", "-c", code, f"{host.data.mountpoint}/probe")


def test_a_freeze_of_the_ground_ends_by_itself(fleet: Fleet) -> None:
    """The ground's own freezes end at their deadline, and when the test's pipe closes."""
    h = fleet.hosts[0]
    freeze_host(h, deadline=0.6)
    probe = _probe_write(h)
    with pytest.raises(subprocess.TimeoutExpired):
        probe.wait(timeout=0.3)  # blocked: the filesystem is frozen
    assert probe.wait(timeout=10) == 0  # the holder thawed at its deadline
    with pytest.raises(RuntimeError, match="thawed deadline"):
        thaw_host(h)  # a cut taken across that deadline must not pass for consistent

    freeze_host(h)
    holder, h.holder = h.holder, None
    assert holder is not None and holder.stdin is not None and holder.stdout is not None
    holder.stdin.close()  # what the test process dying looks like to the holder
    assert holder.stdout.readline().startswith("thawed eof")
    assert holder.wait(timeout=10) == 0
    holder.stdout.close()
    assert _probe_write(h).wait(timeout=10) == 0


def test_a_killed_test_process_leaves_nothing_frozen(fleet: Fleet) -> None:
    """SIGKILL (no teardown at all) while a host is frozen under the writer: it unwinds."""
    child = subprocess.Popen(
        [PYTHON, str(ROOT / "tests" / "helpers" / "fleet_crash.py")],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(SRC)},
    )
    try:
        assert child.stdout is not None
        made = json.loads(child.stdout.readline())
        assert made["stalled"], "host 0 was not frozen under the writer"
    finally:
        child.kill()
        child.wait(timeout=10)
    deadline = time.monotonic() + 15
    left: list[str] = ["?"]
    while left and time.monotonic() < deadline:
        attached = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
        left = [f"loop {i}" for i in made["images"] if i in attached]
        left += [f"sshd {p}" for p in made["sshd"] if alive(p)]
        left += [f"process in {ns}" for ns in made["ns"] if pids_in_ns(ns)]
        time.sleep(0.1)
    # A filesystem frozen when its namespace died would keep its loop attached for good.
    assert left == []
    shutil.rmtree(made["base"])  # only the temp dir (images, keys) outlives a SIGKILL


def test_ansible_reaches_every_host_over_ssh_and_each_sees_only_its_own_volume(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    pongs = fleet.ansible("ping")
    assert {h: r.get("ping") for h, r in pongs.items()} == {h.name: "pong" for h in fleet.hosts}

    seen = fleet.ansible("command", "cat /proc/self/mountinfo")
    for h in fleet.hosts:
        inside = seen[h.name]["stdout"]
        assert f" {h.data.mountpoint} " in inside
        others = [o.data.mountpoint for o in fleet.hosts if o is not h]
        assert not any(o in inside for o in others), f"{h.name} sees another host's volume"
        # It was sshd that ran it: our key, from loopback, to this host's own address.
        log = (h.dir / "sshd.log").read_text()
        assert "Accepted publickey for root from 127.0.0.1" in log

    play = fleet.base / "noop.yml"
    play.write_text(
        "- hosts: fleet\n  gather_facts: false\n  tasks:\n    - ansible.builtin.ping:\n"
    )
    t0 = time.monotonic()
    p, _ = fleet.playbook(play)
    took = time.monotonic() - t0
    assert p.returncode == 0, p.stdout + p.stderr
    for h in fleet.hosts:
        assert f"{h.name}" in p.stdout and "ok=1" in p.stdout
    say(capsys, f"no-op play across {fleet.n} hosts: {took:.2f} s")


def test_check_cut_judges_prefixes() -> None:
    """The checker itself, on hand-made cuts of three hosts (record n lives on host n % 3)."""
    cut = check_cut([b"3\n6\n", b"1\n4\n", b"2\n5\n"])
    assert cut.consistent and cut.prefix == cut.highest == 6
    # Host 0 captured before record 6, host 1 after record 7: 6 missing below 7.
    cut = check_cut([b"3\n", b"1\n4\n7\n", b"2\n5\n"])
    assert not cut.consistent and cut.missing == [6] and cut.prefix == 5
    # A record cut short (no newline yet) is not a record.
    assert check_cut([b"3\n", b"1\n4", b"2\n"]).highest == 3
    assert check_cut([b"", b"", b""]).consistent
    with pytest.raises(ValueError, match="misplaced"):
        check_cut([b"1\n", b"", b""])


def test_overlapping_freezes_give_a_consistent_cut_every_time(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    w = fleet.start_writer("overlap.log")
    windows = []
    for _ in range(TRIES):
        w.wait_for(15)
        t0 = time.monotonic()
        copies, window = snapshot_overlapping(fleet.hosts, "overlap.log")
        cut = check_cut(copies)
        windows.append(window)
        assert cut.consistent, f"records missing below {cut.highest}: {cut.missing[:10]}"
        # Not a trivially empty cut: everything acked before the first freeze is in it,
        # and nothing beyond the one record that may have been in flight.
        assert cut.prefix >= w.acked_before(t0) >= 15
        assert cut.highest <= w.acked + 1
    stats = w.stop()
    say(
        capsys,
        f"overlapping: {TRIES}/{TRIES} consistent; window {min(windows):.3f}-"
        f"{max(windows):.3f} s; {stats['records']:.0f} records, "
        f"median {stats['median_s'] * 1e3:.2f} ms",
    )


def test_negative_control_host_by_host_freezes_are_caught(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    """The checker can fail: the same writer, cut one host at a time, breaks the prefix."""
    w = fleet.start_writer("control.log")
    caught = 0
    holes = []
    for _ in range(TRIES):
        w.wait_for(15)
        copies, _ = snapshot_one_by_one(fleet.hosts, "control.log")
        cut = check_cut(copies)
        caught += not cut.consistent
        holes.append(len(cut.missing))
    w.stop()
    rate = caught / TRIES
    say(capsys, f"negative control: {caught}/{TRIES} cuts inconsistent ({rate:.0%}); holes {holes}")
    assert rate >= 0.5


def test_collection_builds_installs_and_info_runs_on_every_host(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    out = fleet.base / "galaxy"
    out.mkdir()
    t0 = time.monotonic()
    p = fleet.ansible_cli(
        "galaxy", "collection", "build", str(COLLECTION), "--output-path", str(out)
    )
    assert p.returncode == 0, p.stdout + p.stderr
    tarball = out / f"quiesce-fleet-{_galaxy_version()}.tar.gz"
    assert tarball.is_file()
    installed = out / "collections"
    p = fleet.ansible_cli(
        "galaxy", "collection", "install", "--offline", "-p", str(installed), str(tarball)
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert (installed / "ansible_collections/quiesce/fleet/plugins/modules/info.py").is_file()
    env = {"ANSIBLE_COLLECTIONS_PATH": str(installed), "ANSIBLE_COLLECTIONS_SCAN_SYS_PATH": "False"}

    results = fleet.ansible("quiesce.fleet.info", "paths={{ quiesce_volumes }}", **env)
    for h in fleet.hosts:
        r = results[h.name]
        assert r["quiesce_version"] == quiesce.__version__
        assert r["quiesce_path"] == str(SRC / "quiesce"), "not the worktree's quiesce"
        [vol] = r["volumes"]
        assert (vol["mount_point"], vol["fstype"], vol["dev"]) == (
            h.data.mountpoint,
            h.data.fstype,
            h.data.dev,
        )

    # The collection's playbook, by FQCN; with no paths the module reports every
    # block-backed volume the host sees: its own data volume, no other host's.
    p, last = fleet.playbook(
        "quiesce.fleet.info", "-e", '{"target": "fleet", "quiesce_volumes": []}', **env
    )
    assert p.returncode == 0, p.stdout + p.stderr
    for h in fleet.hosts:
        shown = last[h.name]["msg"]
        assert shown.startswith(f"quiesce {quiesce.__version__}: ")
        assert f"'{h.data.mountpoint}'" in shown
        assert not any(o.data.mountpoint in shown for o in fleet.hosts if o is not h)
    say(capsys, f"collection build+install+2 runs: {time.monotonic() - t0:.2f} s")


def _galaxy_version() -> str:
    for line in (COLLECTION / "galaxy.yml").read_text().splitlines():
        if line.startswith("version:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError("galaxy.yml has no version")
