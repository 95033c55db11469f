"""The fast entry point (cli/entry.py): `status`, `thaw`, `--help` and `--version` are
served without typer or rich, and behave exactly as the typer commands do (same output,
same exit codes). Timings are bench/startup.py's business, not these tests'."""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import LoopFS, thaw_quietly

import quiesce
from quiesce.cli import gendocs
from quiesce.errors import ExitCode

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
# The typer path, whatever the entry point would serve: the app's own main().
TYPER = [sys.executable, "-c", "import sys; from quiesce.cli.app import main; main(sys.argv[1:])"]
FAST = [sys.executable, "-m", "quiesce"]


_COPY: list[str] = []


def _readable_copy() -> str:
    """The package copied where uid 65534 can read it (removed at exit)."""
    if not _COPY:
        d = tempfile.mkdtemp(prefix="quiesce-src-", dir="/tmp")
        os.chmod(d, 0o755)
        shutil.copytree(
            Path(quiesce.__file__).resolve().parent, Path(d) / "quiesce",
            ignore=shutil.ignore_patterns("__pycache__"),
        )  # fmt: skip
        atexit.register(shutil.rmtree, d, ignore_errors=True)
        _COPY.append(d)
    return _COPY[0]


def _run(base: list[str], *args: str, prefix: list[str] | None = None):
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    if prefix:  # another user reaches neither root's site-packages nor a checkout in /root
        env["PYTHONPATH"] = _readable_copy()
    return subprocess.run(
        [*(prefix or []), *base, *args], capture_output=True, text=True, timeout=60, cwd="/",
        env=env,
    )  # fmt: skip


def _loaded(*args: str) -> set[str]:
    """The modules the entry point imported to serve ``args``."""
    code = (
        "import sys, json\nfrom quiesce.cli.entry import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        "sys.stderr.write('\\nMODULES ' + json.dumps(sorted(sys.modules)))\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60
    )
    return set(json.loads(p.stderr.rsplit("MODULES ", 1)[1]))


@pytest.mark.parametrize(
    "args",
    [["status"], ["status", "--json"], ["thaw", "/nonexistent/qb"], ["--help"], ["--version"], []],
)
def test_fast_commands_import_neither_typer_nor_rich(args: list[str]) -> None:
    mods = _loaded(*args)
    assert "typer" not in mods and "rich" not in mods and "click" not in mods, args


def test_other_commands_and_flags_fall_through_to_typer() -> None:
    assert "typer" in _loaded("plan", "/nonexistent")
    assert "typer" in _loaded("status", "--bogus")  # typer's own usage error
    p = _run(FAST, "status", "--bogus")
    assert p.returncode == ExitCode.USAGE and "No such option" in p.stderr


def _same(args: list[str], prefix: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    fast, slow = _run(FAST, *args, prefix=prefix), _run(TYPER, *args, prefix=prefix)
    assert (fast.returncode, fast.stdout, fast.stderr) == (
        slow.returncode, slow.stdout, slow.stderr,
    ), args  # fmt: skip
    return fast


def test_thaw_errors_are_identical_through_both_paths(tmp_path: Path) -> None:
    p = _same(["thaw", "/nonexistent/qb"])
    assert p.returncode == ExitCode.USAGE and p.stderr.startswith("quiesce: ")
    p = _same(["thaw", "--json", str(tmp_path)])  # not a mount root
    assert p.returncode == ExitCode.USAGE
    assert json.loads(p.stdout)["results"][0]["exit_code"] == ExitCode.USAGE


def test_thaw_of_a_filesystem_not_frozen_is_identical(loopfs) -> None:
    fs: LoopFS = loopfs("ext4")
    p = _same(["thaw", fs.path])
    assert p.returncode == ExitCode.NOT_FROZEN


def test_thaw_of_a_frozen_filesystem_through_the_fast_path(loopfs) -> None:
    fs: LoopFS = loopfs("ext4")
    fs.freeze_externally()
    try:
        p = _run(FAST, "thaw", fs.path)
        assert p.returncode == 0, p.stderr
        assert p.stdout == f"thawed: {fs.path} (FITHAW (no guardian held it))\n"
        assert _run(FAST, "thaw", fs.path).returncode == ExitCode.NOT_FROZEN
    finally:
        thaw_quietly(fs.path)


def _normalise(text: str) -> str:
    return re.sub(r"\d+(\.\d+)?", "N", text)


def test_status_is_identical_through_both_paths() -> None:
    """Other runs on this machine may come and go between the two calls: retry."""
    for _ in range(5):
        fast, slow = _run(FAST, "status"), _run(TYPER, "status")
        assert fast.returncode == slow.returncode == 0
        if _normalise(fast.stdout) == _normalise(slow.stdout):
            break
    assert _normalise(fast.stdout) == _normalise(slow.stdout)
    fast, slow = _run(FAST, "status", "--json"), _run(TYPER, "status", "--json")
    assert fast.returncode == slow.returncode == 0
    assert json.loads(fast.stdout).keys() == json.loads(slow.stdout).keys()


def test_status_as_non_root_says_it_cannot_tell() -> None:
    """(Here typer may not even be importable as nobody: the fast path needs no typer.)"""
    p = _run(FAST, "status", prefix=NOBODY)
    assert p.returncode == ExitCode.PERMISSION and "cannot tell" in p.stderr, p.stderr
    p = _run(FAST, "status", "--json", prefix=NOBODY)
    assert json.loads(p.stdout)["exit_code"] == ExitCode.PERMISSION
    # the typer command calls the same function (as root, forked: test_guardian_trust.py)


def test_status_shows_a_held_freeze(loopfs) -> None:
    fs: LoopFS = loopfs("ext4")
    held = _run(FAST, "freeze", "--timeout", "30", fs.path)
    assert held.returncode == 0, held.stderr
    try:
        p = _run(FAST, "status")
        assert p.returncode == 0
        header, *rows = p.stdout.splitlines()
        assert header.split("  ")[0] == "volume" and "deadline in" in header
        assert any(r.startswith(fs.path + " ") and " frozen " in r for r in rows), p.stdout
    finally:
        assert _run(FAST, "thaw", fs.path).returncode == 0
        thaw_quietly(fs.path)


def test_packaged_help_is_the_live_rendering() -> None:
    """The pre-rendered help equals what typer prints now (`python3 -m quiesce.cli.gendocs`
    rewrites it), and the fast path serves it byte for byte, exit codes included."""
    assert gendocs.main(["--check"]) == 0, "run: python3 -m quiesce.cli.gendocs"
    for args in (["--help"], ["-h"], []):
        _same(args)
    assert _run(FAST, "--help").stdout == (gendocs.DATA / "help.txt").read_text()


def test_version_through_both_paths() -> None:
    from quiesce import __version__

    p = _same(["--version"])
    assert (p.returncode, p.stdout) == (0, __version__ + "\n")
    assert json.loads(_run(FAST, "version", "--json").stdout) == {"version": __version__}
