"""Watching a run: progress events reach stderr as they happen (lines on a pipe, a live
display on a terminal), never while a volume is frozen, and a killed run's log already
holds the phases it got through."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pty
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers.backup_tree import make_tree
from helpers.jobtools import PY, toml_list, write_job
from helpers.snaptools import image_on_reflink_host

from quiesce.cli.watch import LineRenderer, describe
from quiesce.util.events import Event, HeldEvents

pytestmark = pytest.mark.timeout(180)


def _job(tmp_path: Path, volume: str, after_run: list[str] | None = None) -> Path:
    hook = (
        f'[[hooks.after_run]]\nname = "slow"\ncommand = {toml_list(after_run)}\ntimeout = 60\n'
        if after_run
        else ""
    )
    return write_job(tmp_path, f"""
name = "watched"
volumes = ["{volume}"]
state_dir = "{tmp_path / "state"}"
[provider]
type = "reflink"

[[hooks.pre_freeze]]
name = "hello"
command = ["/bin/true"]

{hook}
[backup]
target = "tar"
directory = "{tmp_path / "tars"}"
mount_root = "{tmp_path / "run"}"
verify = "full"
verify_dir = "{tmp_path}"
""", mode=0o600)  # fmt: skip


def _reader(stream: io.BufferedReader, into: list[tuple[int, str]]) -> threading.Thread:
    """Collect (CLOCK_MONOTONIC ns on arrival, line) as the lines come."""

    def run() -> None:
        for raw in iter(stream.readline, b""):
            into.append((time.monotonic_ns(), raw.decode(errors="replace").rstrip("\n")))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_lines_arrive_during_the_run_and_none_inside_the_window(loopfs, tmp_path) -> None:
    pair = image_on_reflink_host(loopfs, "ext4")
    make_tree(pair.inner.mountpoint / "d", n_files=20)
    job = _job(tmp_path, pair.inner.path, after_run=["/bin/sleep", "1.5"])
    p = subprocess.Popen(
        [sys.executable, "-m", "quiesce", "run", str(job), "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    lines: list[tuple[int, str]] = []
    t = _reader(p.stderr, lines)  # type: ignore[arg-type]
    out = p.stdout.read()  # type: ignore[union-attr]
    p.wait(timeout=120)
    exited = time.monotonic_ns()
    t.join(10)
    report = json.loads(out)
    assert p.returncode == 0, (report.get("error"), lines)
    text = [ln for _, ln in lines]
    stamp = re.compile(r"^\d\d:\d\d:\d\d ")
    assert all(stamp.match(ln) for ln in text), text
    for want in ("quiesce applications: started", "take snapshot: started",
                 "take snapshot: done", "backup: started", "backup: done", "verify: started",
                 "verify: done", "after-run hooks: started"):  # fmt: skip
        assert any(want in ln for ln in text), (want, text)
    # as it happened: the backup was over well before the run (1.5 s of hook later)
    backup_done = next(at for at, ln in lines if "backup: done" in ln)
    assert exited - backup_done > 1.0e9, "the lines came only at the end"
    # nothing arrived while the volume was frozen, not even the window's own start
    start, end = report["window"]["start_ns"], report["window"]["end_ns"]
    assert not [ln for at, ln in lines if start <= at <= end]
    window_start = next(at for at, ln in lines if "take snapshot: started" in ln)
    assert window_start > end, "the window's events were not held until the thaw"
    assert any(re.search(r"freeze window: volumes were frozen for [\d.]+ ", ln) for ln in text)
    # issue 19: the phase that holds the window is not called "freeze window" (it took
    # seconds, the window milliseconds)
    assert not any("freeze window: done" in ln for ln in text), text


def test_a_killed_run_has_already_logged_its_phases(loopfs, tmp_path) -> None:
    pair = image_on_reflink_host(loopfs, "ext4")
    make_tree(pair.inner.mountpoint / "d", n_files=5)
    pid_file = tmp_path / "hook.pid"
    hook = [PY, "-c", "import os,sys,time; open(sys.argv[1],'w').write(str(os.getpid()));"
            " time.sleep(60)", str(pid_file)]  # fmt: skip
    job = _job(tmp_path, pair.inner.path, after_run=hook)
    log = tmp_path / "run.log"
    with open(log, "wb") as f:
        p = subprocess.Popen([sys.executable, "-m", "quiesce", "run", str(job)], stdout=f, stderr=f)
    try:
        deadline = time.monotonic() + 120
        while "after-run hooks: started" not in log.read_text():
            assert p.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        p.send_signal(signal.SIGKILL)
        p.wait(10)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        if pid_file.exists():  # the hook outlives nothing (PDEATHSIG), but be sure
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
    text = log.read_text()
    for want in ("take snapshot: done", "backup: done", "verify: done", "umount: done"):
        assert want in text, (want, text)


def test_a_terminal_gets_the_live_display(loopfs, tmp_path) -> None:
    pair = image_on_reflink_host(loopfs, "ext4")
    make_tree(pair.inner.mountpoint / "d", n_files=5)
    job = _job(tmp_path, pair.inner.path)
    master, slave = pty.openpty()
    p = subprocess.Popen(
        [sys.executable, "-m", "quiesce", "run", str(job), "--json"],
        stdout=subprocess.PIPE, stderr=slave, env=os.environ | {"TERM": "xterm"},
    )  # fmt: skip
    os.close(slave)
    chunks: list[bytes] = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO: every writer closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    out = p.stdout.read()  # type: ignore[union-attr]
    p.wait(60)
    assert p.returncode == 0, out
    screen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode(errors="replace"))
    assert "take snapshot: done" in screen and "verify: done" in screen, screen


def test_quiet_shows_no_progress(loopfs, tmp_path) -> None:
    pair = image_on_reflink_host(loopfs, "ext4")
    job = _job(tmp_path, pair.inner.path)
    p = subprocess.run(
        [sys.executable, "-m", "quiesce", "run", str(job), "-q"], capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "started" not in p.stderr and "freeze window" in p.stdout  # the report only


def test_held_events_wait_for_the_end_of_the_hold() -> None:
    got: list[str] = []
    held = HeldEvents(lambda e: got.append(e.phase))
    held(Event("start", "a"))
    with held.hold():
        held(Event("start", "window"))
        held(Event("end", "window", ok=True))
        assert got == ["a"]
    assert got == ["a", "window", "window"]
    with pytest.raises(RuntimeError), held.hold():  # an error in the window: still delivered
        held(Event("start", "b"))
        raise RuntimeError
    assert got[-1] == "b"


def test_progress_lines_use_binary_units_and_are_throttled() -> None:
    buf = io.StringIO()
    r = LineRenderer(buf, interval=10.0)
    gib = 1 << 30
    r(Event("progress", "backup", at=100.0, done=0, total=2 * gib))
    r(Event("progress", "backup", at=105.0, done=gib // 2, total=2 * gib))  # too soon
    r(Event("progress", "backup", at=110.0, done=gib, total=2 * gib, files=7))
    lines = buf.getvalue().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].endswith("backup: 1.0 GiB / 2.0 GiB (50%), 102.4 MiB/s, 7 files"), lines
    assert describe(Event("end", "verify", ok=False, duration_s=2.0)).startswith(
        "verify: FAILED after 2"
    )
