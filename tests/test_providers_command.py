"""command provider: any storage CLI run inside the freeze window, with a hard timeout.

The "storage CLI" here is a small Python script (a stand-in for an array's snapshot
command); the freeze, the process group, the pipes and the timeout are all real.
"""

from __future__ import annotations

import json
import shutil
import sys
import time

import pytest
from conftest import is_writable
from typer.testing import CliRunner

from quiesce import snapshot as snapshots
from quiesce.cli.snapshot import snapshot_app
from quiesce.errors import QuiesceError, UnsafePlan, UsageError
from quiesce.providers.base import Snapshot
from quiesce.providers.command import CommandProvider

# Prints the snapshot id first, then what it was given; the timestamp proves it ran
# inside the window (CLOCK_MONOTONIC is shared by every process).
REPORT = r"""
import json, os, sys, time
t = time.monotonic_ns()
data = json.load(sys.stdin)
print("array-snap-" + os.environ["QUIESCE_SNAPSHOT_NAME"])
print(json.dumps({"t": t, "stdin": data, "argv": sys.argv[1:],
                  "env": {k: v for k, v in os.environ.items() if k.startswith("QUIESCE_")}}))
"""


def _alive(pid: int) -> bool:
    """Running (a killed, not yet reaped zombie is not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _py(code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", code, *args]


def test_runs_inside_the_window_with_env_stdin_and_id(loopfs, tmp_path):
    a, b = loopfs("ext4"), loopfs("ext4")
    man = snapshots.create(
        [a.path, b.path], "command", job="array",
        options={"create": _py(REPORT, "{name}", "$HOME")}, state_dir=tmp_path,
    )  # fmt: skip
    snap = man.snapshots[0]
    assert snap.location == f"array-snap-{man.id}"
    assert {s.location for s in man.snapshots} == {snap.location}
    report = json.loads(snap.extra["stdout"].splitlines()[1])
    assert man.window["start_ns"] < report["t"] < man.window["end_ns"]
    assert report["argv"] == [man.id, "$HOME"]  # no shell: nothing expanded
    env = report["env"]
    assert env["QUIESCE_VOLUMES"].split("\n") == [v["mount_point"] for v in man.volumes]
    assert env["QUIESCE_DEVICES"].split("\n") == [v["source"] for v in man.volumes]
    assert env["QUIESCE_FSTYPES"] == "ext4\next4"
    assert [v["mount_point"] for v in report["stdin"]["volumes"]] == sorted([a.path, b.path])
    assert report["stdin"]["name"] == man.id


def test_timeout_kills_the_process_group_and_thaws(loopfs, tmp_path):
    fs = loopfs("ext4")
    script = (
        "import subprocess, sys, time\n"
        "p = subprocess.Popen(['sleep', '60'])\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    t0 = time.monotonic()
    with pytest.raises(QuiesceError, match=r"did not finish within 1\.5s") as err:
        snapshots.create(
            [fs.path], "command", options={"create": _py(script), "timeout": 1.5},
            state_dir=tmp_path,
        )  # fmt: skip
    assert time.monotonic() - t0 < 10
    assert "group was thawed" in err.value.message
    grandchild = int(err.value.stdout.split()[0])
    deadline = time.monotonic() + 5
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(grandchild)
    assert is_writable(fs.path)
    assert snapshots.list_manifests(tmp_path) == []


def test_failing_command_reports_stderr_and_thaws(loopfs, tmp_path):
    fs = loopfs("ext4")
    script = "import sys; print('array is read-only', file=sys.stderr); sys.exit(3)"
    with pytest.raises(QuiesceError, match="exited with 3: array is read-only"):
        snapshots.create([fs.path], "command", options={"create": _py(script)}, state_dir=tmp_path)
    assert is_writable(fs.path)
    assert snapshots.list_manifests(tmp_path) == []


def test_tool_on_a_group_volume_is_refused(loopfs, tmp_path):
    fs = loopfs("ext4")
    tool = fs.mountpoint / "true"
    shutil.copy("/bin/true", tool)
    with pytest.raises(UnsafePlan, match="lives on"):
        snapshots.create([fs.path], "command", options={"create": [str(tool)]}, state_dir=tmp_path)


def test_delete_and_list_commands(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    (store / "snap-1").touch()
    prov = CommandProvider(
        create=["true"],
        delete=_py("import os, sys; os.unlink(sys.argv[1])", f"{store}/{{id}}"),
        list=_py("import os, sys; print('\\n'.join(sorted(os.listdir(sys.argv[1]))))", str(store)),
    )
    assert prov.list_snapshots() == ["snap-1"]
    snap = Snapshot("n/a", "command", "/a", "7:0", "ext4", 0.0, "snap-1")
    prov.delete(snap)
    prov.delete(snap)  # a second volume of the same storage snapshot: deleted once
    assert prov.list_snapshots() == []


def test_without_delete_command_only_forget_drops_the_record(loopfs, tmp_path):
    fs = loopfs("ext4")
    man = snapshots.create([fs.path], "command", options={"create": ["true"]}, state_dir=tmp_path)
    assert man.snapshots[0].location == man.id  # no stdout: the name is the id
    with pytest.raises(UsageError, match="no delete command"):
        snapshots.delete(man.id, tmp_path)
    snapshots.delete(man.id, tmp_path, forget=True)
    assert snapshots.list_manifests(tmp_path) == []


def test_cli_create_list_delete(loopfs, tmp_path):
    fs = loopfs("ext4")
    runner = CliRunner()
    env = {"QUIESCE_STATE_DIR": str(tmp_path)}
    args = ["create", "-p", "command", "-j", "cli", "-o", "create=echo snap-42", "--json", fs.path]
    r = runner.invoke(snapshot_app, args, env=env)
    assert r.exit_code == 0, r.output
    man = json.loads(r.stdout)
    assert man["snapshots"][0]["location"] == "snap-42" and man["consistency"] == "atomic"
    r = runner.invoke(snapshot_app, ["list", "--json"], env=env)
    assert [m["id"] for m in json.loads(r.stdout)["snapshots"]] == [man["id"]]
    r = runner.invoke(snapshot_app, ["delete", man["id"]], env=env)
    assert r.exit_code == 2 and "no delete command" in r.stderr and "hint:" in r.stderr
    r = runner.invoke(snapshot_app, ["create", "-p", "command", fs.path], env=env)
    assert r.exit_code == 2 and "--option create: required by provider command" in r.stderr


# Prints its own pid and time: after exec the pid is the gate's, started before the window.
PID_AND_TIME = "import os, time; print('snap'); print(os.getpid(), time.monotonic_ns())"


class Watched(CommandProvider):
    """Records, as the window begins, the held child's pid and argv (the gate, not yet
    the command)."""

    seen: tuple[int, str] | None = None

    def snapshot(self, members):
        gated = self._gated
        assert gated is not None
        with open(f"/proc/{gated.p.pid}/cmdline", "rb") as f:
            self.seen = (gated.p.pid, f.read().decode())
        return super().snapshot(members)


def test_the_command_is_started_before_the_freeze_and_runs_inside_it(loopfs, tmp_path):
    fs = loopfs("ext4")
    prov = Watched({"create": _py(PID_AND_TIME)})
    man = snapshots.create([fs.path], prov, state_dir=tmp_path)
    pid, t = map(int, man.snapshots[0].extra["stdout"].splitlines()[1].split())
    assert prov.seen is not None
    held_pid, cmdline = prov.seen
    assert pid == held_pid  # the process that ran it existed before the window
    assert "IFS= read" in cmdline and PID_AND_TIME not in cmdline.split("\0")[:3]
    assert man.window["start_ns"] < t < man.window["end_ns"]


def test_a_failed_freeze_never_runs_the_held_command(loopfs, tmp_path):
    fs = loopfs("ext4")
    marker = tmp_path / "ran"
    prov = Watched({"create": ["/usr/bin/touch", str(marker)]})
    started: list[int] = []
    real = prov.before_freeze

    def before(members):
        real(members)
        started.append(prov._gated.p.pid)  # type: ignore[union-attr]
        fs.freeze_externally()  # the freeze now meets EBUSY

    prov.before_freeze = before  # type: ignore[method-assign]
    try:
        with pytest.raises(QuiesceError):
            snapshots.create([fs.path], prov, state_dir=tmp_path / "s")
    finally:
        fs.thaw_externally()
    assert started and not _alive(started[0])
    assert not marker.exists()
