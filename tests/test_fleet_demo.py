"""`quiesce demo --fleet`: builds the hosts, runs the group play, checks the cut, cleans up."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from quiesce.errors import ExitCode

ROOT = Path(__file__).resolve().parents[1]


def _quiesce(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "quiesce", *args], capture_output=True, text=True, timeout=300
    )


def _qfleet_dirs() -> set[str]:
    return {p.name for p in Path("/tmp").glob("qfleet-*")}


@pytest.mark.skipif(
    os.geteuid() != 0
    or not Path("/usr/sbin/sshd").exists()
    or not shutil.which("nsenter")
    or importlib.util.find_spec("ansible") is None,
    reason="needs root, Debian's sshd, nsenter and ansible-core (scripts/fleet-setup.sh)",
)
def test_demo_fleet_json_is_consistent_and_leaves_nothing() -> None:
    before = _qfleet_dirs()
    p = _quiesce("demo", "--fleet", "--json")
    assert p.returncode == 0, p.stdout + p.stderr
    data = json.loads(p.stdout)
    assert data["hosts"] == 3 and data["consistent"] is True
    assert 0 < data["skew_s"] <= data["window_s"] < 5
    assert data["records_in_cut"] >= 20
    assert _qfleet_dirs() <= before, "the demo left its temp dir"
    mounts = Path("/proc/self/mountinfo").read_text()
    assert "/srv/fleet" not in mounts


def test_demo_fleet_refuses_one_host() -> None:
    p = _quiesce("demo", "--fleet", "--hosts", "1")
    assert p.returncode == ExitCode.USAGE, p.stdout + p.stderr
    assert "--hosts must be at least 2" in p.stdout + p.stderr
