"""The trust boundary around mount_root, metrics_file, every --state-dir and children's
environments (issue 18, "Also"): each attack is played by uid 65534 (setpriv), the way
it was found, and root's answer is a refusal that changes nothing.

Real kernel: the snapshot mounted is an ext4 image on a read-only loop device; the
attacker's directory is a real directory owned by uid 65534 under /tmp.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from quiesce.backup.targets.base import RESTIC_INHERIT, run_child
from quiesce.host import proc
from quiesce.host.mounts import MountTable, loop_devices_of
from quiesce.host.trust import TrustError
from quiesce.job.metrics import RunMetrics, write_textfile
from quiesce.snapshot.readonly import mount_readonly, unmount
from quiesce.state.journal import Journal
from quiesce.util.redact import register_secret

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def as_nobody(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NOBODY, *cmd], capture_output=True, text=True, timeout=30, check=check)


def _mounted_below(base: Path) -> list[str]:
    return [m.mount_point for m in MountTable.read().mounts if m.mount_point.startswith(str(base))]


@pytest.fixture
def arena() -> Iterator[Path]:
    """/tmp/<random> (root, 0755) holding ``shared`` (uid 65534's own directory) and a
    ``victim`` directory of root's; whatever a failed (today's main) run mounted below it
    is unmounted and its loop devices detached in teardown."""
    base = Path(tempfile.mkdtemp(prefix="quiesce-trust-", dir="/tmp"))
    base.chmod(0o755)
    (base / "shared").mkdir()
    os.chown(base / "shared", 65534, 65534)
    (base / "victim").mkdir()
    (base / "victim" / "precious").write_text("root's\n")
    try:
        yield base
    finally:
        for target in reversed(_mounted_below(base)):
            subprocess.run(["umount", "-l", target], check=False)
        image = base / "snap.img"
        if image.exists():
            for dev in loop_devices_of(str(image)):
                subprocess.run(["losetup", "-d", dev], check=False)
        shutil.rmtree(base, ignore_errors=True)


def _snapshot_image(base: Path) -> Path:
    """An ext4 image holding ``data.txt`` (the snapshot a backup would mount)."""
    content = base / "content"
    content.mkdir()
    (content / "data.txt").write_text("snapshot data\n")
    image = base / "snap.img"
    with open(image, "wb") as f:
        f.truncate(32 << 20)
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-d", str(content), str(image)], check=True, capture_output=True
    )
    return image


def _journal_is_clean(state: Path) -> None:
    assert list((state / "journal").glob("*.jsonl")) == []


# -- mount_root -----------------------------------------------------------------------------


def test_mount_point_pre_created_by_another_user_is_refused(arena: Path, tmp_path: Path) -> None:
    """uid 65534 pre-created <mount_root>/<job>/<slug> (mode 0755, its own) and read the
    snapshot through it: now the mount root is refused before anything is made."""
    image = _snapshot_image(arena)
    root = arena / "shared" / "qbk"
    target = root / "nightly" / "vol"
    as_nobody("mkdir", "-p", str(target))
    state = tmp_path / "state"
    with (
        Journal.open(state, job="nightly") as j,
        pytest.raises(TrustError, match="owned by uid 65534"),
    ):
        mount_readonly(str(image), target, journal=j, root=root)
    assert _mounted_below(arena) == []
    assert loop_devices_of(str(image)) == []
    assert as_nobody("cat", str(target / "data.txt"), check=False).returncode != 0
    _journal_is_clean(state)


def test_link_at_the_mount_point_never_mounts_elsewhere(arena: Path, tmp_path: Path) -> None:
    """uid 65534 planted a link at the per-volume mount point: root mounted the snapshot
    over a directory of the attacker's choice. Now: refused, the victim untouched."""
    image = _snapshot_image(arena)
    root = arena / "shared" / "qbk"
    as_nobody("mkdir", "-p", str(root / "nightly"))
    as_nobody("ln", "-s", str(arena / "victim"), str(root / "nightly" / "vol"))
    state = tmp_path / "state"
    with Journal.open(state, job="nightly") as j, pytest.raises(TrustError):
        mount_readonly(str(image), root / "nightly" / "vol", journal=j, root=root)
    assert _mounted_below(arena) == []
    assert (arena / "victim" / "precious").read_text() == "root's\n"
    _journal_is_clean(state)


def test_a_link_in_a_trusted_mount_root_is_not_followed(arena: Path, tmp_path: Path) -> None:
    """Even in root's own mount root, a link at the mount point is refused, not followed:
    mount is handed the checked directory's fd, never a path."""
    image = _snapshot_image(arena)
    root = tmp_path / "run"
    (root / "nightly").mkdir(parents=True)
    (root / "nightly" / "vol").symlink_to(arena / "victim")
    with (
        Journal.open(tmp_path / "state", job="nightly") as j,
        pytest.raises(TrustError, match=r"symbolic link|not a directory root made"),
    ):
        mount_readonly(str(image), root / "nightly" / "vol", journal=j, root=root)
    assert _mounted_below(arena) == [] and _mounted_below(tmp_path) == []


def test_the_journal_names_the_mount_by_its_id(arena: Path, tmp_path: Path) -> None:
    """The journal keeps the resolved path and the mount's id: the undo removes that
    mount, and leaves a mount stacked on the same path by someone else."""
    image = _snapshot_image(arena)
    root = tmp_path / "run"
    state = tmp_path / "state"
    with Journal.open(state, job="nightly") as j:
        mv = mount_readonly(str(image), root / "nightly" / "vol", journal=j, root=root)
        [entry] = [e for e in j.entries.values() if e.kind == "mount"]
        [m] = [m for m in MountTable.read().mounts if m.mount_point == str(mv.path)]
        assert entry.fields["mnt_id"] == m.mount_id
        assert entry.fields["target"] == str(mv.path) == os.path.realpath(mv.path)
        assert (mv.path / "data.txt").read_text() == "snapshot data\n"
        # someone mounts a tmpfs on top: not ours, left alone; ours stays under it
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "t", str(mv.path)], check=True)
        try:
            with contextlib.suppress(Exception):
                unmount(mv, j)
            stacked = [m for m in MountTable.read().mounts if m.mount_point == str(mv.path)]
            assert [s.fstype for s in stacked][-1] == "tmpfs"
        finally:
            subprocess.run(["umount", str(mv.path)], check=True)
        unmount(mv, j)
    assert _mounted_below(tmp_path) == []
    assert loop_devices_of(str(image)) == []


# -- metrics_file ---------------------------------------------------------------------------


def _write_in_child(path: Path, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """write_textfile in a child with a bound: on today's main a planted FIFO hangs it."""
    code = (
        "import sys\n"
        "from quiesce.job.metrics import RunMetrics, write_textfile\n"
        "try:\n"
        "    write_textfile(sys.argv[1], RunMetrics('db', True))\n"
        "except OSError as e:\n"
        "    print(e.errno, e.strerror); sys.exit(3)\n"
    )
    p = subprocess.Popen(
        [sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        raise AssertionError(f"writing the metrics file hung on {path}") from None
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


@pytest.mark.parametrize("planted", ["lock", "textfile"])
def test_a_fifo_planted_in_the_metrics_directory_never_hangs_a_run(
    arena: Path, planted: str
) -> None:
    """A sticky world-writable directory (like /tmp) passes as a parent, but a FIFO
    uid 65534 made at the lock or textfile name is refused at once, not waited on."""
    pub = arena / "pub"
    pub.mkdir()
    pub.chmod(0o1777)
    prom = pub / "quiesce.prom"
    name = pub / f".{prom.name}.lock" if planted == "lock" else prom
    as_nobody("mkfifo", "-m", "0666", str(name))
    t0 = time.monotonic()
    p = _write_in_child(prom)
    assert p.returncode == 3, p.stderr
    assert p.stdout.startswith(f"{errno.EPERM} refusing") and "not a regular file" in p.stdout
    assert time.monotonic() - t0 < 15


def test_a_metrics_directory_another_user_can_swap_is_refused(arena: Path) -> None:
    """uid 65534 owns a directory above the textfile and points it at root's directory:
    root wrote there. Now: refused, nothing written."""
    as_nobody("ln", "-s", str(arena / "victim"), str(arena / "shared" / "tf"))
    with pytest.raises(OSError, match=r"owned by uid 65534|symbolic link") as e:
        write_textfile(arena / "shared" / "tf" / "quiesce.prom", RunMetrics("db", True))
    assert e.value.errno == errno.EPERM
    assert sorted(p.name for p in (arena / "victim").iterdir()) == ["precious"]


def test_metrics_in_a_fresh_directory_still_work(tmp_path: Path) -> None:
    """The control: root's own directories (made 0755 for node_exporter) pass."""
    f = tmp_path / "a" / "b" / "quiesce.prom"
    write_textfile(f, RunMetrics("db", True))
    assert "quiesce_last_run_success" in f.read_text()
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o755


# -- every --state-dir ----------------------------------------------------------------------


def _quiesce(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "QUIESCE_STATE_DIR"}
    return subprocess.run(
        [sys.executable, "-m", "quiesce", *args],
        capture_output=True, text=True, timeout=120, env=environ | (env or {}),
    )  # fmt: skip


def test_status_refuses_a_state_dir_another_user_wrote(arena: Path) -> None:
    """uid 65534 made DIR/locks/run-nightly.lock in its own directory and holds it:
    status believed "job nightly: run running". Now every command refuses DIR (exit 2),
    like cleanup always did."""
    state = arena / "shared" / "state"
    as_nobody("mkdir", "-p", str(state / "locks"))
    holder = subprocess.Popen(
        [*NOBODY, "flock", str(state / "locks" / "run-nightly.lock"), "sleep", "60"]
    )
    try:
        deadline = time.monotonic() + 10
        while str(holder.pid) not in Path("/proc/locks").read_text():
            assert time.monotonic() < deadline, "the attacker's flock never showed"
            time.sleep(0.02)
        for args, env in [
            (["status", "--state-dir", str(state)], None),
            (["status", "--json", "--state-dir", str(state)], None),
            (["status"], {"QUIESCE_STATE_DIR": str(state)}),
            (["cleanup", "--state-dir", str(state)], None),
            (["snapshot", "list", "--state-dir", str(state)], None),
        ]:
            p = _quiesce(*args, env=env)
            assert p.returncode == 2, (args, p.stdout, p.stderr)
            assert "owned by uid 65534" in p.stderr, (args, p.stderr)
            assert "nightly" not in p.stdout
            if "--json" in args:
                assert json.loads(p.stdout)["exit_code"] == 2
    finally:
        holder.kill()
        holder.wait()


# -- children's environment -----------------------------------------------------------------


def _env_of(done: bytes | str) -> dict[str, str]:
    text = done.decode() if isinstance(done, bytes) else done
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def test_children_get_a_minimal_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """mount, umount, blkid (run_tool) and restic/borg (run_child) inherited quiesce's
    whole environment, a writer's password variable included. Now: PATH, HOME, locale;
    a backup tool its own prefixes; never a secret quiesce read, whatever its name."""
    monkeypatch.setenv("PG_NIGHTLY_PW", "writer-password-1234")
    register_secret("writer-password-1234")
    monkeypatch.setenv("RESTIC_SMUGGLED", "writer-password-1234")  # a prefix the tool takes
    monkeypatch.setenv("SOME_APP_SETTING", "harmless-but-not-needed")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    tool = _env_of(proc.run_tool("env").stdout)
    assert "PG_NIGHTLY_PW" not in tool and "SOME_APP_SETTING" not in tool
    assert "AWS_ACCESS_KEY_ID" not in tool and "RESTIC_SMUGGLED" not in tool
    assert tool["PATH"] and tool["LC_ALL"] == "C.UTF-8"
    assert set(tool) <= {*proc.CHILD_ENV_NAMES, "LC_ALL"}
    restic = _env_of(
        run_child(["env"], env={"RESTIC_PASSWORD_FILE": "/etc/x"}, inherit=RESTIC_INHERIT).stdout
    )
    assert restic["RESTIC_PASSWORD_FILE"] == "/etc/x"
    assert restic["AWS_ACCESS_KEY_ID"] == "AKIAEXAMPLE"  # its backend's credentials
    assert "PG_NIGHTLY_PW" not in restic and "RESTIC_SMUGGLED" not in restic
    assert "SOME_APP_SETTING" not in restic
    assert "writer-password-1234" not in json.dumps(restic)


def test_a_child_started_as_nobody_cannot_see_the_password(monkeypatch: pytest.MonkeyPatch) -> None:
    """What uid 65534 sees of a child quiesce started (a child that drops privileges, or
    any reader of its /proc environ once it runs as that user): no secret in it."""
    monkeypatch.setenv("PG_NIGHTLY_PW", "writer-password-5678")
    register_secret("writer-password-5678")
    done = proc.run_tool(*NOBODY, "sh", "-c", "cat /proc/$$/environ | tr '\\0' '\\n'")
    assert done.returncode == 0, done.stderr
    assert "writer-password-5678" not in done.stdout and "PG_NIGHTLY_PW" not in done.stdout


def test_check_names_an_untrusted_mount_root_and_metrics_directory(
    arena: Path, loopfs, tmp_path: Path
) -> None:
    """`quiesce check` says it before a run would: both keys, with the culprit."""
    fs = loopfs("ext4")
    shared = arena / "shared"
    job = tmp_path / "nightly.toml"
    job.write_text(
        f'name = "nightly"\nvolumes = ["{fs.path}"]\nstate_dir = "{tmp_path / "state"}"\n'
        f'metrics_file = "{shared / "m" / "q.prom"}"\n'
        '[provider]\ntype = "command"\ncreate = ["true"]\n'
        f'[backup]\ntarget = "tar"\ndirectory = "{tmp_path / "tars"}"\nverify = "none"\n'
        f'mount_root = "{shared / "qbk"}"\n'
    )
    job.chmod(0o600)
    p = _quiesce("check", str(job), "--json")
    assert p.returncode == 2, p.stderr
    got = {x["path"]: x["message"] for x in json.loads(p.stdout)["problems"]}
    assert "owned by uid 65534" in got["backup.mount_root"]
    assert "owned by uid 65534" in got["metrics_file"]
