"""`quiesce systemd JOB.toml`: the service + timer pair, checked by systemd's own tools.

Only ever rendered into a temporary directory (``--unit-dir``), never installed.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.snaptools import image_on_reflink_host

from quiesce.integrations.systemd import UnitSpec, render


def _quiesce(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "quiesce", *args], capture_output=True, text=True, timeout=120
    )


def _values(text: str, key: str) -> list[str]:
    return [ln.split("=", 1)[1] for ln in text.splitlines() if ln.startswith(key + "=")]


def test_units_for_a_job_pass_systemd_analyze(loopfs, tmp_path: Path) -> None:
    pair = image_on_reflink_host(loopfs, "ext4")
    repo, metrics = tmp_path / "repo", tmp_path / "textfile"
    repo.mkdir()
    metrics.mkdir()
    job = tmp_path / "db-nightly.toml"
    job.write_text(
        f'volumes = ["{pair.inner.path}"]\nstate_dir = "{tmp_path / "state"}"\n'
        f'metrics_file = "{metrics / "q.prom"}"\n[provider]\ntype = "reflink"\n'
        f'[backup]\ntarget = "restic"\nrepository = "{repo}"\npassword_env = "PW"\n'
    )
    job.chmod(0o600)
    units = tmp_path / "units"
    p = _quiesce(
        "systemd", str(job), "--install", "--unit-dir", str(units),
        "--on-calendar", "Mon..Fri 02:30", "--environment-file", "/etc/quiesce/db.env",
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    service = units / "quiesce-db-nightly.service"
    timer = units / "quiesce-db-nightly.timer"
    assert oct(service.stat().st_mode & 0o777) == "0o644"
    v = subprocess.run(
        ["systemd-analyze", "verify", str(service), str(timer)], capture_output=True, text=True
    )
    assert v.returncode == 0 and v.stderr == "", v.stderr  # also no unknown or bad keys
    s = service.read_text()
    assert "CAP_SYS_ADMIN" in _values(s, "CapabilityBoundingSet")[0].split()
    for key, want in [
        ("ProtectSystem", "strict"), ("NoNewPrivileges", "yes"), ("PrivateTmp", "yes"),
        ("ProtectKernelModules", "yes"), ("RestrictSUIDSGID", "yes"), ("Type", "oneshot"),
    ]:  # fmt: skip
        assert _values(s, key) == [want], key
    rw = " ".join(_values(s, "ReadWritePaths")).split()
    for path in (pair.inner.path, str(tmp_path / "state"), str(repo), str(metrics)):
        assert path in rw or "-" + path in rw, path
    assert str(pair.outer.mountpoint) in rw  # the clones go next to the image
    assert _values(s, "ExecStart")[0].endswith(f"run {job}")
    # the job's own state directory: cleanup looks at its journals, not the default's
    assert _values(s, "ExecStartPre")[0].endswith(f" cleanup --state-dir {tmp_path / 'state'}")
    assert _values(s, "EnvironmentFile") == ["/etc/quiesce/db.env"]
    t = timer.read_text()
    assert _values(t, "OnCalendar") == ["Mon..Fri 02:30"]
    assert _values(t, "Unit") == ["quiesce-db-nightly.service"]
    sec = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(service)],
        capture_output=True, text=True,
    )  # fmt: skip
    level = float(re.search(r"Overall exposure level for \S+: ([\d.]+)", sec.stdout).group(1))
    assert level <= 5.0, sec.stdout  # a root service with CAP_SYS_ADMIN: "MEDIUM" at best

    printed = _quiesce("systemd", str(job))
    assert printed.returncode == 0
    assert printed.stdout.count("[Service]") == 1 and printed.stdout.count("[Timer]") == 1


def test_bad_calendar_and_paths_with_spaces(tmp_path: Path) -> None:
    job = tmp_path / "j.toml"
    job.write_text('volumes = ["/srv"]\n[provider]\ntype = "command"\ncreate = ["/bin/true"]\n')
    job.chmod(0o600)
    p = _quiesce("systemd", str(job), "--on-calendar", "every full moon")
    assert p.returncode == 2 and "not a systemd calendar expression" in p.stderr
    units = render(UnitSpec(job="j", job_file=tmp_path / "a b.toml", rw_paths=["/srv/my data"]))
    s = units["quiesce-j.service"]
    assert 'ReadWritePaths="/srv/my data"' in s
    assert f"run '{tmp_path / 'a b.toml'}'" in s
    with pytest.raises(Exception, match="bad job name"):
        render(UnitSpec(job="../etc", job_file=job))


def test_unit_keeps_the_guardians_records_and_sockets_reachable(tmp_path: Path) -> None:
    """ProtectKernelLogs=yes hides /dev/kmsg, so the guardian's emergency-thaw line must
    reach the journal through /dev/log: AF_UNIX allowed, /dev and /run/systemd not hidden.
    Its sockets live in /run/quiesce, which the unit makes root-only (0700)."""
    from quiesce.freezing.guardian import RUN_DIR
    from quiesce.freezing.guardian.daemon import SYSLOG_SOCKET

    s = render(UnitSpec(job="j", job_file=tmp_path / "j.toml"))["quiesce-j.service"]
    assert _values(s, "ProtectKernelLogs") == ["yes"]
    assert "AF_UNIX" in _values(s, "RestrictAddressFamilies")[0].split()
    assert _values(s, "PrivateDevices") == ["no"]
    hidden = " ".join(_values(s, "InaccessiblePaths") + _values(s, "TemporaryFileSystem"))
    assert "/dev" not in hidden and "/run" not in hidden
    assert SYSLOG_SOCKET == "/dev/log"
    assert _values(s, "RuntimeDirectory") == [Path(RUN_DIR).name]
    assert Path(RUN_DIR).parent == Path("/run")
    assert _values(s, "RuntimeDirectoryMode") == ["0700"]


def test_a_job_with_the_restore_drill_may_switch_users(tmp_path: Path) -> None:
    """verify = "app" starts each server as its data's owner (setpriv): its unit keeps
    CAP_SETUID/CAP_SETGID; other jobs' units do not get them."""
    plain = render(UnitSpec(job="j", job_file=tmp_path / "j.toml"))["quiesce-j.service"]
    drill = render(UnitSpec(job="j", job_file=tmp_path / "j.toml", drill=True))
    caps = _values(drill["quiesce-j.service"], "CapabilityBoundingSet")[0].split()
    assert {"CAP_SETUID", "CAP_SETGID"} <= set(caps)
    assert "CAP_SETUID" not in _values(plain, "CapabilityBoundingSet")[0]
