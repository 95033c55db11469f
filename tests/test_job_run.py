"""`quiesce run JOB.toml` end to end on real loop filesystems: the report, the policy,
post-thaw hooks on every path out, and a controller killed inside the window."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import is_writable
from helpers.jobtools import (
    PY,
    events,
    lock_is_free,
    process_state,
    session_argv,
    toml_list,
    wait_for,
    write_job,
)

from quiesce.errors import ExitCode

pytestmark = pytest.mark.timeout(90)


def quiesce(*args: str, env: dict[str, str] | None = None, timeout: float = 60):
    return subprocess.run(
        [sys.executable, "-m", "quiesce", *args], capture_output=True, text=True,
        timeout=timeout, env=os.environ | (env or {}),
    )  # fmt: skip


def marker_hook(path: Path) -> list[str]:
    """A hook that appends its phase and status to ``path`` (outside the volumes)."""
    code = (
        "import os,sys; open(sys.argv[1],'a').write("
        "os.environ['QUIESCE_PHASE']+' '+os.environ['QUIESCE_STATUS']+'\\n')"
    )
    return [PY, "-c", code, str(path)]


def job_text(fs_path: str, tmp: Path, *, create: list[str], extra: str = "") -> str:
    return f"""
name = "t1"
volumes = ["{fs_path}"]
state_dir = "{tmp / "state"}"
{extra}
[provider]
type = "command"
create = {toml_list(create)}
"""


def test_run_reports_phases_hooks_window_and_snapshot(loopfs, tmp_path):
    fs = loopfs("ext4")
    log = tmp_path / "hooks.log"
    inside = tmp_path / "inside"
    # The snapshot command proves it ran while the volume was frozen: a write probe
    # (in a child, with a timeout) must fail.
    probe = (
        "import sys; from subprocess import DEVNULL as N, Popen, TimeoutExpired\n"
        "p = Popen(['touch', sys.argv[1] + '/probe'], stdout=N, stderr=N)\n"
        "try: p.wait(0.3); sys.exit(1)\nexcept TimeoutExpired: pass\n"
        "open(sys.argv[2],'w').write('frozen'); print('snap-1')"
    )
    job = write_job(tmp_path, job_text(fs.path, tmp_path, create=[PY, "-c", probe, fs.path,
        str(inside)], extra=f"""
[[hooks.pre_freeze]]
name = "pause"
command = {toml_list(marker_hook(log))}

[[hooks.post_thaw]]
name = "resume"
command = {toml_list(marker_hook(log))}

[[hooks.after_run]]
name = "ping"
command = {toml_list(after_run_hook(tmp_path / "told.json"))}

[[hooks.after_run]]
name = "flaky-monitor"
command = ["{PY}", "-c", "raise SystemExit(7)"]
"""))  # fmt: skip
    p = quiesce("run", str(job), "--json")
    assert p.returncode == 0, p.stderr + p.stdout  # a failed after-run hook is a warning
    report = json.loads(p.stdout)
    note = json.loads((tmp_path / "told.json").read_text())
    assert (note["status"], note["exit_code"], note["error"]) == ("ok", "0", "")
    assert note["snapshot"] == report["manifest_id"] == note["report"]["manifest_id"]
    assert "after-run 'flaky-monitor': exit 7" in report["warnings"]
    report["hooks"] = report["hooks"][:-2]  # the rest of this test is about the snapshot
    assert inside.read_text() == "frozen"
    assert log.read_text().split("\n")[:2] == ["pre-freeze ok", "post-thaw ok"]
    assert report["ok"] and report["exit_code"] == 0 and report["error"] is None
    assert report["consistency"] == "atomic"
    assert [h["kind"] for h in report["hooks"]] == ["pre-freeze", "post-thaw"]
    assert all(h["status"] == "ok" for h in report["hooks"])
    names = [ph["name"] for ph in report["phases"]]
    for wanted in ("plan", "pre-freeze hooks", f"freeze {fs.path}",
                   "provider snapshot (frozen)", f"thaw {fs.path}", "post-thaw hooks",
                   "freeze window"):  # fmt: skip
        assert wanted in names, names
    # syncfs runs unless expediting makes it pointless (little dirty machine-wide)
    ran = report["window"]["syncfs"] == "done"
    assert ran or report["window"]["syncfs"].startswith("skipped: "), report["window"]
    assert (f"syncfs {fs.path}" in names) == ran, names
    for ph in report["phases"]:
        assert ph["start"] <= ph["end"] and ph["duration_s"] >= 0, ph
    order = {n: i for i, n in enumerate(names)}
    assert order["pre-freeze hooks"] < order[f"freeze {fs.path}"] < order["post-thaw hooks"]
    assert report["window"]["window_s"] >= 0.3
    assert report["window"]["thawed_by"] == "controller"
    assert report["snapshots"] and report["snapshots"][0]["provider"] == "command"
    manifest = json.loads((tmp_path / "state/snapshots" / f"{report['manifest_id']}.json")
                          .read_text())  # fmt: skip
    assert manifest["consistency"] == "atomic"
    assert is_writable(fs.path)


def after_run_hook(path: Path) -> list[str]:
    """A hook that writes what it was told (environment, the report on stdin) to ``path``."""
    code = (
        "import json,os,sys; e=os.environ; json.dump({'phase': e['QUIESCE_PHASE'], "
        "'status': e['QUIESCE_STATUS'], 'exit_code': e['QUIESCE_EXIT_CODE'], "
        "'error': e['QUIESCE_ERROR'], 'snapshot': e['QUIESCE_SNAPSHOT'], "
        "'report': json.load(sys.stdin)}, open(sys.argv[1], 'w'))"
    )
    return [PY, "-c", code, str(path)]


def test_pre_freeze_failure_aborts_before_the_freeze_and_post_thaw_still_runs(loopfs, tmp_path):
    fs = loopfs("ext4")
    log, snapped = tmp_path / "hooks.log", tmp_path / "snapped"
    told = tmp_path / "told.json"
    job = write_job(tmp_path, job_text(fs.path, tmp_path, create=["touch", str(snapped)],
        extra=f"""
[[hooks.pre_freeze]]
name = "broken"
command = ["{PY}", "-c", "import sys; print('app says no'); sys.exit(3)"]

[[hooks.post_thaw]]
command = {toml_list(marker_hook(log))}

[[hooks.after_run]]
name = "notify"
command = {toml_list(after_run_hook(told))}
"""))  # fmt: skip
    p = quiesce("run", str(job), "--json")
    assert p.returncode == ExitCode.HOOK, p.stderr
    report = json.loads(p.stdout)
    assert report["error"]["error"] == "HookFailed"
    assert report["error"]["message"] == (
        "pre-freeze 'broken': exit 3; nothing was snapshotted"
    )  # fmt: skip
    assert "quiesce: pre-freeze 'broken': exit 3; nothing was snapshotted" in p.stderr
    broken = report["hooks"][0]
    assert (broken["status"], broken["returncode"]) == ("failed", 3)
    assert broken["output"].strip() == "app says no"
    assert log.read_text() == "post-thaw failed\n"  # released, told the run failed
    # the after-run hook came last and was told everything, the report on its stdin
    assert [h["kind"] for h in report["hooks"]][-1] == "after-run"
    note = json.loads(told.read_text())
    assert (note["phase"], note["status"], note["exit_code"]) == ("after-run", "failed", "11")
    assert note["error"] == "pre-freeze 'broken': exit 3; nothing was snapshotted"
    assert note["report"]["error"]["error"] == "HookFailed" and note["snapshot"] == ""
    assert not snapped.exists()  # the provider never ran: nothing was frozen
    assert not list((tmp_path / "state").glob("snapshots/*.json"))
    assert is_writable(fs.path)


def test_crash_consistent_policy_snapshots_anyway_and_says_so(loopfs, tmp_path):
    fs = loopfs("ext4")
    job = write_job(tmp_path, job_text(fs.path, tmp_path, create=["true"], extra="""
on_hook_failure = "crash-consistent"

[[hooks.pre_freeze]]
name = "slow"
command = ["sleep", "30"]
timeout = 0.5
"""))  # fmt: skip
    p = quiesce("run", str(job), "--json")
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)
    assert report["hooks"][0]["status"] == "timeout"
    assert report["consistency"] == "atomic"  # frozen as one instant, but not quiesced
    reason = report["consistency_reason"]
    assert reason.startswith(
        "not quiesced, as after a power cut at best: pre-freeze 'slow': timed out after 0.5s"
    )
    assert any("only crash-consistent" in w for w in report["warnings"])
    manifest = json.loads(
        (tmp_path / "state/snapshots" / f"{report['manifest_id']}.json").read_text()
    )
    assert (manifest["consistency"], manifest["consistency_reason"]) == ("atomic", reason)
    human = quiesce("run", str(job))
    assert human.returncode == 0
    assert "consistency: atomic (not quiesced, as after a power cut at best: pre-freeze 'slow'" in (
        human.stdout
    )


def test_guardian_thaw_still_runs_post_thaw_hooks(loopfs, tmp_path):
    """The snapshot outlives the freeze deadline: the guardian thaws, the run fails with
    EXPIRED, and the post-thaw hook runs anyway (the bug Velero and others shipped)."""
    fs = loopfs("ext4")
    log = tmp_path / "hooks.log"
    job = write_job(tmp_path, job_text(fs.path, tmp_path, create=["sleep", "2.5"], extra=f"""
[timeouts]
freeze = 1

[[hooks.post_thaw]]
command = {toml_list(marker_hook(log))}
"""))  # fmt: skip
    p = quiesce("run", str(job), "--json")
    assert p.returncode == 9, p.stderr  # ExitCode.EXPIRED
    report = json.loads(p.stdout)
    assert report["error"]["error"] == "FreezeExpired"
    assert report["window"]["thawed_by"] == "guardian"
    assert log.read_text() == "post-thaw failed\n"
    assert is_writable(fs.path)


def test_sigkill_of_the_controller_in_the_window_releases_the_session_hook(loopfs, tmp_path):
    """QUIESCE_FAULT=window stops the controller inside the window; SIGKILL it there.
    The guardian thaws, and the session hook sees EOF and releases its lock."""
    fs = loopfs("ext4")
    lock, log = tmp_path / "app.lock", tmp_path / "session.log"
    job = write_job(tmp_path, job_text(fs.path, tmp_path, create=["true"], extra=f"""
[[hooks.session]]
name = "db-lock"
command = {toml_list(session_argv(lock, log))}
ready_timeout = 10
"""))  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "quiesce", "run", str(job), "--json"],
        env=os.environ | {"QUIESCE_FAULT": "window"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert wait_for(lambda: process_state(proc.pid) == "T", timeout=30), events(log)
        assert events(log) == ["started", "locked"]
        assert not lock_is_free(lock, timeout=0.2)  # held across the window
        assert not is_writable(fs.path, timeout=0.3)  # frozen
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert is_writable(fs.path, timeout=10)  # the guardian thawed
        assert lock_is_free(lock, timeout=10)  # the hook saw EOF and let go
        assert wait_for(lambda: "released-eof" in events(log))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_during_the_snapshot_unwinds_everything(loopfs, tmp_path):
    """systemd or cron stopping a run: thaw, EOF to the session hook, post-thaw hooks."""
    fs = loopfs("ext4")
    lock, log, hooks = tmp_path / "app.lock", tmp_path / "session.log", tmp_path / "hooks.log"
    started = tmp_path / "snapshot-started"
    job = write_job(tmp_path, job_text(fs.path, tmp_path, create=[
        "/bin/sh", "-c", f"touch {started}; sleep 5"], extra=f"""
[[hooks.session]]
command = {toml_list(session_argv(lock, log))}

[[hooks.post_thaw]]
command = {toml_list(marker_hook(hooks))}
"""))  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "quiesce", "run", str(job)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert wait_for(started.exists, timeout=30)
        os.kill(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err  # like Ctrl-C
    assert is_writable(fs.path)
    assert events(log) == ["started", "locked", "released-eof"]
    assert hooks.read_text() == "post-thaw failed\n"


def test_a_second_run_of_the_same_job_runs_nothing_while_the_first_is_running(loopfs, tmp_path):
    """The first run holds its job lock from before its hooks to after its backup; a
    second run exits 5 at once naming the first's pid, with no hook run and no freeze.
    SIGKILL of the first drops the lock with the process: the next run goes ahead."""
    fs = loopfs("ext4")
    log, gate = tmp_path / "hooks.log", tmp_path / "gate"
    wait_gate = [PY, "-c",
                 "import os,sys,time\n"
                 "open(sys.argv[1],'a').write('pre-freeze\\n')\n"
                 "while not os.path.exists(sys.argv[2]): time.sleep(0.05)",
                 str(log), str(gate)]  # fmt: skip
    job = write_job(tmp_path, job_text(fs.path, tmp_path, create=["true"], extra=f"""
[[hooks.pre_freeze]]
command = {toml_list(wait_gate)}
"""))  # fmt: skip
    first = subprocess.Popen([sys.executable, "-m", "quiesce", "run", str(job)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert wait_for(lambda: log.exists() and log.read_text() == "pre-freeze\n", 30)
        second = quiesce("run", str(job), "--json")
        assert second.returncode == ExitCode.BUSY == 5, second.stderr
        report = json.loads(second.stdout)
        assert report["error"]["message"] == f"another run of job t1 is running (pid {first.pid})"
        assert report["hooks"] == [] and report["window"] is None
        assert "quiesce: another run of job t1 is running" in second.stderr
        assert log.read_text() == "pre-freeze\n"  # the second ran no hook
        assert is_writable(fs.path)
        env = {"QUIESCE_STATE_DIR": str(tmp_path / "state")}
        st = json.loads(quiesce("status", "--json", env=env).stdout)
        assert [(j["what"], j["job"], j["pid"]) for j in st["running"]] == [
            ("run", "t1", first.pid)
        ]
        human = quiesce("status", env=env).stdout
        assert "job t1: run running since " in human and f"(pid {first.pid})" in human

        first.kill()  # SIGKILL in its pre-freeze hook: the kernel drops the flock
        first.wait(timeout=10)
        gate.touch()
        st = json.loads(quiesce("status", "--json", env=env).stdout)
        assert st["running"] == []  # the kernel dropped the dead run's lock
        third = quiesce("run", str(job))
        assert third.returncode == 0, third.stderr
        assert log.read_text() == "pre-freeze\n" * 2
    finally:
        gate.touch()
        if first.poll() is None:
            first.kill()
        first.communicate(timeout=30)


# -- secrets: never in a hook's environment, a report, or an after_run hook's stdin -----------

URL_PASSWORD = "url-pass-9f2c"
REPOSITORY = f"rest:https://backup:{URL_PASSWORD}@127.0.0.1:1/repo"
SHOWN_REPOSITORY = "rest:https://backup:***@127.0.0.1:1/repo"
QUIESCE_SECRETS = {  # quiesce's own environment while it runs the job
    "MY_BACKUP_PW": "the-password_env-secret-51c0",  # the job's [backup] password_env
    "RESTIC_PASSWORD": "ambient-restic-password-77a1",
    "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
}


def fake_restic(bin_dir: Path, mode_file: Path) -> None:
    """A `restic` on quiesce's PATH that echoes its repository, its password and the AWS
    key on stderr, as a confused target might; `backup` exits 3 (some files unreadable:
    the stderr goes into the report), or 1 when ``mode_file`` says "fail"."""
    bin_dir.mkdir()
    script = bin_dir / "restic"
    script.write_text(
        f"#!{PY}\n"
        "import json, os, sys\n"
        f"fail = os.path.exists({str(mode_file)!r})\n"
        "if sys.argv[1:2] == ['backup']:\n"
        "    e = os.environ\n"
        "    pw, key = e['RESTIC_PASSWORD'], e['AWS_SECRET_ACCESS_KEY']\n"
        "    print(f\"Fatal: cannot read some files in {e['RESTIC_REPOSITORY']} (password \"\n"
        '          f"{pw}, key {key})", file=sys.stderr)\n'
        "    if fail:\n"
        "        sys.exit(1)\n"
        "    print(json.dumps({'message_type': 'summary', 'snapshot_id': 'abcdef0123456789',\n"
        "        'total_bytes_processed': 10, 'total_files_processed': 1, 'files_new': 1,\n"
        "        'files_changed': 0, 'files_unmodified': 0, 'data_added': 10}))\n"
        "    sys.exit(3)\n"
    )
    script.chmod(0o755)


def _no_secret_in(text: str, where: str) -> None:
    for name, value in QUIESCE_SECRETS.items():
        assert name not in text, f"{name} in {where}"
        assert value not in text, f"the value of {name} in {where}"
    assert URL_PASSWORD not in text, f"the repository's password in {where}"


def test_secrets_never_reach_hooks_reports_or_after_run_stdin(loopfs, tmp_path):
    from helpers.snaptools import image_on_reflink_host

    pair = image_on_reflink_host(loopfs, "ext4")
    (pair.inner.mountpoint / "file").write_text("data")
    bin_dir, failing = tmp_path / "bin", tmp_path / "fail-backup"
    fake_restic(bin_dir, failing)
    told = tmp_path / "told.json"
    tell = (
        "import json, os, sys; json.dump({'stdin': sys.stdin.read(), 'env': dict(os.environ)},"
        " open(sys.argv[1], 'w'))"
    )
    job = write_job(tmp_path, f"""
name = "sec"
volumes = ["{pair.inner.path}"]
state_dir = "{tmp_path / "state"}"
[provider]
type = "reflink"

[[hooks.pre_freeze]]
name = "show-env"
command = ["/usr/bin/env"]
env = {{ PGHOST = "/run/postgresql" }}

[[hooks.post_thaw]]
name = "show-env-after"
command = ["/usr/bin/env"]

[[hooks.after_run]]
name = "notify"
command = {toml_list([PY, "-c", tell, str(told)])}
env = {{ MONITOR_URL = "https://hc-ping.example/abc" }}

[backup]
target = "restic"
repository = "{REPOSITORY}"
password_env = "MY_BACKUP_PW"
mount_root = "{tmp_path / "run"}"
verify = "none"
prune = false
""")  # fmt: skip
    env = QUIESCE_SECRETS | {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    p = quiesce("run", str(job), "--json", env=env)
    assert p.returncode == 0, p.stderr + p.stdout
    report = json.loads(p.stdout)
    _no_secret_in(p.stdout + p.stderr, "the JSON report")
    show_env, after = report["hooks"][0], report["hooks"][1]
    assert (show_env["name"], after["name"]) == ("show-env", "show-env-after")
    seen = dict(line.split("=", 1) for line in show_env["output"].splitlines())
    assert seen["PGHOST"] == "/run/postgresql"  # the hook's own env table reaches it
    assert seen["PATH"] == "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    assert seen["QUIESCE_JOB"] == "sec" and seen["QUIESCE_PHASE"] == "pre-freeze"
    assert "PGHOST" not in after["output"]  # one hook's table is not another's
    backup = report["backup"]["backup"]
    assert backup["location"] == SHOWN_REPOSITORY
    assert backup["extra"]["unreadable"] == [
        f"Fatal: cannot read some files in {SHOWN_REPOSITORY} (password ***, key ***)"
    ]
    note = json.loads(told.read_text())  # what the after_run hook got
    _no_secret_in(note["stdin"] + json.dumps(note["env"]), "the after_run hook")
    assert json.loads(note["stdin"])["backup"]["backup"]["location"] == SHOWN_REPOSITORY
    assert note["env"]["MONITOR_URL"] == "https://hc-ping.example/abc"
    assert note["env"]["QUIESCE_STATUS"] == "ok"

    human = quiesce("run", str(job), env=env)  # the human rendering
    assert human.returncode == 0, human.stderr
    assert f"in {SHOWN_REPOSITORY}" in human.stdout
    _no_secret_in(human.stdout + human.stderr, "the human report")

    failing.touch()  # the target fails, echoing its secrets: the error is redacted
    for args in (["run", str(job)], ["run", str(job), "--json"], ["backup", str(job)]):
        p = quiesce(*args, env=env)
        assert p.returncode == ExitCode.BACKUP, p.stderr
        _no_secret_in(p.stdout + p.stderr, " ".join(args[:1] + args[2:]))
        assert f"quiesce: restic backup failed (exit 1): Fatal: cannot read some files in " \
            f"{SHOWN_REPOSITORY} (password ***, key ***)" in p.stderr  # fmt: skip
    note = json.loads(told.read_text())
    _no_secret_in(note["stdin"] + json.dumps(note["env"]), "the after_run hook of a failed run")
    assert note["env"]["QUIESCE_ERROR"].endswith(f"{SHOWN_REPOSITORY} (password ***, key ***)")


def test_a_post_thaw_hook_alone_does_not_make_a_snapshot_application_consistent(loopfs, tmp_path):
    """Only what quiesces before the freeze counts: a post-thaw hook runs after the thaw."""
    fs = loopfs("ext4")
    job = write_job(tmp_path, job_text(fs.path, tmp_path, create=["true"], extra="""
[[hooks.post_thaw]]
name = "resume"
command = ["true"]
"""))  # fmt: skip
    p = quiesce("run", str(job), "--json")
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)
    assert report["consistency"] == "atomic", report["consistency_reason"]
    assert "quiesced" not in report["consistency_reason"]


def test_the_consistency_reason_names_the_steps_that_quiesced(loopfs, tmp_path):
    fs = loopfs("ext4")
    job = write_job(tmp_path, job_text(fs.path, tmp_path, create=["true"], extra="""
[[hooks.post_thaw]]
name = "resume"
command = ["true"]

[[hooks.pre_freeze]]
name = "flush"
command = ["true"]
"""))  # fmt: skip
    p = quiesce("run", str(job), "--json")
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)
    assert report["consistency"] == "atomic"  # a hook proves no flushed state: never clean
    assert report["consistency_reason"].endswith(
        "; pre-freeze hook 'flush': ran before the freeze (a hook proves no flushed state)"
    ), report["consistency_reason"]


def test_a_job_runs_errors_give_hints_in_the_jobs_syntax(loopfs, tmp_path):
    """The guardian's deadline passes inside the window: the hint names
    timeouts.freeze (the job's key), not the command line's --timeout."""
    fs = loopfs("ext4")
    job = write_job(tmp_path, job_text(fs.path, tmp_path, create=["sleep", "2"], extra="""
[timeouts]
freeze = 0.5
"""))  # fmt: skip
    p = quiesce("run", str(job), "--json")
    assert p.returncode == ExitCode.EXPIRED, p.stderr
    hint = json.loads(p.stdout)["error"]["hint"]
    assert "timeouts.freeze" in hint and "--" not in hint, hint
    assert "timeouts.freeze" in p.stderr and "--timeout" not in p.stderr
    assert is_writable(fs.path)
