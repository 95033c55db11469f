"""No self-deadlock, for real: quiesce freezes the filesystem it runs from.

A virtualenv lives on an ext4 loop filesystem, with quiesce installed into it from a copy
of the repo (non-editable, so the package files are on that filesystem). Its Python
runs `quiesce exec --allow-self` on that filesystem with the working directory and both
output streams there too. Any write quiesce made inside the window (a log line, a .pyc,
its own output) would block in D state until the guardian's deadline: the run would
then take ~20 s and exit 9 (FreezeExpired) instead of 0, or hang.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import LoopFactory, LoopFS, thaw_quietly

REPO = Path(__file__).resolve().parents[1]
DEADLINE_S = 20
RUN_TIMEOUT_S = 60


@dataclass
class SelfHost:
    fs: LoopFS
    python: Path  # the venv's interpreter, on fs


def _copy_repo(dest: Path) -> Path:
    """pip builds in the source tree: build from a copy, never in the repo itself."""
    src = dest / "quiesce-src"
    shutil.copytree(
        REPO,
        src,
        ignore=shutil.ignore_patterns(
            ".git", "tests", "bench", "build", "*.egg-info", "__pycache__", ".*cache"
        ),
    )
    return src


@pytest.fixture(scope="module")
def selfhost(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SelfHost]:
    base = tmp_path_factory.mktemp("selffreeze")
    factory = LoopFactory(base)
    try:
        fs = factory("ext4", size_mb=400)
        venv = fs.mountpoint / "venv"
        subprocess.run(
            [sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
            check=True,
            capture_output=True,
            timeout=120,
        )
        python = venv / "bin" / "python"
        # The venv must import its own copy: a PYTHONPATH (a checkout's src) would win.
        venv_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        pip = subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "--no-deps", str(_copy_repo(base))],
            capture_output=True,
            text=True,
            timeout=300,
            env=venv_env,
        )
        assert pip.returncode == 0, f"pip install into the venv failed:\n{pip.stderr}"
        where = subprocess.run(
            [str(python), "-c", "import quiesce; print(quiesce.__file__)"],
            capture_output=True,
            text=True,
            check=True,
            cwd="/",
            env=venv_env,
        ).stdout.strip()
        assert where.startswith(fs.path + "/"), f"the venv imports quiesce from {where}"
        yield SelfHost(fs, python)
    finally:
        factory.cleanup()  # thaws first, should a run have left it frozen


def _pycache(root: Path) -> dict[str, int]:
    """Every bytecode file under ``root`` with its mtime: a .pyc written shows up here."""
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*.pyc") if "__pycache__" in p.parts}


def _stuck_report(pid: int) -> str:
    """state, wchan and kernel stack of every thread of ``pid`` and of its children."""
    lines = []
    pids = [pid]
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            pids += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
    for p in pids:
        for tid in sorted(os.listdir(f"/proc/{p}/task")):
            t = Path(f"/proc/{p}/task/{tid}")
            try:
                state = t.joinpath("stat").read_text().rsplit(")", 1)[1].split()[0]
                wchan = t.joinpath("wchan").read_text()
                stack = t.joinpath("stack").read_text().strip().replace("\n", " | ")
                comm = t.joinpath("comm").read_text().strip()
            except OSError as e:
                lines.append(f"{p}/{tid}: {e}")
                continue
            lines.append(f"{p}/{tid} {comm} state={state} wchan={wchan} stack={stack}")
    return "\n".join(lines)


def _run_self(host: SelfHost, name: str, *extra: str) -> tuple[int, str]:
    """quiesce exec on its own filesystem: cwd, interpreter, package and output there."""
    mnt = host.fs.mountpoint
    out_file = mnt / f"{name}.out"
    unset = ("PYTHONDONTWRITEBYTECODE", "QUIESCE_FAULT", "PYTHONPATH")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    cmd = [str(host.python), "-m", "quiesce", "exec", "--allow-self", "--timeout", str(DEADLINE_S)]
    with open(out_file, "wb") as out:
        proc = subprocess.Popen(
            [*cmd, *extra, str(mnt), "--", "true"],
            cwd=mnt,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            env=env,
        )
    try:
        rc = proc.wait(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        report = _stuck_report(proc.pid)
        thaw_quietly(str(mnt))
        proc.kill()
        proc.wait(timeout=30)
        pytest.fail(f"self-deadlock: quiesce exec hung on its own filesystem:\n{report}")
    return rc, out_file.read_text()


def test_exec_on_its_own_filesystem_completes(selfhost: SelfHost) -> None:
    before = _pycache(selfhost.fs.mountpoint)
    assert before, "pip should have compiled the package into __pycache__"
    rc, output = _run_self(selfhost, "plain")
    assert rc == 0, output
    assert "freeze window" in output and "true exited 0" in output, output
    assert _pycache(selfhost.fs.mountpoint) == before, "bytecode was written on the volume"


def test_exec_json_on_its_own_filesystem_reports_a_controller_thaw(selfhost: SelfHost) -> None:
    before = _pycache(selfhost.fs.mountpoint)
    rc, output = _run_self(selfhost, "json", "--json")
    assert rc == 0, output
    report = json.loads(output)
    assert report["returncode"] == 0 and report["command"] == ["true"]
    assert report["thawed_by"] == "controller", report  # not the guardian at the deadline
    (vol,) = report["volumes"]
    assert vol["mount_point"] == selfhost.fs.path and vol["state"] == "thawed"
    assert report["window_s"] < DEADLINE_S / 2
    assert _pycache(selfhost.fs.mountpoint) == before, "bytecode was written on the volume"
