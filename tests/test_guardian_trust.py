"""The guardian's trust boundary: what it believes, who can reach it, what it survives.

Attacks run as uid 65534 (``setpriv``) with the system Python, which needs nothing from
root's home. Every test holds a freeze of its own loop filesystem only; every process it
starts is ended by pid, and the Rig (test_guardian.py) thaws and kills what is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import is_frozen, is_writable
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_guardian import Rig, cli, is_gone, kmsg_lines, status, wait_for, wait_gone

from quiesce.errors import ExitCode
from quiesce.freezing import guardian
from quiesce.freezing.freezer import FAULT_ENV
from quiesce.freezing.guardian.protocol import open_run_dir

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3"]


@pytest.fixture
def rig(loopfs: Any, writer_factory: Any, tmp_path: Path) -> Iterator[Rig]:
    r = Rig(loopfs, writer_factory, tmp_path)
    try:
        yield r
    finally:
        r.cleanup()


def hold(rig: Rig, path: str, timeout: float = 30, env: dict[str, str] | None = None) -> int:
    """`quiesce freeze` of ``path``; returns the guardian's pid (tracked for teardown)."""
    r = cli("freeze", "--json", "--timeout", str(timeout), path, env=env)
    assert r.returncode == 0, r.stderr
    return rig.track(json.loads(r.stdout)["guardian_pid"])


def raw_exchange(gpid: int, payload: bytes, timeout: float = 5.0) -> bytes | None:
    """Send ``payload`` as one message to guardian ``gpid`` (as root); its reply or None."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(timeout)
    try:
        s.connect(guardian.socket_path(gpid))
        s.send(payload)
        return s.recv(1 << 20) or None
    finally:
        s.close()


def dev_of(gpid: int) -> str:
    return status(gpid)["volumes"][0]["dev"]


# -- 1. no message can kill the guardian ---------------------------------------------------

MALFORMED = {
    "list": b"[]",
    "string": b'"x"',
    "number": b"1",
    "null": b"null",
    "thaw devs=1": b'{"op": "thaw", "devs": 1}',
    "thaw devs=[[]]": b'{"op": "thaw", "devs": [[]]}',
    "thaw devs=[1]": b'{"op": "thaw", "devs": [1]}',
    "thaw without devs": b'{"op": "thaw"}',
    "op is a list": b'{"op": ["status"]}',
    "no op": b"{}",
    "id is an object": b'{"op": "status", "id": {"a": 1}}',
    "NaN id": b'{"op": "status", "id": NaN}',
    "controller op": b'{"op": "freeze", "vol": 0}',
    "unknown field": b'{"op": "status", "x": 1}',
    "bad utf-8": b"\xff\xfe\x00{",
    "deep nesting": b"[" * 40000 + b"]" * 40000,
    "huge number": b'{"op": "status", "id": ' + b"9" * 5000 + b"}",
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_request_is_answered_and_changes_nothing(rig: Rig, case: str) -> None:
    vol = rig.volumes(1)[0]
    gpid = hold(rig, vol.path)
    reply = raw_exchange(gpid, MALFORMED[case][:65536])
    assert reply is not None, "no answer"
    answer = json.loads(reply)
    assert answer["ok"] is False and answer["error"].startswith("bad request: "), answer
    st_ = status(gpid)
    assert [v["state"] for v in st_["volumes"]] == ["frozen"] and st_["expired"] is None
    assert not is_writable(vol.path, timeout=0.3)
    r = cli("thaw", vol.path)
    assert r.returncode == 0 and f"guardian {gpid}" in r.stdout, r.stderr
    assert is_writable(vol.path)


def test_controller_channel_refuses_malformed_requests(loopfs: Any) -> None:
    """The controller's own socket is checked too: a bad request is an error reply, and
    the guardian still freezes and thaws afterwards."""
    from quiesce.freezing.plan import make_plan

    vol = loopfs("ext4")
    with make_plan([vol.path]) as plan:
        m = plan.members[0]
        spec = guardian.GuardedVolume(
            fd=m.fd, name=m.name, fstype=m.volume.fstype, dev=m.volume.dev
        )
        h = guardian.GuardianHandle.start([spec], timeout=30, lease=0)
        try:
            for bad in (b"[]", b'"x"', b'{"op": "freeze", "vol": "0"}', b'{"op": "thaw", "vol": 7}',
                        b'{"op": "freeze", "vol": true}', b'{"op": "nope"}'):  # fmt: skip
                h.sock.send(bad)
                reply = json.loads(h.sock.recv(65536))
                assert reply["ok"] is False and reply.get("error"), (bad, reply)
            assert h.freeze(0)["ok"]
            assert not is_writable(vol.path, timeout=0.3)
            assert h.thaw(0)["ok"]
            assert is_writable(vol.path)
        finally:
            h.close()
        assert wait_gone(h.pid)


def test_an_exception_inside_the_guardian_thaws_what_it_froze(
    rig: Rig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last line of defence: whatever breaks inside the guardian (here an injected
    RuntimeError while it answers a request) ends in the emergency thaw, recorded. Its own
    socket directory: any `quiesce status` elsewhere on the machine would trip the fault."""
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    monkeypatch.setenv(guardian.RUN_DIR_ENV, str(run))
    vol = rig.volumes(1)[0]
    env = {**os.environ, FAULT_ENV: "guardian:raise"}
    gpid = hold(rig, vol.path, timeout=60, env=env)
    assert not is_writable(vol.path, timeout=0.3)
    with contextlib.suppress(OSError):
        raw_exchange(gpid, b'{"op": "status"}', timeout=2)
    assert is_writable(vol.path, timeout=5.0), "the guardian died and left it frozen"
    assert wait_gone(gpid)
    lines = kmsg_lines(gpid)
    assert any(ln.startswith("internal error: _InjectedFault") for ln in lines), lines
    assert any(ln.startswith(f"thawed {vol.path} (guardian-error") for ln in lines), lines
    assert not os.path.exists(guardian.socket_path(gpid)), "socket file left behind"
    rig.check_writers(min_stall=0.1)


# The property: whatever arrives, the guardian stays up, answers, and thaws on time.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4)
    ),
    max_leaves=12,
)
requests = st.fixed_dictionaries(
    {"op": st.sampled_from(["status", "thaw", "forget", "freeze", "renew", "done", "x"])},
    optional={"id": json_values, "devs": json_values, "vol": json_values},
)
payloads = (
    st.binary(min_size=1, max_size=512)
    | json_values.map(lambda v: json.dumps(v).encode())
    | requests.map(lambda v: json.dumps(v).encode())
)


@pytest.mark.timeout(180)
def test_random_bytes_and_json_never_break_the_guardian(rig: Rig) -> None:
    """The requests stop 6 s before the deadline, counted from before the freeze (its
    deadline starts there): on a busy machine the CLI's return and hypothesis' start take
    seconds, and 20 s left no time for any request (seen under load: 0 sent)."""
    vol = rig.volumes(1)[0]
    deadline_s = 40.0
    started = time.monotonic()
    gpid = hold(rig, vol.path, timeout=deadline_s)
    real_dev = dev_of(gpid)
    sent = []

    @settings(
        max_examples=300,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(payload=payloads)
    def prop(payload: bytes) -> None:
        if real_dev.encode() in payload or time.monotonic() - started > deadline_s - 6:
            return  # a real thaw request is not garbage; keep time to see the deadline
        sent.append(payload)
        reply = raw_exchange(gpid, payload, timeout=2.0)
        assert reply is not None, f"no answer to {payload!r}"
        answer = json.loads(reply)
        assert isinstance(answer, dict)
        st_ = status(gpid)
        assert [v["state"] for v in st_["volumes"]] == ["frozen"], (payload, st_)

    prop()
    assert len(sent) > 50, "too few requests got through to mean anything"
    assert not is_gone(gpid) and not is_writable(vol.path, timeout=0.2)
    left = deadline_s - (time.monotonic() - started)
    assert is_writable(vol.path, timeout=left + 5.0), "not thawed at its deadline"
    wait_for(lambda: status(gpid)["expired"] is not None, "the deadline expiry", 5)
    assert status(gpid)["expired"]["reason"] == "deadline"
    rig.check_writers(min_stall=0.5)


# -- 2, 3. nobody else can pose as a guardian or block one ----------------------------------

SQUATTER = r"""
import json, os, select, socket, sys
start, count, dev = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
socks = []
for pid in range(start, start + count):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        s.bind("\0quiesce-guardian-%d" % pid)
        s.listen(64)
        socks.append(s)
    except OSError:
        s.close()
tried = []
for attempt in (
    lambda: socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET).bind(
        "/run/quiesce/guardian-%d.sock" % start),
    lambda: os.mkdir("/run/quiesce/x"),
    lambda: os.listdir("/run/quiesce"),
):
    try:
        attempt()
        tried.append("done")
    except OSError as e:
        tried.append(type(e).__name__)
print(json.dumps({"squatted": len(socks), "tried": tried}), flush=True)
fake = {"id": 1, "ok": True, "pid": start, "controller_pid": 1, "controller_alive": True,
        "detached": True, "finished": False, "deadline_remaining_s": 1.0, "timeout_s": 1.0,
        "lease_remaining_s": None, "expired": None,
        "volumes": [{"mount_point": "/", "dev": dev, "fstype": "ext4", "state": "frozen",
                     "frozen_for_s": 1.0}]}
conns = []
while True:
    ready, _, _ = select.select(socks + conns, [], [])
    for r in ready:
        if r in socks:
            c, _ = r.accept()
            conns.append(c)
        else:
            try:
                if r.recv(65536):
                    r.send(json.dumps(fake).encode())
                    continue
            except OSError:
                pass
            conns.remove(r)
            r.close()
"""


def _next_pid() -> int:
    return int(Path("/proc/sys/kernel/ns_last_pid").read_text()) + 1


@pytest.mark.timeout(120)
def test_another_user_can_neither_impersonate_nor_block_a_guardian(rig: Rig) -> None:
    """uid 65534 squats the old abstract names of the next 400 pids, answering
    {"ok": true} and claiming our volume frozen. Root's freeze, status and thaw must not
    care: freeze works, status is quick and true, thaw really thaws."""
    vol = rig.volumes(1)[0]
    dev = os.stat(vol.path).st_dev
    devstr = f"{os.major(dev)}:{os.minor(dev)}"
    os.close(open_run_dir(create=True))  # as after any freeze since boot
    start = _next_pid() + 50
    attacker = subprocess.Popen(
        [*NOBODY, "-c", SQUATTER, str(start), "400", devstr],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    rig.procs.append(attacker)  # type: ignore[arg-type]
    try:
        report = json.loads(attacker.stdout.readline())  # type: ignore[union-attr]
        assert report["squatted"] >= 300, report
        # It cannot put anything where clients look, nor even look there.
        assert report["tried"] == ["PermissionError", "PermissionError", "PermissionError"], report
        t0 = time.monotonic()
        gpid = hold(rig, vol.path)
        assert not is_writable(vol.path, timeout=0.3)
        t1 = time.monotonic()
        st_ = json.loads(cli("status", "--json").stdout)
        assert time.monotonic() - t1 < 5.0
        assert [g["pid"] for g in st_["guardians"] if g["pid"] == gpid] == [gpid]
        assert all(g["pid"] != start for g in st_["guardians"]), "believed the fake"
        r = cli("thaw", vol.path)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip().endswith(f"(guardian {gpid})"), r.stdout
        assert is_writable(vol.path)
        assert time.monotonic() - t0 < 20.0
        # With nothing of quiesce's holding it, a plain fsfreeze: FITHAW, not the fake.
        vol.freeze_externally()
        r = cli("thaw", vol.path)
        assert r.returncode == 0 and "FITHAW (no guardian held it)" in r.stdout, r.stdout
        assert is_writable(vol.path)
    finally:
        attacker.kill()
        attacker.wait(timeout=10)
    rig.check_writers()


FAKE_SERVER = r"""
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.bind(sys.argv[1])
s.listen(8)
print("ready", flush=True)
fake = json.loads(sys.argv[2])
while True:
    c, _ = s.accept()
    if c.recv(65536):
        c.send(json.dumps(fake).encode())
    c.close()
"""


def test_a_socket_not_served_by_the_pid_it_names_is_not_believed(rig: Rig) -> None:
    """Second wall behind the directory: SO_PEERCRED must be root *and* the named pid.
    A root process serving another pid's name ({"ok": true}, "frozen") is passed over
    and `quiesce thaw` does its own FITHAW, saying why."""
    vol = rig.volumes(1)[0]
    dev = os.stat(vol.path).st_dev
    devstr = f"{os.major(dev)}:{os.minor(dev)}"
    sleeper = subprocess.Popen(["sleep", "300"])
    os.close(open_run_dir(create=True))  # as after any freeze since boot
    path = guardian.socket_path(sleeper.pid)
    fake = {"id": 1, "ok": True, "pid": sleeper.pid, "controller_pid": 1,
            "controller_alive": True, "detached": True, "finished": False,
            "deadline_remaining_s": 1.0, "timeout_s": 1.0, "lease_remaining_s": None,
            "expired": None, "volumes": [{"mount_point": vol.path, "dev": devstr,
            "fstype": "ext4", "state": "frozen", "frozen_for_s": 1.0}]}  # fmt: skip
    server = subprocess.Popen(
        [sys.executable, "-c", FAKE_SERVER, path, json.dumps(fake)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout.readline().strip() == "ready"  # type: ignore[union-attr]
        vol.freeze_externally()
        r = cli("thaw", vol.path)
        assert r.returncode == 0, r.stderr
        line = r.stdout.strip()
        assert "FITHAW (no guardian held it; not answering: " in line, line
        assert f"served by pid {server.pid} uid 0, not by root's guardian {sleeper.pid}" in line
        assert is_writable(vol.path)
    finally:
        for p in (server, sleeper):
            p.kill()
            p.wait(timeout=10)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    rig.check_writers()


@pytest.mark.timeout(90)
def test_a_guardian_that_does_not_answer_costs_a_second_and_thaw_still_works(
    rig: Rig,
) -> None:
    """A stopped guardian: status says so within ~1 s; thaw falls back to its own FITHAW
    and says why. The guardian is killed by the Rig afterwards (it still thinks it holds)."""
    a, b = rig.volumes(2)
    ga = hold(rig, a.path)
    gb = hold(rig, b.path)
    os.kill(ga, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        r = cli("status", "--json")
        took = time.monotonic() - t0
        assert r.returncode == 0, r.stderr
        data = json.loads(r.stdout)
        assert {"pid": ga, "why": "no answer within 1s"} in data["not_answering"], data
        assert gb in [g["pid"] for g in data["guardians"]]
        t0 = time.monotonic()
        r = cli("thaw", a.path)
        took_thaw = time.monotonic() - t0
        assert r.returncode == 0, r.stderr
        # a stopped guardian: no answer, or (its backlog filled by status) no connection
        assert re.search(
            rf"FITHAW \(no guardian held it; not answering: guardian {ga} "
            r"\((no answer|its socket is not accepting connections)",
            r.stdout,
        ), r.stdout
        assert is_writable(a.path)
        assert not is_writable(b.path, timeout=0.3), "the other guardian's freeze was touched"
        r = cli("thaw", b.path)
        assert r.returncode == 0 and f"guardian {gb}" in r.stdout, r.stderr
    finally:
        os.kill(ga, signal.SIGKILL)
    # The CLI's own words show its wait was bounded ("no answer within 1s"); the clock
    # only bounds it generously: a Python start-up takes seconds on a busy machine.
    assert took < 30.0 and took_thaw < 30.0, (took, took_thaw)
    rig.check_writers()


# -- the socket directory is created safely and refused when unsafe -------------------------


def _run_dir_cases(tmp: Path) -> dict[str, Path]:
    """Each a QUIESCE_RUN_DIR another user could control, or that is not private."""
    made = {}
    tmp.mkdir()
    nobody_dir = tmp / "nobody-owned"
    nobody_dir.mkdir(mode=0o700)
    os.chown(nobody_dir, 65534, 65534)
    made["owned by another user"] = nobody_dir
    open_dir = tmp / "mode-0755"
    open_dir.mkdir()
    open_dir.chmod(0o755)
    made["readable by others"] = open_dir
    real = tmp / "real"
    real.mkdir(mode=0o700)
    link = tmp / "link"
    link.symlink_to(real)
    made["a symlink"] = link
    shared = tmp / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # no sticky bit: anyone may rename what is inside
    (shared / "run").mkdir(mode=0o700)
    made["under a world-writable parent"] = shared / "run"
    return made


@pytest.mark.parametrize(
    "case",
    ["owned by another user", "readable by others", "a symlink", "under a world-writable parent"],
)
def test_unsafe_socket_directory_is_refused(rig: Rig, tmp_path: Path, case: str) -> None:
    vol = rig.volumes(1)[0]
    bad = _run_dir_cases(tmp_path / "runs")[case]
    before = sorted(os.listdir(bad)) if bad.is_dir() else None
    r = cli(
        "freeze", "--timeout", "30", vol.path, env={**os.environ, guardian.RUN_DIR_ENV: str(bad)}
    )
    assert r.returncode == ExitCode.GUARDIAN, (r.returncode, r.stderr)
    first, hint = r.stderr.splitlines()
    assert first.startswith(f"quiesce: refusing the guardian socket directory {bad}: "), first
    assert hint.startswith("hint: "), hint
    assert is_writable(vol.path), "something was frozen"
    if before is not None:
        assert sorted(os.listdir(bad)) == before, "the refused directory was changed"


def test_socket_directory_is_made_root_only_and_stale_sockets_are_swept(
    rig: Rig, tmp_path: Path
) -> None:
    vol = rig.volumes(1)[0]
    (tmp_path / "private").mkdir(mode=0o700)
    fresh = tmp_path / "private" / "fresh"
    env = {**os.environ, guardian.RUN_DIR_ENV: str(fresh)}
    assert cli("status", env=env).stdout.strip() == "nothing is frozen by quiesce"
    assert not fresh.exists(), "looking created the directory"
    gpid = hold(rig, vol.path, env=env)
    st_ = os.lstat(fresh)
    assert stat.S_ISDIR(st_.st_mode) and st_.st_uid == 0 and stat.S_IMODE(st_.st_mode) == 0o700
    assert cli("thaw", vol.path, env=env).returncode == 0
    assert wait_gone(gpid)
    end = time.monotonic() + 30  # its second line removes its record as it leaves
    while os.listdir(fresh) and time.monotonic() < end:
        time.sleep(0.02)
    assert os.listdir(fresh) == []

    run = tmp_path / "private" / "quiesce"
    env = {**os.environ, guardian.RUN_DIR_ENV: str(run)}
    # A stale socket file of a dead pid (a SIGKILLed guardian) and one of a live process
    # that does not listen: neither may slow or confuse anything. The directory exists
    # already (made by root, 0700), as after a reboot-less crash.
    run.mkdir(mode=0o700)
    dead = subprocess.Popen(["true"])
    dead.wait()
    for pid in (dead.pid, os.getpid()):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.bind(str(run / f"guardian-{pid}.sock"))
        s.close()
    gpid = hold(rig, vol.path, env=env)
    assert sorted(n for n in os.listdir(run) if n.startswith("guardian-")) == [
        f"guardian-{gpid}.sock"
    ], "stale sockets not swept"
    st_ = os.lstat(run)
    assert stat.S_ISDIR(st_.st_mode) and st_.st_uid == 0 and stat.S_IMODE(st_.st_mode) == 0o700
    assert (run / f"guardian-{gpid}.sock").exists()
    t0 = time.monotonic()
    r = cli("status", "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - t0 < 30.0  # a generous bound (a CLI start-up under load)
    data = json.loads(r.stdout)
    assert [g["pid"] for g in data["guardians"]] == [gpid]
    assert data["not_answering"] == [], "status waited on a socket nobody answers"
    r = cli("thaw", vol.path, env=env)
    assert r.returncode == 0 and f"guardian {gpid}" in r.stdout, r.stderr
    assert is_writable(vol.path)
    assert wait_gone(gpid)
    assert not (run / f"guardian-{gpid}.sock").exists(), "a finished guardian left its socket"
    rig.check_writers()


# -- 5. a finished guardian is history, never the holder of a newer freeze ------------------


def test_an_expired_guardian_never_answers_for_a_newer_freeze(rig: Rig) -> None:
    vol = rig.volumes(1)[0]
    g_old = hold(rig, vol.path, timeout=0.5)
    wait_for(lambda: status(g_old)["expired"] is not None, "the first deadline")
    human = cli("status", env=os.environ | {"COLUMNS": "400"})
    assert human.returncode == 0, human.stderr
    lines = [ln for ln in human.stdout.splitlines() if vol.path in ln]
    assert len(lines) == 1 and lines[0].startswith(f"history: {vol.path} thawed by deadline at "), (
        human.stdout
    )
    assert lines[0].endswith(f"s ago (guardian {g_old})") and "-" not in lines[0].split(" at ")[1]
    data = json.loads(cli("status", "--json").stdout)
    assert g_old not in [g["pid"] for g in data["guardians"]]
    assert g_old in [g["pid"] for g in data["history"]]
    assert cli("thaw", vol.path).returncode == ExitCode.EXPIRED  # the story is still true

    g_new = hold(rig, vol.path)
    r = cli("thaw", vol.path)
    assert r.returncode == 0 and f"guardian {g_new}" in r.stdout, r.stderr
    again = cli("thaw", vol.path)
    assert again.returncode == ExitCode.NOT_FROZEN, again.stderr  # not the old story
    assert wait_gone(g_old), "the superseded guardian lingers"
    assert is_writable(vol.path)
    rig.check_writers()


# -- 10. the emergency record reaches syslog where /dev/kmsg is hidden --------------------


@pytest.mark.timeout(60)
def test_emergency_thaw_record_reaches_syslog_with_kmsg_hidden(rig: Rig, tmp_path: Path) -> None:
    """The generated unit has ProtectKernelLogs=yes: /dev/kmsg is out of reach there. The
    same here in a private mount namespace (/dev/null over /dev/kmsg); the guardian's
    line must still arrive on the syslog socket (a test socket standing in for /dev/log)."""
    vol = rig.volumes(1)[0]
    log_path = tmp_path / "log.sock"
    log = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    log.bind(str(log_path))
    log.settimeout(15)
    env = {**os.environ, "QUIESCE_TEST_SYSLOG": str(log_path)}
    script = (
        'mount --bind /dev/null /dev/kmsg && exec "$0" -m quiesce freeze --json --timeout 0.5 "$1"'
    )
    try:
        r = subprocess.run(
            ["unshare", "-m", "--propagation", "slave", "sh", "-c", script, sys.executable,
             vol.path],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        gpid = rig.track(json.loads(r.stdout)["guardian_pid"])
        data = log.recv(4096).decode()
    finally:
        log.close()
    head = f"<28>quiesce-guardian[{gpid}]: thawed {vol.path} (deadline) after "
    assert data.startswith(head) and data.endswith("s frozen"), data
    assert is_writable(vol.path)
    assert kmsg_lines(gpid) == [], "the kernel log was reachable: the test proves nothing"
    rig.check_writers(min_stall=0.2)


# -- 11. status as non-root; durations ------------------------------------------------------


def test_status_as_non_root_says_it_cannot_tell(rig: Rig) -> None:
    """Forked from this (already imported) interpreter, then uid 65534: the status must
    not claim that nothing is frozen while a volume is."""
    import io

    from typer.testing import CliRunner

    import quiesce.state.journal
    import quiesce.state.locks  # noqa: F401  (imported before the fork: root's files)
    from quiesce.cli import app as cli_app

    # Load what the CLI loads lazily while root can still read the interpreter's files.
    assert CliRunner().invoke(cli_app.app, ["status", "--help"]).exit_code == 0
    assert CliRunner().invoke(cli_app.app, ["status", "--bogus"]).exit_code == 2
    vol = rig.volumes(1)[0]
    hold(rig, vol.path)
    r_fd, w_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            os.close(r_fd)
            os.dup2(w_fd, 1)
            os.dup2(w_fd, 2)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            sys.stdout = sys.stderr = io.TextIOWrapper(os.fdopen(w_fd, "wb", closefd=False))
            try:
                cli_app.main(["status"])
                code = 0
            except SystemExit as e:
                code = int(e.code or 0)
            except BaseException as e:
                print(f"child: {type(e).__name__}: {e}")
            sys.stdout.flush()
        finally:
            os._exit(code)
    os.close(w_fd)
    with os.fdopen(r_fd) as f:
        text = f.read()
    _, wstatus = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(wstatus) == ExitCode.PERMISSION, text
    assert "nothing is frozen" not in text
    assert "cannot tell what quiesce has frozen" in text, text
    cli("thaw", vol.path)


@pytest.mark.parametrize("flag", ["--timeout", "--lease"])
@pytest.mark.parametrize("value", ["inf", "1e300", "nan", "86401"])
def test_absurd_durations_are_refused_naming_the_flag(rig: Rig, flag: str, value: str) -> None:
    vol = rig.volumes(1)[0]
    for cmd in (["freeze"], ["exec"]):
        tail = ["--", "true"] if cmd == ["exec"] else []
        r = cli(*cmd, flag, value, vol.path, *tail)
        assert r.returncode == ExitCode.USAGE, (cmd, r.returncode, r.stderr)
        first, hint = r.stderr.splitlines()
        assert first.startswith(f"quiesce: {flag} must be a number of seconds from "), first
        assert hint.startswith("hint: ")
        assert is_writable(vol.path)


def test_a_thaw_asked_while_the_ownership_probe_is_in_flight_waits_for_it(
    rig: Rig, tmp_path: Path
) -> None:
    """`quiesce thaw` that arrives while the guardian's FIFREEZE probe of the volume is in
    flight (or while the trace judges someone else's FITHAW: load run 2 met it beside a
    concurrent quiesce user, and the thaw failed with a made-up EIO) is answered
    "checking", thaws nothing, and succeeds once the probe has returned. The probe is held
    in flight by a fault (it waits for a file), so the order is by construction."""
    vol = rig.volumes(1)[0]
    gate = tmp_path / "release-probe"
    env = {**os.environ, FAULT_ENV: f"guardian:probe-parks={gate}"}
    gpid = hold(rig, vol.path, env=env)
    wait_for(lambda: Path(f"{gate}.parked").exists(), "the probe in flight")
    # asked directly: one answer, no retry
    dev = status(gpid)["volumes"][0]["dev"]
    reply = guardian.ask(gpid, {"op": "thaw", "devs": [dev]})
    assert reply["ok"] is False and reply.get("checking") is True, reply
    assert is_frozen(vol.path), "a thaw answered 'checking' thawed"
    # `quiesce thaw` asks again until the probe returns (released from here meanwhile)
    thaw = subprocess.Popen(
        [sys.executable, "-m", "quiesce", "thaw", vol.path],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        gate.touch()
        out, err = thaw.communicate(timeout=60)
    finally:
        if thaw.poll() is None:
            thaw.kill()
    assert thaw.returncode == 0, err
    assert not is_frozen(vol.path)
    assert f"guardian {gpid}" in out + err
