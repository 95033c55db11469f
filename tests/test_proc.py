"""The child-process runner: admin tools (typed errors for a hung tool, a missing one, a
failing one), streaming lines, pipelines, and children that die with quiesce."""

import gzip
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from quiesce.errors import QuiesceError, UsageError
from quiesce.host import proc


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


def test_a_tool_keeps_a_long_listing_whole():
    """zfs list and lvs print more than the hooks' 8 KiB and are parsed: nothing dropped."""
    out = proc.run_tool("seq", "1", "50000").stdout
    assert out.splitlines() == [str(i) for i in range(1, 50001)]


def test_a_hung_tool_is_killed_with_its_whole_group(tmp_path):
    pid_file = tmp_path / "pid"
    with pytest.raises(proc.ToolTimedOut):
        proc.run_tool("sh", "-c", f"sleep 30 & echo $! > {pid_file}; wait", timeout=0.5)
    assert _gone_within(int(pid_file.read_text()), 2.0)


# -- streaming -----------------------------------------------------------------------------


def test_streaming_hands_every_line_over_and_keeps_the_tail():
    seen: list[str] = []
    done = proc.run_streaming(
        ["sh", "-c", "seq 1 2000; echo warn >&2; printf last"],
        on_stdout_line=seen.append,
        keep_lines=10,
    )
    assert done.returncode == 0 and not done.timed_out
    assert seen == [str(i) for i in range(1, 2001)] + ["last"]
    assert done.stdout == b"".join(f"{i}\n".encode() for i in range(1992, 2001)) + b"last"
    assert done.stderr == b"warn\n"  # no callback: kept whole


def test_streaming_survives_a_broken_callback():
    def broken(_line: str) -> None:
        raise RuntimeError("a display bug")

    done = proc.run_streaming(["seq", "1", "3"], on_stdout_line=broken)
    assert done.returncode == 0 and done.stdout == b"1\n2\n3\n"


def test_streaming_timeout_kills_the_group(tmp_path):
    pid_file = tmp_path / "pid"
    done = proc.run_streaming(
        ["sh", "-c", f"sleep 30 & echo $! > {pid_file}; wait"], timeout=0.5, grace=1.0
    )
    assert done.timed_out
    assert _gone_within(int(pid_file.read_text()), 2.0)


# -- pipeline ------------------------------------------------------------------------------


def test_pipeline_taps_see_the_stream_the_sink_gets(tmp_path):
    counted = [0]
    digest = hashlib.sha256()
    ticks: list[float] = []
    out = tmp_path / "out.gz"
    with open(out, "wb") as sink:
        res = proc.run_pipeline(
            [
                proc.Stage(
                    ["head", "-c", "3000000", "/dev/urandom"], tap=lambda c: _add(counted, c)
                ),
                proc.Stage(["gzip", "-c"], tap=digest.update),
            ],
            sink=sink,
            on_tick=lambda: ticks.append(time.monotonic()),
        )
    assert res.failures == [] and not res.timed_out
    assert counted[0] == 3_000_000
    assert digest.hexdigest() == hashlib.sha256(out.read_bytes()).hexdigest()
    assert len(gzip.decompress(out.read_bytes())) == 3_000_000
    assert ticks  # at least the last one


def test_pipeline_plain_pipes_and_a_source(tmp_path):
    src = tmp_path / "in"
    src.write_bytes(b"b\na\nc\n")
    out = tmp_path / "out"
    with open(src, "rb") as source, open(out, "wb") as sink:
        res = proc.run_pipeline(
            [proc.Stage(["sort"]), proc.Stage(["tac"])], source=source, sink=sink
        )
    assert res.failures == []
    assert out.read_bytes() == b"c\nb\na\n"


def test_pipeline_failure_names_the_stage_with_its_stderr():
    res = proc.run_pipeline(
        [
            proc.Stage(["sh", "-c", "echo 'no such file' >&2; exit 2"], ok=(0, 1)),
            proc.Stage(["cat"]),
        ]
    )
    assert res.failures == ["sh exit 2: no such file"]
    assert [s.ok for s in res.stages] == [False, True]


def test_pipeline_broken_link_stops_the_producer():
    t0 = time.monotonic()
    res = proc.run_pipeline([proc.Stage(["yes"], tap=len), proc.Stage(["false"])])
    assert time.monotonic() - t0 < 10
    assert "false exit 1: " in res.failures
    assert any(f.startswith("feeding false: ") for f in res.failures)
    assert res.stages[0].returncode < 0  # killed, not left writing


def test_pipeline_timeout_kills_every_stage(tmp_path):
    pid_file = tmp_path / "pid"
    res = proc.run_pipeline(
        [proc.Stage(["sh", "-c", f"echo $$ > {pid_file}; exec sleep 30"]), proc.Stage(["cat"])],
        timeout=0.5,
    )
    assert res.timed_out
    assert _gone_within(int(pid_file.read_text()), 2.0)


# -- children do not outlive quiesce -------------------------------------------------------

PARENT = r"""
import signal, sys, threading, time
from quiesce.host import proc

shape, pid_file, nap = sys.argv[1:4]
child = ["sh", "-c", f"echo $$ > {pid_file}.tmp && mv {pid_file}.tmp {pid_file}; exec sleep {nap}"]
if shape == "bounded":
    proc.run_bounded(child, timeout=120)
elif shape == "streaming-in-a-worker-thread":
    t = threading.Thread(target=proc.run_streaming, args=(child,), kwargs={"on_stdout_line": print})
    t.start()
    t.join()
elif shape == "pipeline":
    proc.run_pipeline([proc.Stage(child, tap=len), proc.Stage(["cat"])])
elif shape == "spawned-by-a-thread-that-ended":
    t = threading.Thread(target=proc.spawn, args=(child,), kwargs={"stdout": None, "stderr": None})
    t.start()
    t.join()
    time.sleep(120)
elif shape == "last-words":  # cleans up on SIGINT, and says so on stderr first
    trap = f"trap 'echo cleaning up >&2; echo done > {pid_file}.clean; exit 130' INT"
    started = f"echo $$ > {pid_file}.tmp && mv {pid_file}.tmp {pid_file}"
    child = ["sh", "-c", f"{trap}; {started}; while :; do sleep 0.05; done"]
    proc.run_streaming(child, stop_signal=signal.SIGINT, pdeathsig=signal.SIGINT)
elif shape == "no-pdeathsig":
    proc.run_bounded(child, timeout=120, pdeathsig=None)
"""


def _state(pid: int) -> str | None:
    """The process's state letter; None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def _gone_within(pid: int, seconds: float) -> bool:
    """Gone or a zombie (dead, waiting for whoever reaps orphans here)."""
    until = time.monotonic() + seconds
    while _state(pid) not in (None, "Z"):
        if time.monotonic() > until:
            return False
        time.sleep(0.02)
    return True


def _start_parent(shape: str, pid_file: Path, nap: str) -> tuple[subprocess.Popen[bytes], int]:
    src = str(Path(proc.__file__).parents[2])
    env = os.environ | {"PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    parent = subprocess.Popen([sys.executable, "-c", PARENT, shape, str(pid_file), nap], env=env)
    until = time.monotonic() + 20
    while not pid_file.exists():
        assert parent.poll() is None, "the parent died before starting its child"
        assert time.monotonic() < until, "no child started"
        time.sleep(0.02)
    return parent, int(pid_file.read_text())


@pytest.mark.parametrize(
    "shape",
    ["bounded", "streaming-in-a-worker-thread", "pipeline", "spawned-by-a-thread-that-ended"],
)
def test_children_die_with_a_sigkilled_quiesce(shape: str, tmp_path: Path) -> None:
    """A SIGKILLed `quiesce run` used to leave restic running (and its repository locked)."""
    parent, child = _start_parent(shape, tmp_path / "pid", "60")
    try:
        time.sleep(0.3)
        assert _state(child) not in (None, "Z"), "the child should be alive while quiesce is"
    finally:
        parent.kill()
        parent.wait()
    assert _gone_within(child, 2.0)


def test_a_child_that_cleans_up_when_quiesce_dies_can_say_so(tmp_path: Path) -> None:
    """Its stderr's reader is gone: without a reader of its own, "cleaning up" would kill
    it with SIGPIPE before it cleans up (restic's lock)."""
    parent, child = _start_parent("last-words", tmp_path / "pid", "60")
    parent.kill()
    parent.wait()
    assert _gone_within(child, 2.0)
    assert (tmp_path / "pid.clean").read_text() == "done\n"


def test_without_pdeathsig_a_child_outlives_quiesce(tmp_path: Path) -> None:
    """Session hooks opt out: they must outlive quiesce to see EOF (and this shows the test
    above can fail)."""
    nap = f"60.{os.getpid()}"  # marks our sleep: only that one is ended below
    parent, child = _start_parent("no-pdeathsig", tmp_path / "pid", nap)
    parent.kill()
    parent.wait()
    try:
        assert not _gone_within(child, 1.0)
    finally:
        if Path(f"/proc/{child}/cmdline").read_bytes() == f"sleep\0{nap}\0".encode():
            os.kill(child, signal.SIGKILL)


def test_a_child_outlives_the_short_lived_thread_that_started_it() -> None:
    """PDEATHSIG follows the forking *thread*: a worker thread's child is forked by the
    long-lived one, so the worker returning does not kill it."""
    box: list[subprocess.Popen[bytes]] = []
    t = threading.Thread(target=lambda: box.append(proc.spawn(["sleep", "30"])))
    t.start()
    t.join()
    try:
        time.sleep(0.5)
        assert box[0].poll() is None
    finally:
        proc.kill_group(box[0])


def _add(box: list[int], chunk: bytes) -> None:
    box[0] += len(chunk)


def test_pass_fds_reach_the_child_and_nothing_else_does():
    """spawn and run_bounded hand over exactly the fds asked for (the fleet ground passes
    a namespace fd to nsenter); every other fd stays closed in the child."""
    r, w = os.pipe()
    try:
        code = "import os,sys; print(os.path.exists('/proc/self/fd/' + sys.argv[1]))"
        show = [sys.executable, "-c", code, str(r)]
        assert proc.run_bounded(show, timeout=30, pass_fds=(r,)).stdout == b"True\n"
        assert proc.run_bounded(show, timeout=30).stdout == b"False\n"
        p = proc.spawn(show, pass_fds=(r,), text=True)
        out, _ = p.communicate(timeout=30)
        assert out == "True\n"  # text: str pipes
    finally:
        os.close(r)
        os.close(w)


# -- Gated: started before a window, run inside it -----------------------------------------


def _exe(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/exe")


def test_gated_holds_the_command_before_its_exec_until_released(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    g = proc.Gated(["/usr/bin/touch", str(marker)])
    try:
        # held before its exec (the shell, or the fork that becomes it): nothing ran
        assert _exe(g.p.pid) != "/usr/bin/touch"
        assert not marker.exists()
        g.release()
        done = g.wait(10)
    finally:
        g.cancel()
    assert done.returncode == 0 and not done.timed_out
    assert marker.exists()


def test_gated_cancelled_never_runs_the_command(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    g = proc.Gated(["/usr/bin/touch", str(marker)])
    pid = g.p.pid
    g.cancel()
    assert g.p.wait(10) in (proc.GATE_CLOSED, -signal.SIGKILL)
    assert not marker.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.parametrize("size", [0, 10, 4095, 300_000])
def test_gated_command_reads_its_whole_input_after_the_gate(size: int) -> None:
    data = os.urandom(size)
    g = proc.Gated([sys.executable, "-c", GATED_SHA], input=data)
    g.release()
    done = g.wait(30)
    assert done.returncode == 0
    assert done.stdout.decode().strip() == hashlib.sha256(data).hexdigest()


GATED_SHA = "import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())"


def test_gated_timeout_kills_the_group() -> None:
    g = proc.Gated(["sleep", "30"])
    g.release()
    done = g.wait(0.2)
    assert done.timed_out
    assert g.p.returncode == -signal.SIGKILL
