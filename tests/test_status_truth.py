"""`quiesce status` renders the kernel's truth (issue 18): a FIFREEZE still waiting names
the processes it waits for; a freeze whose guardian is gone shows the command that thaws
it. The pending freeze is real (a splice holder as uid 65534 on a test filesystem); the
shapes the guardian's new status reply will carry (``gone``, ``freezing_since``,
``lost``) are rendered from the documented typed dicts (client.GuardianStatus).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time

import pytest
from conftest import thaw_quietly
from helpers.stuck import SpliceHolder, probe_frozen, wait_for
from hypothesis import given
from hypothesis import strategies as st

from quiesce.cli.holds import detail_lines, state_text
from quiesce.freezing.guardian.client import GuardianStatus, VolumeStatus

STATES = ["idle", "freezing", "frozen", "thawing", "thawed", "foreign", "failed", "lost"]


def _guardian(**kw) -> GuardianStatus:
    base: GuardianStatus = {
        "pid": 812, "controller_pid": 800, "controller_alive": False, "detached": True,
        "finished": False, "deadline_remaining_s": 3.0, "lease_remaining_s": None,
        "timeout_s": 60.0, "volumes": [], "expired": None,
    }  # fmt: skip
    return base | kw  # type: ignore[return-value]


def _volume(state: str, **kw) -> VolumeStatus:
    v: VolumeStatus = {
        "mount_point": "/srv/my db", "dev": "7:3", "fstype": "ext4", "state": state,  # type: ignore[typeddict-item]
        "frozen_for_s": None,
    }  # fmt: skip
    return v | kw  # type: ignore[return-value]


def test_a_freeze_whose_guardian_is_gone_shows_the_thaw_command() -> None:
    g = _guardian(gone=True, gone_reason="killed")
    v = _volume("frozen", frozen_for_s=41.0)
    assert state_text(g, v, 0.0) == "frozen — guardian 812 is gone (killed)"
    [line] = detail_lines(g, v, 0.0)
    assert line.endswith("thaw it: quiesce thaw '/srv/my db'")
    assert state_text(_guardian(), v, 0.0) == "frozen"  # its guardian lives: plain
    assert detail_lines(_guardian(), v, 0.0) == []


def test_a_pending_freeze_shows_how_long_and_its_blockers() -> None:
    blocker = {
        "pid": 4242, "uid": 65534, "comm": "python3", "state": "S", "wchan": "pipe_read",
        "in_flight": ["splice by tid 4242 on /srv/my db/victim"], "files": [],
        "d_threads": [], "holds_write": True,
    }  # fmt: skip
    v = _volume("freezing", freezing_since=100.0, blockers=[blocker])
    assert state_text(_guardian(), v, 112.4) == "freezing for 12.4 s"
    lines = detail_lines(_guardian(), v, 112.4)
    assert lines[0] == "/srv/my db: freezing for 12.4 s: the kernel waits for writes in flight"
    assert lines[1] == (
        "  blocked by pid 4242 (uid 65534) python3 [S pipe_read]: splice by tid 4242 on "
        "/srv/my db/victim"
    )
    # the guardian's own reply says how long (freezing_for_s) rather than since when
    assert state_text(_guardian(), _volume("freezing", freezing_for_s=3.25), 0.0) == (
        "freezing for 3.2 s"
    )
    lost = _volume("lost", lost="FITHAW by someone else seen at 10:01:02")
    assert state_text(_guardian(), lost, 0.0).startswith("lost — thawed by someone else")
    [line] = detail_lines(_guardian(), lost, 0.0)
    assert "will not thaw it again" in line and "seen at 10:01:02" in line


@given(
    state=st.sampled_from(STATES),
    gone=st.booleans(),
    since=st.none() | st.floats(0, 1e9),
    reason=st.none() | st.text(max_size=10),
)
def test_every_state_renders(state: str, gone: bool, since: float | None, reason) -> None:
    extra = {"gone_reason": reason} if reason is not None else {}
    g = _guardian(gone=gone, **extra)
    v = _volume(state, freezing_since=since)
    text = state_text(g, v, 1e9)
    assert text.split()[0].startswith(state)
    for line in detail_lines(g, v, 1e9):
        assert isinstance(line, str) and "\n" not in line


def _quiesce(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "quiesce", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def held_freeze(loopfs):
    """`quiesce freeze` of a test filesystem whose FIFREEZE waits for a splice holder
    (uid 65534): yields (fs, holder, the freeze command's process); always ends the
    holder, waits for the freeze to complete, and thaws."""
    fs = loopfs("ext4")
    holder = SpliceHolder(fs.mountpoint / "victim")
    cmd = subprocess.Popen(
        [sys.executable, "-m", "quiesce", "freeze", "--timeout", "60", "--lease", "0", fs.path],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        yield fs, holder, cmd
    finally:
        holder.end()
        cmd.wait(timeout=60)
        _quiesce("thaw", fs.path)
        thaw_quietly(fs.path)


def _freezing(mountpoint: str) -> bool:
    """A guardian reports ``mountpoint`` as freezing (its FIFREEZE waits in the kernel)."""
    p = _quiesce("status", "--json")
    with contextlib.suppress(ValueError):
        for g in json.loads(p.stdout)["guardians"]:
            for v in g["volumes"]:
                if v["mount_point"] == mountpoint and v["state"] == "freezing":
                    return True
    return False


def test_status_names_what_a_stuck_freeze_waits_for(held_freeze) -> None:
    fs, holder, cmd = held_freeze
    wait_for(lambda: _freezing(fs.path), what="the guardian to report the pending freeze")
    p = _quiesce("status")
    assert p.returncode == 0, p.stderr
    assert "freezing" in p.stdout
    assert (
        f"{fs.path}: freezing" in p.stdout and "the kernel waits for writes in flight" in p.stdout
    )
    assert f"blocked by pid {holder.pid} (uid 65534)" in p.stdout
    assert "splice by tid" in p.stdout
    data = json.loads(_quiesce("status", "--json").stdout)
    [vol] = [v for g in data["guardians"] for v in g["volumes"] if v["mount_point"] == fs.path]
    assert vol["state"] == "freezing"
    assert [b["pid"] for b in vol["blockers"] if b["holds_write"]] == [holder.pid]
    assert cmd.poll() is None  # the freeze command still waits
    holder.end()
    assert cmd.wait(timeout=60) == 0
    assert probe_frozen(fs.path)
    t0 = time.monotonic()
    assert _quiesce("thaw", fs.path).returncode == 0
    assert not probe_frozen(fs.path) and time.monotonic() - t0 < 30
