"""Hooks: one-shot commands, the hook directory and session hooks, around real freezes
of loop filesystems (snapshots.create with the command provider)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from conftest import is_writable
from helpers.jobtools import PY, events, lock_is_free, pid_alive, session_argv, wait_for

from quiesce import snapshot as snapshots
from quiesce.apps.hooks import (
    HookContext,
    HookDirectory,
    HookFailed,
    SessionHook,
    SessionSpec,
    held,
    run_command,
)
from quiesce.host.proc import OUTPUT_LIMIT

pytestmark = pytest.mark.timeout(60)


def run(argv: list[str], timeout: float = 10.0):
    return run_command(argv, name="t", kind="pre-freeze", timeout=timeout, env=os.environ)


def create(fs, tmp_path: Path, quiescers, snap_argv: list[str] | None = None):
    return snapshots.create(
        [fs.path], "command", job="hooks", options={"create": snap_argv or ["true"]},
        timeout=20, state_dir=tmp_path / "state", quiescers=quiescers,
    )  # fmt: skip


# -- one-shot commands -------------------------------------------------------------------


def test_command_success_captures_stdout_and_stderr():
    r = run(["/bin/sh", "-c", "echo out; sleep 0.2; echo err >&2"])
    assert (r.status, r.returncode, r.error) == ("ok", 0, None)
    assert r.output.split() == ["out", "err"]
    assert 0.2 <= r.duration_s < 10  # the sleep is inside the measured step
    assert r.end - r.start == pytest.approx(r.duration_s)


def test_command_nonzero_exit_is_a_failure():
    r = run(["/bin/sh", "-c", "echo half done; exit 7"])
    assert (r.status, r.returncode, r.error) == ("failed", 7, "exit 7")
    assert r.output == "half done\n"


def test_command_timeout_kills_its_whole_process_group(tmp_path):
    pidfile = tmp_path / "bg.pid"
    t0 = time.monotonic()
    r = run(["/bin/sh", "-c", f"sleep 60 & echo $! > {pidfile}; wait"], timeout=0.5)
    assert r.status == "timeout"
    assert r.error == "timed out after 0.5s; its process group was killed"
    assert time.monotonic() - t0 < 10
    background = int(pidfile.read_text())
    assert wait_for(lambda: not pid_alive(background), timeout=5)  # the grandchild too


def test_command_output_is_bounded():
    r = run([PY, "-c", "print('x' * 100_000)"])
    assert r.ok
    assert len(r.output) < OUTPUT_LIMIT + 100
    assert "bytes dropped" in r.output


def test_missing_program_is_an_error_not_an_exception():
    r = run(["/nonexistent/hook"])
    assert r.status == "error"
    assert r.error == "cannot run /nonexistent/hook: No such file or directory"


# -- hook directory ------------------------------------------------------------------


def test_hook_directory_freezes_in_name_order_and_thaws_after(loopfs, tmp_path):
    fs = loopfs("ext4")
    hookdir, log = tmp_path / "hooks.d", tmp_path / "order.log"
    hookdir.mkdir()
    for name in ("20-second", "10-first", ".hidden", "30-old.dpkg-old", "15-notexec"):
        script = hookdir / name
        script.write_text(f'#!/bin/sh\necho "{name} $1" >> {log}\n')
        script.chmod(0o644 if name == "15-notexec" else 0o755)
    from quiesce.apps.hooks import hook_dir_scripts

    scripts = hook_dir_scripts(hookdir)
    assert [s.name for s in scripts] == ["10-first", "20-second"]
    ctx = HookContext(job="hooks")
    create(fs, tmp_path, [HookDirectory(ctx, scripts, timeout=5)])
    assert log.read_text().splitlines() == [
        "10-first freeze", "20-second freeze", "10-first thaw", "20-second thaw",
    ]  # fmt: skip
    assert [r.kind for r in ctx.results] == ["hook-dir:freeze"] * 2 + ["hook-dir:thaw"] * 2


def test_hook_directory_failure_thaws_what_it_froze(loopfs, tmp_path):
    fs = loopfs("ext4")
    hookdir, log = tmp_path / "hooks.d", tmp_path / "order.log"
    hookdir.mkdir()
    (hookdir / "10-ok").write_text(f'#!/bin/sh\necho "ok $1" >> {log}\n')
    (hookdir / "20-bad").write_text(f'#!/bin/sh\necho "bad $1" >> {log}\n[ "$1" = thaw ]\n')
    for s in hookdir.iterdir():
        s.chmod(0o755)
    ctx = HookContext(job="hooks")
    with pytest.raises(HookFailed, match=r"^hook-dir:freeze '20-bad': exit 1; nothing"):
        create(fs, tmp_path, [HookDirectory(ctx, sorted(hookdir.iterdir()), timeout=5)])
    assert log.read_text().splitlines() == ["ok freeze", "bad freeze", "ok thaw", "bad thaw"]
    assert is_writable(fs.path)


# -- session hooks ------------------------------------------------------------------------


def session(ctx: HookContext, lock: Path, log: Path, mode: str = "ok", **kw) -> SessionHook:
    spec = SessionSpec("db-lock", session_argv(lock, log, mode), kw.get("ready", 10),
                       kw.get("done", 10))  # fmt: skip
    return SessionHook(ctx, spec)


def test_session_hook_holds_its_lock_across_the_window(loopfs, tmp_path):
    fs = loopfs("ext4")
    lock, log = tmp_path / "app.lock", tmp_path / "session.log"
    ctx = HookContext(job="hooks")
    hook = session(ctx, lock, log)
    # The snapshot command fails unless the lock is held while the volume is frozen.
    check = f"flock -n {lock} true && exit 1; exit 0"
    manifest = create(fs, tmp_path, [hook], ["/bin/sh", "-c", check])
    assert manifest.consistency == "atomic"
    assert events(log) == ["started", "locked", "released-thaw", "exit"]
    assert lock_is_free(lock, timeout=1)
    r = ctx.results[0]
    assert (r.kind, r.status, r.returncode) == ("session", "ok", 0)
    assert "holding the lock" in r.output


def test_session_hook_exiting_before_ready_aborts(loopfs, tmp_path):
    fs = loopfs("ext4")
    lock, log, snapped = tmp_path / "app.lock", tmp_path / "session.log", tmp_path / "snapped"
    ctx = HookContext(job="hooks")
    with pytest.raises(HookFailed) as e:
        create(fs, tmp_path, [session(ctx, lock, log, "fail-before-ready")],
               ["touch", str(snapped)])  # fmt: skip
    assert e.value.message.startswith(
        "session 'db-lock': exited before answering 'ready' (exit 3); nothing was snapshotted"
    )
    assert "cannot take the lock: demo failure" in ctx.results[0].output
    assert not snapped.exists()
    assert is_writable(fs.path)


def test_hung_session_hook_times_out_and_is_killed(loopfs, tmp_path):
    fs = loopfs("ext4")
    lock, log = tmp_path / "app.lock", tmp_path / "session.log"
    ctx = HookContext(job="hooks")
    hook = session(ctx, lock, log, "never-ready", ready=0.5, done=0.5)
    t0 = time.monotonic()
    with pytest.raises(HookFailed, match=r"^session 'db-lock': no 'ready' within 0.5s"):
        create(fs, tmp_path, [hook])
    assert time.monotonic() - t0 < 10
    assert hook.proc is not None and not pid_alive(hook.proc.pid)
    assert ctx.results[0].status == "timeout"
    assert is_writable(fs.path)


def test_session_hook_error_answer_aborts(loopfs, tmp_path):
    fs = loopfs("ext4")
    ctx = HookContext(job="hooks")
    hook = session(ctx, tmp_path / "l", tmp_path / "log", "error")
    with pytest.raises(HookFailed, match=r"^session 'db-lock': database unreachable"):
        create(fs, tmp_path, [hook])


def test_session_hook_that_never_says_done_is_killed_and_reported(loopfs, tmp_path):
    fs = loopfs("ext4")
    lock, log = tmp_path / "app.lock", tmp_path / "session.log"
    ctx = HookContext(job="hooks")
    hook = session(ctx, lock, log, "never-done", done=0.5)
    manifest = create(fs, tmp_path, [hook])  # the snapshot itself is good
    assert manifest.snapshots
    assert ctx.release_failures == ["session 'db-lock': no 'done' within 0.5s after 'thaw'"]
    assert any("did not exit after EOF" in w for w in ctx.warnings)
    assert hook.proc is not None and not pid_alive(hook.proc.pid)
    assert lock_is_free(lock, timeout=5)  # killed: the kernel dropped its lock


def test_failed_snapshot_sends_eof_and_the_session_hook_releases(loopfs, tmp_path):
    fs = loopfs("ext4")
    lock, log = tmp_path / "app.lock", tmp_path / "session.log"
    ctx = HookContext(job="hooks")
    with pytest.raises(Exception, match="the group was thawed"):
        create(fs, tmp_path, [session(ctx, lock, log)], ["false"])
    assert events(log) == ["started", "locked", "released-eof"]
    assert lock_is_free(lock, timeout=1)
    assert is_writable(fs.path)


def test_crash_consistent_policy_goes_on_without_the_session_hook(loopfs, tmp_path):
    fs = loopfs("ext4")
    ctx = HookContext(job="hooks", on_hook_failure="crash-consistent")
    hook = session(ctx, tmp_path / "l", tmp_path / "log", "fail-before-ready")
    manifest = create(fs, tmp_path, [hook])
    assert manifest.snapshots
    assert ctx.degraded == ["session 'db-lock': exited before answering 'ready' (exit 3)"]


def test_held_releases_in_reverse_on_exceptions(tmp_path):
    log = tmp_path / "log"
    ctx = HookContext(job="hooks")
    a = session(ctx, tmp_path / "a.lock", log)
    with pytest.raises(RuntimeError), held([a]):
        assert events(log)[-1] == "locked"
        raise RuntimeError("snapshot failed")
    assert events(log)[-1] == "released-eof"


# -- the environment a hook gets ------------------------------------------------------------

SECRETS = {  # in quiesce's own environment: none of it may reach a hook
    "MY_DB_PW": "hunter2-the-db-password",
    "RESTIC_PASSWORD": "restic-repository-passw0rd",
    "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "BORG_PASSPHRASE": "borg-passphrase-1234",
    "PGPASSWORD": "pg-password-5678",
    "GITHUB_TOKEN": "ghp_abcdefghijklmnop",
}
PRINT_ENV = [PY, "-c", "import os; print('\\n'.join(f'{k}={v}' for k, v in os.environ.items()))"]


def _env_of(output: str) -> dict[str, str]:
    lines = [ln.split("=", 1) for ln in output.splitlines() if "=" in ln]
    return {k: v for k, v in lines if k.isidentifier()}


def _assert_no_secret(text: str) -> None:
    for name, value in SECRETS.items():
        assert name not in text and value not in text, name


def test_a_command_hook_gets_a_clean_environment_and_its_own_env_table(monkeypatch):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("LANG", "C.UTF-8")
    monkeypatch.setenv("PATH", "/home/someone/bin:" + os.environ["PATH"])
    ctx = HookContext(job="envjob", volumes=["/srv/a", "/srv/b"])
    env = ctx.env("pre-freeze", {"PGHOST": "/run/postgresql", "QUIESCE_JOB": "spoofed"})
    r = run_command(PRINT_ENV, name="t", kind="pre-freeze", timeout=10, env=env)
    assert r.ok, r.error
    _assert_no_secret(r.output)
    seen = _env_of(r.output)
    assert seen["PATH"] == "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    assert seen["HOME"] == "/root"
    assert seen["LANG"] == "C.UTF-8"
    assert seen["PGHOST"] == "/run/postgresql"  # the hook's own env table
    assert seen["QUIESCE_JOB"] == "envjob"  # the table cannot change quiesce's variables
    assert (seen["QUIESCE_PHASE"], seen["QUIESCE_STATUS"]) == ("pre-freeze", "ok")
    extra = set(seen) - {"PATH", "HOME", "LANG", "PGHOST", "LC_CTYPE"}
    assert extra == {"QUIESCE_JOB", "QUIESCE_PHASE", "QUIESCE_VOLUMES", "QUIESCE_STATUS"}


def test_session_hooks_and_the_hook_directory_get_the_clean_environment(tmp_path, monkeypatch):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    dump = tmp_path / "session-env"
    session_code = (
        "import os, sys\n"
        "sys.stdin.readline()\n"
        "open(sys.argv[1], 'w').write('\\n'.join(f'{k}={v}' for k, v in os.environ.items()))\n"
        "print('ready', flush=True)\n"
        "sys.stdin.readline(); print('done', flush=True)\n"
    )
    ctx = HookContext(job="envjob")
    hook = SessionHook(
        ctx, SessionSpec("s", [PY, "-c", session_code, str(dump)], 10, 10, {"APP": "x"})
    )
    hookdir = tmp_path / "hooks.d"
    hookdir.mkdir()
    script = hookdir / "10-env"
    script.write_text(f'#!/bin/sh\n{PY} -c "import os; print(sorted(os.environ))"\n')
    script.chmod(0o755)
    directory = HookDirectory(ctx, [script], timeout=5, env={"DIR_VAR": "d"})
    with held([directory, hook]):
        pass
    assert [r.status for r in ctx.results] == ["ok", "ok", "ok"], ctx.results
    session_env = _env_of(dump.read_text())
    assert session_env["APP"] == "x"
    _assert_no_secret(dump.read_text())
    for r in ctx.results:
        _assert_no_secret(r.output)
    assert "'DIR_VAR'" in ctx.results[0].output


def test_a_known_secret_in_a_hooks_output_is_scrubbed(monkeypatch):
    from quiesce.util.redact import register_secret

    register_secret("s3cr3t-read-from-a-password-file")
    r = run([PY, "-c", "print('the password is s3cr3t-read-from-a-password-file; "
                       "repo rest:https://u:urlpass@host/')"])  # fmt: skip
    assert r.output == "the password is ***; repo rest:https://u:***@host/\n"
    r = run([PY, "-c", "import sys; print('s3cr3t-read-from-a-password-file'); sys.exit(4)"])
    assert "s3cr3t" not in r.to_dict()["output"] and "s3cr3t" not in r.describe()
