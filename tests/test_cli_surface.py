"""The command line as a whole: --json on every command, the man page and completion
generated from the app, `systemd --install` and hand-edited units, `exec` of a command
that does not exist."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from conftest import LoopFS, is_writable

from quiesce.cli import gendocs
from quiesce.cli.app import app
from quiesce.errors import ExitCode
from quiesce.integrations.systemd import edited_by_hand, install, stamp

COMMANDS = list(gendocs.walk(gendocs.root()))


def quiesce(*args: str | Path, cwd: str = "/") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "quiesce", *map(str, args)],
        capture_output=True, text=True, timeout=120, cwd=cwd,
    )  # fmt: skip


def test_the_walk_sees_every_command() -> None:
    names = {" ".join(p) for p, _ in COMMANDS}
    assert {"status", "thaw", "run", "systemd", "snapshot", "snapshot mount"} <= names
    assert len(names) >= 16


@pytest.mark.parametrize("path", [" ".join(p) for p, c in COMMANDS if not gendocs.is_group(c)])
def test_every_command_has_json(path: str) -> None:
    cmd = dict((" ".join(p), c) for p, c in COMMANDS)[path]
    assert "--json" in gendocs.flags(cmd), f"quiesce {path} has no --json"


def test_man_page_lists_every_command_and_option() -> None:
    page = (gendocs.DATA / "quiesce.1").read_text()
    assert page == gendocs.man_page(), "run: python3 -m quiesce.cli.gendocs"
    roff = page.replace("\\-", "-")
    for path, cmd in COMMANDS:
        assert f'.SS "{" ".join(path)}"' in roff, path  # roff: a name's - is \-
        for opt in gendocs.options(cmd):
            for flag in (*opt.opts, *opt.secondary_opts):
                assert flag in roff, (path, flag)
    assert "--version" in roff
    if shutil.which("man"):
        p = subprocess.run(
            ["man", "-l", str(gendocs.DATA / "quiesce.1")], capture_output=True, text=True,
            env={"MANWIDTH": "100", "PATH": "/usr/bin:/bin"},
        )  # fmt: skip
        assert p.returncode == 0 and "snapshot mount" in p.stdout


def _bash_complete(line: str) -> list[str]:
    script = gendocs.DATA / "quiesce.bash"
    words = line.split(" ")
    prog = (
        f"source {script}\nCOMP_WORDS=({' '.join(repr(w) for w in words)})\n"
        f"COMP_CWORD={len(words) - 1}\n_quiesce\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"\n"
    )
    p = subprocess.run(["bash", "-c", prog], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    return p.stdout.split()


def test_bash_completion_knows_commands_and_options() -> None:
    assert (gendocs.DATA / "quiesce.bash").read_text() == gendocs.bash_completion()
    assert {"status", "thaw", "snapshot", "systemd"} <= set(_bash_complete("quiesce "))
    assert _bash_complete("quiesce snap") == ["snapshot"]
    assert {"mount", "umount", "delete"} <= set(_bash_complete("quiesce snapshot "))
    assert {"--force", "--install", "--json"} <= set(_bash_complete("quiesce systemd x.toml --"))
    assert "--forget" in _bash_complete("quiesce snapshot delete --f")


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")
def test_zsh_completion_parses() -> None:
    p = subprocess.run(["zsh", "-n", str(gendocs.DATA / "_quiesce")], capture_output=True)
    assert p.returncode == 0, p.stderr


def test_completion_and_man_page_are_package_data() -> None:
    text = Path(__file__).parent.parent.joinpath("pyproject.toml").read_text()
    assert '"cli/data/*"' in text
    install_sh = Path(__file__).parent.parent.joinpath("scripts/install.sh").read_text()
    for name in ("quiesce.1", "quiesce.bash", "_quiesce"):
        assert name in install_sh


def test_typer_app_is_the_one_walked() -> None:
    assert gendocs.root().name == typer.main.get_command(app).name


# -- systemd --install ----------------------------------------------------------------------


def test_a_hand_edited_unit_is_not_overwritten(tmp_path: Path) -> None:
    units = {"quiesce-x.service": stamp("# head\n[Service]\nType=oneshot\n")}
    install(units, tmp_path, reload=False)
    path = tmp_path / "quiesce-x.service"
    assert not edited_by_hand(path.read_text())
    newer = {"quiesce-x.service": stamp("# head\n[Service]\nType=oneshot\nNice=1\n")}
    install(newer, tmp_path, reload=False)  # ours, unedited: replaced
    assert path.read_text() == newer["quiesce-x.service"]
    path.write_text(path.read_text() + "ExecStartPost=/usr/local/bin/mine\n")
    from quiesce.errors import UsageError

    with pytest.raises(UsageError, match="edited by hand"):
        install(units, tmp_path, reload=False)
    assert "mine" in path.read_text()
    install(units, tmp_path, reload=False, force=True)
    assert path.read_text() == units["quiesce-x.service"]
    path.write_text("[Service]\nType=simple\n")  # no hash line at all: someone else's
    with pytest.raises(UsageError):
        install(units, tmp_path, reload=False)


def _job(tmp_path: Path, volume: str, repo: Path) -> Path:
    job = tmp_path / "nightly.toml"
    job.write_text(
        f'volumes = ["{volume}"]\nstate_dir = "/var/lib/quiesce-test-{tmp_path.name}"\n'
        f'[provider]\ntype = "reflink"\n'
        f'[backup]\ntarget = "restic"\nrepository = "{repo}"\npassword_env = "PW"\n'
    )
    job.chmod(0o600)
    return job


def test_systemd_install_refuses_a_hand_edit_and_warns_about_tmp(loopfs, tmp_path) -> None:
    fs: LoopFS = loopfs("ext4")
    repo = tmp_path / "repo"
    repo.mkdir()
    job, units = _job(tmp_path, fs.path, repo), tmp_path / "units"
    p = quiesce("systemd", job, "--install", "--unit-dir", units, "--json")
    assert p.returncode == 0, p.stderr
    data = json.loads(p.stdout)
    assert len(data["written"]) == 2
    if str(tmp_path).startswith("/tmp/"):
        assert any(str(repo) in w and "PrivateTmp" in w for w in data["warnings"])
    service = units / "quiesce-nightly.service"
    service.write_text(service.read_text().replace("ConditionACPower=true\n", ""))
    edited = service.read_text()
    p = quiesce("systemd", job, "--install", "--unit-dir", units)
    assert p.returncode == ExitCode.USAGE and "edited by hand" in p.stderr
    assert "--force" in p.stderr and service.read_text() == edited
    p = quiesce("systemd", job, "--install", "--unit-dir", units, "--force")
    assert p.returncode == 0 and "ConditionACPower" in service.read_text()


def test_systemd_warns_about_job_paths_under_tmp(tmp_path: Path) -> None:
    from quiesce.integrations.systemd import private_tmp_warnings

    assert private_tmp_warnings(["/srv/db", "/var/lib/quiesce"]) == []
    (w,) = private_tmp_warnings(["/tmp/repo", "/srv/db"])
    assert "/tmp/repo" in w and "PrivateTmp=yes" in w
    assert private_tmp_warnings(["/var/tmp/x"]) and not private_tmp_warnings(["/tmpfoo"])


# -- exec ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cmd", ["/nonexistent/backup-tool", "no-such-tool-on-path", "not-exec"])
def test_exec_refuses_a_missing_command_before_freezing(loopfs, tmp_path, cmd: str) -> None:
    fs: LoopFS = loopfs("ext4")
    if cmd == "not-exec":  # exists, mode 0644
        (tmp_path / cmd).write_text("#!/bin/sh\n")
        cmd = str(tmp_path / cmd)
    p = quiesce("exec", fs.path, "--", cmd, "arg")
    assert p.returncode == ExitCode.USAGE, p.stderr
    assert f"cannot run {cmd}" in p.stderr and "nothing was frozen" in p.stderr
    assert "freeze window" not in p.stderr
    assert is_writable(fs.path)
