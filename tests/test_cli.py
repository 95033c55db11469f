"""The command line as users run it: `python3 -m quiesce ...` in a subprocess.

Every user-caused failure must exit with its documented code (errors.ExitCode), print
exactly one `quiesce: ...` line and one `hint: ...` line on stderr (no traceback), and
change nothing.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import LoopFS, is_writable, run, thaw_quietly

from quiesce.errors import ExitCode
from quiesce.freezing import guardian

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
NO_SYS_ADMIN = ["setpriv", "--inh-caps=-all", "--bounding-set=-sys_admin"]


def quiesce_cli(
    *args: str | Path, prefix: list[str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*(prefix or []), sys.executable, "-m", "quiesce", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd="/",
    )


def assert_error(proc: subprocess.CompletedProcess[str], code: int) -> str:
    """The exit code, and stderr = one `quiesce:` line + one `hint:` line. Returns the message."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 2, proc.stderr
    assert lines[0].startswith("quiesce: ") and len(lines[0]) > len("quiesce: ")
    assert lines[1].startswith("hint: ") and len(lines[1]) > len("hint: ")
    return lines[0]


def kill_guardian(pid: int | None) -> None:
    """Teardown: end a guardian this test's CLI run left behind (it ignores SIGTERM)."""
    if pid is not None and pid in guardian.list_guardians():
        os.kill(pid, signal.SIGKILL)


# -- the bad-input table -----------------------------------------------------------------------

Case = Callable[[Callable[..., LoopFS], Path], tuple[list[str | Path], str | None]]


def _missing(loopfs, tmp: Path):
    return ["freeze", tmp / "no-such-dir"], None


def _missing_exec(loopfs, tmp: Path):
    return ["exec", tmp / "no-such-dir", "--", "true"], None


def _subdir(loopfs, tmp: Path):
    fs = loopfs("ext4")
    (fs.mountpoint / "sub").mkdir()
    return ["freeze", fs.mountpoint / "sub"], fs.path


def _regular_file(loopfs, tmp: Path):
    fs = loopfs("ext4")
    (fs.mountpoint / "file").write_text("x")
    return ["freeze", fs.mountpoint / "file"], fs.path


def _tmpfs(loopfs, tmp: Path):
    return ["freeze", loopfs.tmpfs()], None


def _thaw_not_frozen(loopfs, tmp: Path):
    fs = loopfs("ext4")
    return ["thaw", fs.path], fs.path


def _exec_without_command(loopfs, tmp: Path):
    fs = loopfs("ext4")
    return ["exec", fs.path], fs.path


BAD_INPUT: dict[str, tuple[Case, int]] = {
    "nonexistent path": (_missing, ExitCode.USAGE),
    "nonexistent path (exec)": (_missing_exec, ExitCode.USAGE),
    "not a mount root": (_subdir, ExitCode.USAGE),
    "regular file": (_regular_file, ExitCode.USAGE),
    "tmpfs": (_tmpfs, ExitCode.UNSUPPORTED),
    "thaw of a filesystem not frozen": (_thaw_not_frozen, ExitCode.NOT_FROZEN),
    "exec without a command": (_exec_without_command, ExitCode.USAGE),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input(loopfs, tmp_path: Path, case: str) -> None:
    setup, code = BAD_INPUT[case]
    args, must_stay_writable = setup(loopfs, tmp_path)
    assert_error(quiesce_cli(*args), code)
    if must_stay_writable:
        assert is_writable(must_stay_writable)


def test_subdirectory_message_names_the_mount(loopfs) -> None:
    fs: LoopFS = loopfs("ext4")
    (fs.mountpoint / "sub").mkdir()
    msg = assert_error(quiesce_cli("plan", fs.mountpoint / "sub"), ExitCode.USAGE)
    assert "not a mount point" in msg and fs.path in msg


def test_foreign_freeze_is_left_alone(loopfs) -> None:
    fs: LoopFS = loopfs("ext4")
    fs.freeze_externally()
    try:
        msg = assert_error(quiesce_cli("freeze", "--timeout", "20", fs.path), ExitCode.BUSY)
        assert "already frozen" in msg
        assert not is_writable(fs.path, timeout=0.5), "quiesce thawed someone else's freeze"
    finally:
        fs.thaw_externally()
    assert is_writable(fs.path)


def test_read_only_mount_is_not_frozen(loopfs) -> None:
    fs: LoopFS = loopfs("ext4", mount_opts="ro")
    proc = quiesce_cli("freeze", "--timeout", "20", fs.path)
    found = re.search(r"guardian pid (\d+)", proc.stdout)
    try:
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr
        assert re.search(r"^warning: .*read-only", proc.stderr, re.M), proc.stderr
        # A frozen superblock refuses a remount with EBUSY: this one is not frozen.
        run("mount", "-o", "remount,rw", fs.path)
        assert is_writable(fs.path)
    finally:
        kill_guardian(int(found.group(1)) if found else None)


def test_read_only_freeze_leaves_no_guardian(loopfs) -> None:
    fs: LoopFS = loopfs("ext4", mount_opts="ro")
    before = set(guardian.list_guardians())
    proc = quiesce_cli("freeze", "--json", "--timeout", "20", fs.path)
    assert proc.returncode == 0, proc.stderr
    pid = json.loads(proc.stdout)["guardian_pid"]
    try:
        end = time.monotonic() + 3
        while set(guardian.list_guardians()) - before and time.monotonic() < end:
            time.sleep(0.05)
        assert set(guardian.list_guardians()) - before == set()  # none left holding it
        if pid is not None:
            assert not os.path.exists(f"/proc/{pid}") or _is_zombie(pid)
    finally:
        kill_guardian(pid)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except OSError:
        return True


def test_bind_mount_and_original_are_frozen_once(loopfs) -> None:
    fs: LoopFS = loopfs("ext4")
    bind = loopfs.bind(fs.mountpoint)
    proc = quiesce_cli("exec", "--json", fs.path, bind, "--", "true")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    (vol,) = out["volumes"]
    assert vol["paths"] == [fs.path, str(bind)]
    assert (vol["state"], vol["thawed_by"]) == ("thawed", "controller")
    assert out["returncode"] == 0 and out["command"] == ["true"]
    assert is_writable(fs.path)


def test_exec_runs_the_command_inside_the_window(loopfs) -> None:
    """fsfreeze -f fails with EBUSY (exit 1) only if the fs is frozen while CMD runs, and
    quiesce exits with CMD's status."""
    fs: LoopFS = loopfs("ext4")
    try:
        proc = quiesce_cli("exec", fs.path, "--", "fsfreeze", "-f", fs.path)
        assert proc.returncode == 1, proc.stderr
        assert "Device or resource busy" in proc.stderr
        assert is_writable(fs.path)
        proc = quiesce_cli("exec", fs.path, "--", "sh", "-c", "exit 42")
        assert proc.returncode == 42
    finally:
        thaw_quietly(fs.path)  # only needed if CMD froze it (the test failed)


def test_freeze_then_thaw_through_the_guardian(loopfs) -> None:
    fs: LoopFS = loopfs("ext4")
    pid = None
    try:
        proc = quiesce_cli("freeze", "--json", "--timeout", "30", fs.path)
        assert proc.returncode == 0, proc.stderr
        pid = json.loads(proc.stdout)["guardian_pid"]
        assert not is_writable(fs.path, timeout=0.3)
        status = json.loads(quiesce_cli("status", "--json").stdout)
        (mine,) = [g for g in status["guardians"] if g["pid"] == pid]
        assert [v["state"] for v in mine["volumes"]] == ["frozen"]
        assert mine["detached"] is True
        proc = quiesce_cli("thaw", "--json", fs.path)
        assert proc.returncode == 0, proc.stderr
        (result,) = json.loads(proc.stdout)["results"]
        assert result["thawed_by"] == f"guardian {pid}"
        assert is_writable(fs.path)
    finally:
        thaw_quietly(fs.path)
        kill_guardian(pid)


def _unprivileged_prefix(path: str) -> list[str]:
    """uid 65534 if it can import quiesce and reach ``path``; else root without
    CAP_SYS_ADMIN (the interpreter may live under root's 0700 home)."""
    probe = subprocess.run(
        [*NOBODY, sys.executable, "-c", "import os, sys, quiesce; os.stat(sys.argv[1])", path],
        capture_output=True,
    )
    return NOBODY if probe.returncode == 0 else NO_SYS_ADMIN


def test_without_cap_sys_admin(loopfs) -> None:
    fs: LoopFS = loopfs("ext4")
    prefix = _unprivileged_prefix(fs.path)
    msg = assert_error(quiesce_cli("freeze", fs.path, prefix=prefix), ExitCode.PERMISSION)
    assert "permission denied" in msg
    assert is_writable(fs.path)


def test_partial_failure_rolls_back(loopfs) -> None:
    """Volume 3 (in plan order) is held by a third party: 1 and 2 are thawed at once, 3 is
    left frozen by its owner."""
    paths = [loopfs("ext4").path for _ in range(3)]
    plan = json.loads(quiesce_cli("plan", "--json", *paths).stdout)
    order = [m["mount_point"] for m in plan["order"]]
    assert sorted(order) == sorted(paths)
    run("fsfreeze", "-f", order[2])
    try:
        msg = assert_error(quiesce_cli("freeze", "--timeout", "30", *paths), ExitCode.BUSY)
        assert order[2] in msg and "rolled back" in msg
        assert f"{order[0]} thawed" in msg and f"{order[1]} thawed" in msg
        assert is_writable(order[0]) and is_writable(order[1])
        assert not is_writable(order[2], timeout=0.5)
    finally:
        run("fsfreeze", "-u", order[2])
    assert is_writable(order[2])


@pytest.mark.parametrize("name", ["x[/]y", "x[bold]y"])
def test_brackets_in_a_path_are_printed_verbatim(tmp_path: Path, name: str) -> None:
    msg = assert_error(quiesce_cli("freeze", tmp_path / name), ExitCode.USAGE)
    assert name in msg


def _demo_loops() -> set[str]:
    return {ln for ln in run("losetup", "-a").stdout.splitlines() if "quiesce-demo-" in ln}


def test_demo_cleans_up() -> None:
    before = _demo_loops()
    proc = quiesce_cli("demo", "--simple", timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    made = re.search(r"on /dev/loop\d+, mounted at (\S+)", proc.stdout)
    assert made, proc.stdout
    mnt = made.group(1)
    assert "none lost" in proc.stdout
    assert _demo_loops() <= before
    assert mnt not in run("findmnt", "-rn", "-o", "TARGET").stdout.split()
    assert str(Path(mnt).parent) not in run("losetup", "-a").stdout
    assert not Path(mnt).parent.exists()


def test_help_lists_every_documented_exit_code():
    from quiesce.cli.app import app
    from quiesce.errors import ExitCode

    codes = {v for k, v in vars(ExitCode).items() if k.isupper()}
    listed = {int(n) for n in re.findall(r"(\d+) [a-z]", app.info.epilog or "")}
    assert listed == codes
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert {int(n) for n in re.findall(r"^\| (\d+) \|", readme, re.M)} == codes
