"""quiesce as qemu-guest-agent's fsfreeze hook, on this machine's kernel (no VM).

The test process plays the agent: it runs the hook (``python -m quiesce.integrations.qga
freeze``) as its child, freezes a loop filesystem of its own the way the agent would
(FIFREEZE after the hook returns), and then thaws it or not. The guest job restricts the
watchdog to that filesystem (``[guest] mounts``); the VM tier (tests/vm/test_vm_qga.py)
runs the real agent in a real guest.
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import LoopFS, is_writable, thaw_quietly

from quiesce.host import kernel
from quiesce.integrations.qga.config import guest_job_from_raw, load_guest_job
from quiesce.integrations.qga.install import install
from quiesce.job.schema import JobConfigError

SRC = str(Path(__file__).resolve().parents[1] / "src")
DOC = Path(__file__).resolve().parents[1] / "docs" / "vm.md"


def _job(tmp_path: Path, fs: LoopFS, *, deadline: float = 30, lease: float = 5,
         extra: str = "") -> Path:  # fmt: skip
    run_dir = tmp_path / "run"
    job = tmp_path / "guest.toml"
    job.write_text(
        f'[guest]\ndeadline = {deadline}\nlease = {lease}\nmounts = ["{fs.path}"]\n'
        f'run_dir = "{run_dir}"\n{extra}'
    )
    job.chmod(0o600)
    return job


def _hook(job: Path, action: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=SRC)
    return subprocess.run(
        [sys.executable, "-B", "-m", "quiesce.integrations.qga", action, "--job", str(job)],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip


def _record(tmp_path: Path) -> dict[str, object]:
    return dict(json.loads((tmp_path / "run" / "last.json").read_text()))


def _wait_record(tmp_path: Path, event: str, timeout: float = 60) -> dict[str, object]:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            rec = _record(tmp_path)
        except (FileNotFoundError, ValueError):
            rec = {}
        if rec.get("event") == event:
            return rec
        time.sleep(0.05)
    raise AssertionError(f"no {event} record after {timeout}s")


def _frozen(path: str) -> bool:
    """Deterministic: FIFREEZE answering EBUSY = frozen (a 0 is our own freeze, undone)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        code = kernel.freeze_errno(fd)
        if code == 0:
            kernel.thaw_errno(fd)
        return code == errno.EBUSY
    finally:
        os.close(fd)


def _agent_freeze(path: str) -> None:
    """The agent's FIFREEZE (in this process: no child to start inside the deadline)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert kernel.freeze_errno(fd) == 0
    finally:
        os.close(fd)


def _watchdog_pid(tmp_path: Path) -> int:
    return int((tmp_path / "run" / "watchdog.pid").read_text())


@pytest.mark.timeout(120)
def test_the_agents_freeze_is_thawed_by_the_watchdog_past_the_deadline(tmp_path, loopfs):
    fs = loopfs("ext4")
    job = _job(tmp_path, fs, deadline=8)
    try:
        r = _hook(job, "freeze")
        assert r.returncode == 0, r.stderr
        _agent_freeze(fs.path)  # the agent's FIFREEZE, after its hook returned
        assert _frozen(fs.path)
        rec = _wait_record(tmp_path, "watchdog")
        assert not _frozen(fs.path), json.dumps(rec)
        assert is_writable(fs.path, timeout=60)
        assert rec["thawed_by"] == "guest-watchdog" and "deadline" in str(rec["reason"])
        assert rec["volumes"] == [
            {"mount_point": fs.path, "dev": rec["volumes"][0]["dev"], "before": "unfrozen",
             "after": "thawed"}
        ]  # fmt: skip
        out = _hook(job, "thaw")  # the agent's thaw, late: nothing to do, still exit 0
        assert out.returncode == 0 and "already thawed itself" in out.stdout
    finally:
        thaw_quietly(fs.path)


@pytest.mark.timeout(120)
def test_a_freeze_made_before_the_hook_ran_is_never_thawed(tmp_path, loopfs):
    fs = loopfs("ext4")
    job = _job(tmp_path, fs, deadline=1)
    fs.freeze_externally()  # someone else's freeze, before the agent's hook
    try:
        assert _hook(job, "freeze").returncode == 0
        rec = _wait_record(tmp_path, "watchdog")
        assert rec["volumes"][0]["before"] == "frozen-before"
        assert rec["volumes"][0]["after"] == ""
        assert _frozen(fs.path)  # still the other holder's freeze
    finally:
        thaw_quietly(fs.path)


@pytest.mark.timeout(120)
def test_the_agents_thaw_releases_and_records_the_window(tmp_path, loopfs):
    fs = loopfs("ext4")
    marker = tmp_path / "released"
    extra = (
        f'[[hooks.post_thaw]]\nname = "release"\ncommand = ["/bin/touch", "{marker}"]\n'
        '[[hooks.pre_freeze]]\nname = "flush"\ncommand = ["/bin/true"]\n'
    )
    job = _job(tmp_path, fs, extra=extra)
    try:
        assert _hook(job, "freeze").returncode == 0
        pid = _watchdog_pid(tmp_path)
        _agent_freeze(fs.path)
        fs.thaw_externally()
        out = _hook(job, "thaw")
        assert out.returncode == 0
        rec = json.loads(out.stdout)
        assert rec["event"] == "thaw" and rec["thawed_by"] == "agent"
        assert 0 < rec["guest_window_s"] < 30
        assert marker.exists()
        assert [q["name"] for q in rec["quiescers"]] == ["flush", "release"]
        for _ in range(100):  # the watchdog is gone, its socket too
            if not Path(f"/proc/{pid}").exists():
                break
            time.sleep(0.05)
        assert not Path(f"/proc/{pid}").exists()
        assert not (tmp_path / "run" / "watchdog.sock").exists()
    finally:
        thaw_quietly(fs.path)


@pytest.mark.timeout(120)
def test_a_failing_quiescer_fails_the_hook_and_names_it(tmp_path, loopfs):
    fs = loopfs("ext4")
    extra = (
        '[[hooks.pre_freeze]]\nname = "ok-one"\ncommand = ["/bin/true"]\n'
        '[[hooks.pre_freeze]]\nname = "app-flush"\n'
        'command = ["/bin/sh", "-c", "echo busy; exit 3"]\n'
    )
    job = _job(tmp_path, fs, extra=extra)
    r = _hook(job, "freeze")
    assert r.returncode == 11, (r.returncode, r.stderr)
    assert "app-flush" in r.stderr and "will not freeze" in r.stderr
    rec = _record(tmp_path)
    assert rec["event"] == "failed" and any("app-flush" in x for x in rec["not_ok"])
    assert not (tmp_path / "run" / "watchdog.sock").exists()
    assert is_writable(fs.path, timeout=60)


@pytest.mark.timeout(120)
def test_the_agent_dying_inside_the_window_thaws_at_once(tmp_path, loopfs):
    """The hook's parent (the agent) dies: nobody will ever thaw, the watchdog does, long
    before its deadline."""
    fs = loopfs("ext4")
    job = _job(tmp_path, fs, deadline=60)
    env = dict(os.environ, PYTHONPATH=SRC)
    agent = subprocess.Popen(
        ["/bin/sh", "-c",
         f"{sys.executable} -B -m quiesce.integrations.qga freeze --job {job} && "
         f"fsfreeze -f {fs.path} && echo frozen && exec sleep 600"],
        stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        assert agent.stdout is not None and agent.stdout.readline().strip() == "frozen"
        t0 = time.monotonic()
        agent.kill()
        agent.wait()
        rec = _wait_record(tmp_path, "watchdog", timeout=30)
        assert time.monotonic() - t0 < 30
        assert "died" in str(rec["reason"]) and is_writable(fs.path, timeout=60)
    finally:
        agent.kill()
        agent.wait()
        thaw_quietly(fs.path)


def test_guest_job_problems_are_listed_at_their_keys():
    with pytest.raises(JobConfigError) as e:
        guest_job_from_raw(
            {"guest": {"deadlin": 3, "lease": "x"}, "volumes": ["/"],
             "hooks": {"pre_freeze": [{"command": "a b"}]}},
            "guest.toml",
        )  # fmt: skip
    paths = sorted(p.path for p in e.value.problems)
    assert paths == ["guest.deadlin", "guest.lease", "hooks.pre_freeze[0].command", "volumes"]


def test_a_guest_job_writable_by_others_is_refused(tmp_path):
    job = tmp_path / "g.toml"
    job.write_text("[guest]\ndeadline = 5\n")
    job.chmod(0o666)
    with pytest.raises(JobConfigError):
        load_guest_job(job)
    job.chmod(0o600)
    assert load_guest_job(job).guest.deadline == 5


def test_install_writes_the_hook_the_job_and_the_drop_in(tmp_path):
    (tmp_path / "etc/qemu/fsfreeze-hook.d").mkdir(parents=True)
    done = install(tmp_path)
    hook = tmp_path / "etc/qemu/quiesce-fsfreeze-hook"
    assert hook in done.written and os.access(hook, os.X_OK)
    text = hook.read_text()
    assert "-m quiesce.integrations.qga" in text and "--job /etc/quiesce/qga.toml" in text
    drop = (tmp_path / "etc/systemd/system/qemu-guest-agent.service.d/quiesce.conf").read_text()
    assert "--fsfreeze-hook=/etc/qemu/quiesce-fsfreeze-hook" in drop
    raw = (tmp_path / "etc/quiesce/qga.toml").read_text()
    assert 'directory = "/etc/qemu/fsfreeze-hook.d"' in raw
    import tomllib

    gj = guest_job_from_raw(tomllib.loads(raw), "qga.toml")
    assert gj.guest.deadline == 60
    assert install(tmp_path).kept == [tmp_path / "etc/quiesce/qga.toml"]  # not overwritten


def _guest_examples() -> list[str]:
    return re.findall(r"```toml guest\n(.*?)```", DOC.read_text(), re.S)


def test_the_guest_job_examples_in_docs_vm_md_load():
    """Every ``toml guest`` block of docs/vm.md is a valid guest job (but for what this
    machine lacks: the scripts and directories it names); a drifted key is caught."""
    import tomllib

    machine_only = re.compile(r"(does not exist|is not a directory|is not installed)$")

    def problems(text: str) -> list[str]:
        try:
            guest_job_from_raw(tomllib.loads(text), "docs/vm.md")
        except JobConfigError as e:
            return [str(p) for p in e.problems if not machine_only.search(p.message)]
        return []

    examples = _guest_examples()
    assert examples
    for text in examples:
        assert problems(text) == []
    assert problems(examples[0].replace("deadline = 60", "dedline = 60"))


@pytest.mark.timeout(120)
def test_a_late_thaw_hook_still_records_the_agents_thaw(tmp_path, loopfs):
    """The agent thawed in time but its thaw hook starts after the deadline (a slow
    interpreter): the watchdog thaws nothing, releases the applications, and the late
    hook still records the agent's thaw with the window."""
    fs = loopfs("ext4")
    marker = tmp_path / "released"
    extra = f'[[hooks.post_thaw]]\nname = "release"\ncommand = ["/bin/touch", "{marker}"]\n'
    job = _job(tmp_path, fs, deadline=2, extra=extra)
    try:
        assert _hook(job, "freeze").returncode == 0
        fd = os.open(fs.path, os.O_RDONLY | os.O_DIRECTORY)
        try:  # the agent's FIFREEZE and FITHAW, back to back; its thaw hook comes late
            assert kernel.freeze_errno(fd) == 0 and kernel.thaw_errno(fd) == 0
        finally:
            os.close(fd)
        rec = _wait_record(tmp_path, "watchdog")
        assert rec["thawed_by"] == "" and "nothing was frozen" in str(rec["reason"])
        assert marker.exists()  # released at the deadline
        out = _hook(job, "thaw")
        assert out.returncode == 0
        late = json.loads(out.stdout)
        assert late["event"] == "thaw" and late["thawed_by"] == "agent"
        assert late["guest_window_s"] > 0
    finally:
        thaw_quietly(fs.path)
