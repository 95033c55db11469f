"""The admin-tool runner: typed errors for a hung tool, a missing one, a failing one."""

import os
import time

import pytest

from quiesce.errors import QuiesceError, UsageError
from quiesce.sys import proc


def test_a_hung_tool_is_killed_and_reported_as_a_typed_error(tmp_path):
    pid_file = tmp_path / "pid"
    started = time.monotonic()
    with pytest.raises(proc.ToolTimedOut) as e:
        proc.run_tool("sh", "-c", f"echo $$ > {pid_file}; exec sleep 30", timeout=0.5)
    assert time.monotonic() - started < 10
    assert e.value.message.endswith("did not finish in 0.5 s and was killed")
    assert "dmesg" in e.value.hint
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):  # killed and reaped, not left behind
        os.kill(pid, 0)


def test_check_tool_names_the_missing_package():
    with pytest.raises(UsageError) as e:
        proc.check_tool("no-such-tool-anywhere", package="btrfs-progs")
    assert e.value.message == "no-such-tool-anywhere is not installed"
    assert e.value.hint == "apt-get install btrfs-progs"


def test_check_tool_reports_the_tools_own_words():
    with pytest.raises(QuiesceError) as e:
        proc.check_tool("sh", "-c", "echo 'no such subvolume' >&2; exit 3")
    assert e.value.message.endswith("failed: no such subvolume")
