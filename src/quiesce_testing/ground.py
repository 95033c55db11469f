"""The fleet ground: simulated hosts on this machine, reached by Ansible over real SSH.

Used by `quiesce demo --fleet` and by the tests.

Host i is Debian's sshd, started by the test with its own config, host key and
authorized_keys, listening on 127.0.0.(i+2) on a free port, and running in a mount
namespace of its own (``unshare -m --propagation private``). Inside that namespace only, a
tmpfs covers /srv and the host's loop-image filesystems (ext4 or XFS, made there) are
mounted at /srv/fleet/hostI/<name>: every host sees its own data and no other host's, and
the machine's own mount table never sees any of it. Nothing is mocked: Ansible runs
``python3 -m ansible`` against a generated inventory, with a key made for the run.

Why an fd on each namespace: a mount namespace that dies while one of its filesystems is
frozen leaves that superblock frozen and unreachable. The helper keeps
``/proc/<sshd>/ns/mnt`` open from start to end, so it can always enter the namespace
(``nsenter --mount=/proc/self/fd/N``) to thaw, whatever happened to sshd; it lets the
namespace go only after the thaw and the unmounts.

Teardown (:meth:`Fleet.close`, also on failure): thaw every fixture filesystem (EINVAL,
"not frozen", ignored), stop the writers, close Ansible's ssh masters, end every process
in the namespaces by pid, unmount inside them, drop the namespaces, detach the loops,
remove the temp dir, then check that nothing is left (loops, mounts, processes, dirs).

Every child goes through quiesce's runner (quiesce.host.proc: own process group, a
parent-death signal, bounded output): sshd gets SIGTERM when this process dies (the
signal survives unshare's exec), the other children SIGKILL. One opts out: the freeze
holder (below) must outlive this process to see EOF and thaw; killed, it could not.

If the test process is SIGKILLed, nothing runs in it, so the ground unwinds by itself:
a freeze is held by a process inside the namespace that thaws when its pipe from the test
closes (or at a deadline); sshd has a parent-death signal; the loops are autoclear once
mounted. The namespaces then die with nothing frozen, and only the temp dir remains.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import quiesce
from quiesce.host import pids, proc

SSHD = "/usr/sbin/sshd"
PRIVSEP_DIR = Path("/run/sshd")  # compiled into Debian's sshd; made only if missing
MIN_SIZE_MB = {"ext4": 64, "xfs": 320}
MKFS = {"ext4": ["mkfs.ext4", "-q", "-F"], "xfs": ["mkfs.xfs", "-q", "-f"]}
PYTHON = os.path.realpath(sys.executable)  # not a pyenv shim: it is spawned per ioctl
SRC = Path(quiesce.__file__).resolve().parents[1]  # what holds the quiesce package

# Runs inside a host's namespace: a plain FITHAW (teardown). It refuses a path whose
# filesystem is not the fixture's loop device (a missing mount must never lead to an ioctl
# on /), and with "thaw-quiet" it ignores EINVAL (not frozen). Exit 3 = refused, 4 = failed.
_IOCTL = r"""
import errno, fcntl, os, sys
op = sys.argv[1]
cmd = {"thaw": 0xC0045878, "thaw-quiet": 0xC0045878}[op]
rc = 0
for arg in sys.argv[2:]:
    path, dev = arg.rsplit("=", 1)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    st = os.fstat(fd)
    if "%d:%d" % (os.major(st.st_dev), os.minor(st.st_dev)) != dev:
        print("refused: %s is not on %s" % (path, dev), file=sys.stderr)
        os.close(fd)
        rc = rc or 3
        continue
    try:
        fcntl.ioctl(fd, cmd, 0)
    except OSError as e:
        if not (op == "thaw-quiet" and e.errno == errno.EINVAL):
            print("%s %s: %s" % (op, path, errno.errorcode.get(e.errno, e.errno)), file=sys.stderr)
            rc = rc or 4
    os.close(fd)
sys.exit(rc)
"""


# Runs inside a host's namespace and holds a freeze: the test ground's own dead man's
# switch. It freezes (same device check as above), says "frozen", then thaws on "thaw", on
# EOF (the test process died: its pipe closed) or at the deadline, whichever comes first,
# and says "thawed <why>". So a killed test never leaves a fixture filesystem frozen.
_HOLDER = r"""
import errno, fcntl, os, select, sys
deadline = float(sys.argv[1])
fds = []
def thaw_all():
    bad = []
    for fd in reversed(fds):
        try:
            fcntl.ioctl(fd, 0xC0045878, 0)
        except OSError as e:
            if e.errno != errno.EINVAL:
                bad.append(errno.errorcode.get(e.errno, str(e.errno)))
    return bad
for arg in sys.argv[2:]:
    path, dev = arg.rsplit("=", 1)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    st = os.fstat(fd)
    if "%d:%d" % (os.major(st.st_dev), os.minor(st.st_dev)) != dev:
        thaw_all()
        print("refused: %s is not on %s" % (path, dev), flush=True)
        sys.exit(3)
    try:
        fcntl.ioctl(fd, 0xC0045877, 0)
    except OSError as e:
        thaw_all()
        print("freeze %s: %s" % (path, errno.errorcode.get(e.errno, e.errno)), flush=True)
        sys.exit(4)
    fds.append(fd)
print("frozen", flush=True)
ready, _, _ = select.select([sys.stdin], [], [], deadline)
why = "deadline" if not ready else ("thaw" if sys.stdin.readline() == "thaw\n" else "eof")
bad = thaw_all()
print("thawed %s %s" % (why, " ".join(bad)), flush=True)
sys.exit(4 if bad else 0)
"""


def _same_file(a: str, b: str) -> bool:
    """By inode, not by path: in a chroot a namespaced process's exe shows the host's path."""
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def run(
    *cmd: str,
    check: bool = True,
    timeout: float = 60,
    pass_fds: Sequence[int] = (),
    env: dict[str, str] | None = None,
    cwd: str | Path = "/",
) -> subprocess.CompletedProcess[str]:
    """A command of the ground, to completion, through quiesce's runner (own process group,
    killed with this process). As ``subprocess.run(text=True, capture_output=True)`` would:
    CalledProcessError if ``check`` and it failed, TimeoutExpired after ``timeout``."""
    done = proc.run_bounded(
        cmd, timeout=timeout, limit=proc.TOOL_OUTPUT_LIMIT, pass_fds=pass_fds, env=env, cwd=cwd
    )
    out, err = _text(done.stdout), _text(done.stderr)
    if done.timed_out:
        raise subprocess.TimeoutExpired(list(cmd), timeout, out, err)
    if check and done.returncode != 0:
        raise CommandFailed(done.returncode, list(cmd), out, err)
    return subprocess.CompletedProcess(list(cmd), done.returncode, out, err)


class CommandFailed(subprocess.CalledProcessError):
    """A ground command that failed, its stderr's last lines in the message (what a test
    report shows: a fresh-root failure must be diagnosable from its log alone)."""

    def __str__(self) -> str:
        tail = "\n".join(str(self.stderr or self.output or "").strip().splitlines()[-5:])
        return f"{super().__str__()}{': ' + tail if tail else ''}"


def _text(data: bytes) -> str:
    return data.decode(errors="replace")


def free_port(address: str) -> int:
    """A port free on ``address`` now (sshd binds it a moment later; a lost race is retried)."""
    with socket.socket() as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def mnt_ns_of(pid: int | str) -> str | None:
    with contextlib.suppress(OSError):
        return os.readlink(f"/proc/{pid}/ns/mnt")
    return None


def pids_in_ns(ns: str) -> list[int]:
    """Every process whose mount namespace is ``ns`` (only the fixture starts any there)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and mnt_ns_of(entry) == ns:
            found.append(int(entry))
    return found


def end_pids(pids: Sequence[int], grace: float = 3.0) -> list[int]:
    """SIGTERM, then SIGKILL after ``grace``; returns the pids still alive after that."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    living = list(pids)
    while living and time.monotonic() < deadline:
        living = [p for p in living if alive(p)]
        time.sleep(0.02)
    for pid in living:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    time.sleep(0.05)
    return [p for p in living if alive(p)]


alive = pids.pid_alive  # gone or a zombie: not alive


@dataclass
class HostFS:
    """One loop-image filesystem of a host, mounted inside that host's namespace only."""

    name: str
    fstype: str
    image: Path
    device: str
    dev: str  # "major:minor" of the loop device = st_dev of files on it
    mountpoint: str  # path inside the host's namespace


@dataclass
class Host:
    """One simulated host: an sshd in its own mount namespace, with its own filesystems."""

    index: int
    address: str
    port: int
    dir: Path
    sshd: subprocess.Popen[bytes]
    ns_fd: int  # /proc/<sshd>/ns/mnt, held open until the namespace is cleaned
    ns: str  # "mnt:[inode]"
    root_fd: int  # /proc/<sshd>/root: the root directory inside that namespace
    volumes: list[HostFS] = field(default_factory=list)
    holder: subprocess.Popen[str] | None = None  # the freeze holder while frozen

    @property
    def name(self) -> str:
        return f"host{self.index}"

    @property
    def pid(self) -> int:
        return self.sshd.pid

    @property
    def root(self) -> str:
        """The host's /srv/fleet/hostI: its volumes are mounted below it."""
        return f"/srv/fleet/{self.name}"

    @property
    def data(self) -> HostFS:
        return self.volumes[0]

    def nsenter(self, *cmd: str) -> list[str]:
        """argv that runs ``cmd`` in this host's mount namespace (through the held fd), with
        sshd's root directory there, also as the working directory: entering a mount
        namespace resets the root to the namespace's own, which under a chroot (a fresh-root
        check, a container) is not ours, and nsenter's default keeps our working directory,
        which in there is unreachable (initdb: "could not identify current directory")."""
        return [
            "nsenter", f"--mount=/proc/self/fd/{self.ns_fd}",
            f"--root=/proc/self/fd/{self.root_fd}", f"--wd=/proc/self/fd/{self.root_fd}",
            "--", *cmd,
        ]  # fmt: skip

    @property
    def fds(self) -> tuple[int, int]:
        return (self.ns_fd, self.root_fd)

    def run(
        self, *cmd: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return run(*self.nsenter(*cmd), check=check, timeout=timeout, pass_fds=self.fds)

    def popen(
        self,
        *cmd: str,
        stdin: Any = subprocess.DEVNULL,
        stdout: Any = None,
        stderr: Any = None,
        pdeathsig: int | None = signal.SIGKILL,
    ) -> subprocess.Popen[str]:
        """A long-running child inside the namespace (e.g. a writer's agent), str pipes;
        it dies with this process unless ``pdeathsig`` is None."""
        return proc.spawn(
            self.nsenter(*cmd), stdin=stdin, stdout=stdout, stderr=stderr, text=True,
            pass_fds=self.fds, pdeathsig=pdeathsig,
        )  # fmt: skip

    def ioctl(
        self, op: str, volumes: Sequence[HostFS] | None = None
    ) -> subprocess.CompletedProcess[str]:
        args = [f"{v.mountpoint}={v.dev}" for v in (volumes or self.volumes)]
        return self.run(PYTHON, "-I", "-S", "-c", _IOCTL, op, *args, check=False, timeout=30)

    def read(self, path: str) -> bytes:
        """A file's bytes as this host sees them (works while its filesystem is frozen)."""
        p = proc.run_bounded(
            self.nsenter("cat", path), timeout=30, limit=proc.TOOL_OUTPUT_LIMIT,
            pass_fds=self.fds,
        )  # fmt: skip
        if p.returncode != 0 or p.timed_out:
            raise RuntimeError(f"{self.name}: cat {path}: {_text(p.stderr)}")
        return p.stdout


def freeze_host(
    host: Host, volumes: Sequence[HostFS] | None = None, *, deadline: float = 30.0
) -> None:
    """FIFREEZE the host's fixture filesystems, inside its namespace (never anything else).

    A holder process keeps the freeze and thaws by itself at ``deadline`` (s) or when this
    process dies; :func:`thaw_host` tells it to thaw. It has no parent-death signal (the
    one place the ground opts out): killed, it could not thaw; it must live to see EOF.
    """
    if host.holder is not None:
        raise RuntimeError(f"{host.name}: already frozen by this test")
    args = [f"{v.mountpoint}={v.dev}" for v in (volumes or host.volumes)]
    p = host.popen(
        PYTHON, "-I", "-S", "-c", _HOLDER, str(deadline), *args,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, pdeathsig=None,
    )  # fmt: skip
    assert p.stdout is not None
    line = p.stdout.readline()
    if line != "frozen\n":
        p.wait(timeout=10)
        raise RuntimeError(f"{host.name}: freeze failed: {line.strip()}")
    host.holder = p


def thaw_host(host: Host, *, quiet: bool = False) -> None:
    """Thaw what :func:`freeze_host` froze; raise if its holder had already thawed.

    ``quiet`` (teardown) also FITHAWs every fixture filesystem of the host directly,
    ignoring EINVAL (not frozen), and raises only on a real failure.
    """
    p, host.holder = host.holder, None
    problem = ""
    if p is not None:
        assert p.stdin is not None and p.stdout is not None
        try:
            p.stdin.write("thaw\n")
            p.stdin.close()
        except BrokenPipeError:
            pass
        line = p.stdout.readline().strip()
        p.wait(timeout=30)
        p.stdout.close()
        if line != "thawed thaw" or p.returncode != 0:
            problem = f"holder: {line or 'no answer'} (rc={p.returncode})"
    if quiet:
        q = host.ioctl("thaw-quiet")
        if q.returncode != 0:
            problem += f" thaw: {q.stderr.strip()}"
    elif p is None:
        raise RuntimeError(f"{host.name}: not frozen by this test")
    if problem and not (quiet and problem.startswith("holder: thawed ")):
        raise RuntimeError(f"{host.name}: {problem.strip()}")


class Fleet:
    """N hosts, an SSH key, an inventory and an ansible.cfg; :meth:`close` removes it all."""

    def __init__(
        self, n: int = 3, fstypes: Sequence[str] = ("ext4", "xfs"), size_mb: int | None = None
    ) -> None:
        self.n = n
        self.fstypes = tuple(fstypes)
        self.size_mb = size_mb  # each host's data filesystem (None: the fstype's minimum)
        self.hosts: list[Host] = []
        self.writers: list[Any] = []  # fleet_writer.HoppingWriter, stopped before unmounting
        self.base = Path(tempfile.mkdtemp(prefix="qfleet-", dir="/tmp"))
        self.made_privsep = False
        self.loop_devices: list[tuple[str, Path]] = []  # (device, image)
        self.namespaces: list[str] = []
        self.started_pids: list[int] = []
        self.timings: dict[str, float] = {}
        self.closed = False
        self.teardown_errors: list[str] = []  # what close() could not do

    # -- building ---------------------------------------------------------------------

    def start(self) -> Fleet:
        """Build every host; on any failure tear down what was made, then re-raise."""
        t0 = time.monotonic()
        try:
            os.chmod(self.base, 0o700)
            self._make_keys()
            for i in range(self.n):
                host = self._start_host(i)
                self.hosts.append(host)  # from here on, close() cleans it
                self._mount_host(host)
            self._write_ansible_files()
        except BaseException:
            self.close(check=False)
            raise
        self.timings["up_s"] = time.monotonic() - t0
        return self

    def __enter__(self) -> Fleet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close(check=exc[0] is None)

    def _make_keys(self) -> None:
        (self.base / "ansible").mkdir(mode=0o700)
        self.key = self.base / "ansible" / "id_ed25519"
        run(
            "ssh-keygen",
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            "quiesce-fleet",
            "-f",
            str(self.key),
        )
        if not PRIVSEP_DIR.exists():
            PRIVSEP_DIR.mkdir(mode=0o755)
            self.made_privsep = True

    def _start_host(self, i: int) -> Host:
        address = f"127.0.0.{i + 2}"
        hdir = self.base / f"host{i}"
        hdir.mkdir(mode=0o700)
        hostkey = hdir / "ssh_host_ed25519_key"
        run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(hostkey))
        shutil.copyfile(self.key.with_suffix(".pub"), hdir / "authorized_keys")
        os.chmod(hdir / "authorized_keys", 0o600)
        for _attempt in range(5):
            port = free_port(address)
            config = hdir / "sshd_config"
            config.write_text(
                f"Port {port}\nListenAddress {address}\nHostKey {hostkey}\n"
                f"PidFile none\nAuthorizedKeysFile {hdir}/authorized_keys\n"
                "PermitRootLogin prohibit-password\nPubkeyAuthentication yes\n"
                "PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                "UsePAM no\n"
                # StrictModes walks every parent of authorized_keys up to /, and /tmp is
                # 1777: the key sits in a 0700 root-owned dir made for the run instead.
                "StrictModes no\n"
                "Subsystem sftp internal-sftp\nLogLevel INFO\n"
                # "quiesce installed on this host": its sessions import the worktree's src.
                f"SetEnv PYTHONPATH={SRC}\n"
            )
            # If the test process dies, sshd gets SIGTERM (and the namespace goes): the
            # parent-death signal survives unshare's exec of sshd.
            with open(hdir / "sshd.log", "ab") as log:
                sshd = proc.spawn(
                    ["unshare", "-m", "--propagation", "private", "--",
                     SSHD, "-D", "-e", "-f", str(config)],
                    stdout=log, stderr=log, pdeathsig=signal.SIGTERM,
                )  # fmt: skip
            self.started_pids.append(sshd.pid)
            if self._wait_listening(sshd, address, port):
                break
            end_pids([sshd.pid])
            sshd.wait(timeout=5)
        else:
            raise RuntimeError(f"sshd for host{i} did not start: {(hdir / 'sshd.log').read_text()}")
        ns = mnt_ns_of(sshd.pid)
        ns_fd = os.open(f"/proc/{sshd.pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        root_fd = os.open(f"/proc/{sshd.pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        if ns is None or ns == mnt_ns_of("self") or os.readlink(f"/proc/self/fd/{ns_fd}") != ns:
            os.close(ns_fd)
            os.close(root_fd)
            end_pids([sshd.pid])
            raise RuntimeError(f"host{i}: sshd is not in a namespace of its own")
        self.namespaces.append(ns)
        return Host(i, address, port, hdir, sshd, ns_fd, ns, root_fd)

    def _mount_host(self, host: Host) -> None:
        i = host.index
        self._drop_foreign_mounts(host)
        # A tmpfs over /srv (inside the namespace only) holds the mount points, so nothing
        # is created on the machine's own root filesystem.
        host.run("mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", f"qfleet-{i}", "/srv")
        fstype = self.fstypes[i % len(self.fstypes)]
        host.volumes.append(self._make_fs(host, "data", fstype, self.size_mb))

    def _drop_foreign_mounts(self, host: Host) -> None:
        """Lazily unmount, in this namespace only, the loop and /tmp mounts it was born with.

        unshare copies the machine's whole mount table, including the loop filesystems of
        tests running at that moment; holding them would keep their loop devices attached
        (a deferred detach) until this namespace dies. Private propagation keeps the
        unmount from reaching the machine's table. What the fleet itself needs (the
        interpreter, the worktree, its temp dir) is never dropped.
        """
        from quiesce.host.mounts import parse_mountinfo

        needed = [PYTHON, str(SRC), str(self.base), "/proc", "/dev", "/sys"]
        drop = []
        for m in parse_mountinfo(host.run("cat", "/proc/self/mountinfo").stdout):
            point = m.mount_point
            if not (m.source.startswith("/dev/loop") or point.startswith("/tmp/")):
                continue
            if any(n == point or n.startswith(point.rstrip("/") + "/") for n in needed):
                continue
            drop.append(point)
        drop.sort(key=lambda p: p.count("/"), reverse=True)
        if drop:
            host.run("umount", "-l", *drop, check=False)

    def _wait_listening(self, sshd: subprocess.Popen[bytes], address: str, port: int) -> bool:
        """Wait until sshd (after unshare's exec) accepts connections; False if it exited."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if sshd.poll() is not None:
                return False
            with socket.socket() as s, contextlib.suppress(OSError):
                s.settimeout(0.5)
                s.connect((address, port))
                if _same_file(f"/proc/{sshd.pid}/exe", SSHD):  # sshd itself, not unshare
                    return True
            time.sleep(0.02)
        return False

    def _make_fs(self, host: Host, name: str, fstype: str, size_mb: int | None = None) -> HostFS:
        image = host.dir / f"{name}-{fstype}.img"
        with open(image, "wb") as f:
            f.truncate(max(size_mb or 0, MIN_SIZE_MB[fstype]) * 1024 * 1024)
        device = _losetup(image)
        self.loop_devices.append((device, image))
        rdev = os.stat(device).st_rdev
        mountpoint = f"{host.root}/{name}"
        host.run(*MKFS[fstype], device)
        host.run("mkdir", "-p", mountpoint)
        host.run("mount", device, mountpoint)
        # Detach now: busy, the kernel only marks it autoclear, so the loop goes away by
        # itself once the filesystem is unmounted, even if the namespace just dies.
        run("losetup", "-d", device)
        if loop_backing(device) != str(image):
            raise RuntimeError(f"{device} detached although {mountpoint} is mounted")
        fs = HostFS(name, fstype, image, device, f"{os.major(rdev)}:{os.minor(rdev)}", mountpoint)
        return fs

    def _write_ansible_files(self) -> None:
        adir = self.base / "ansible"
        for sub in ("cp", "tmp", "home", "tree", "remote-tmp"):
            (adir / sub).mkdir(mode=0o700)
        lines = ["[fleet]"]
        for h in self.hosts:
            lines.append(
                f"{h.name} ansible_host={h.address} ansible_port={h.port} "
                f"quiesce_data={h.data.mountpoint} quiesce_fstype={h.data.fstype} "
                f"quiesce_volumes='[\"{h.data.mountpoint}\"]'"
            )
        lines += [
            "",
            "[fleet:vars]",
            "ansible_user=root",
            f"ansible_ssh_private_key_file={self.key}",
            "ansible_ssh_common_args='-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null'",
            f"ansible_python_interpreter={PYTHON}",
            f"quiesce_pythonpath={SRC}",
            "",
        ]
        self.inventory = adir / "inventory.ini"
        self.inventory.write_text("\n".join(lines))
        self.ansible_cfg = adir / "ansible.cfg"
        self.ansible_cfg.write_text(
            "[defaults]\n"
            f"inventory = {self.inventory}\n"
            "host_key_checking = False\n"
            f"forks = {max(5, self.n)}\n"
            "gathering = explicit\n"
            "retry_files_enabled = False\n"
            "interpreter_python_fallback = []\n"
            f"local_tmp = {adir / 'tmp'}\n"
            f"remote_tmp = {adir / 'remote-tmp'}\n"
            "\n[ssh_connection]\n"
            "pipelining = True\n"
            f"control_path_dir = {adir / 'cp'}\n"
            "ssh_args = -o ControlMaster=auto -o ControlPersist=60s\n"
        )

    # -- Ansible ----------------------------------------------------------------------

    def ansible_env(self, **extra: str) -> dict[str, str]:
        """The controller's environment: this run's config, home and temp dirs only."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
        env.update(
            ANSIBLE_CONFIG=str(self.ansible_cfg),
            ANSIBLE_HOME=str(self.base / "ansible" / "home"),
            ANSIBLE_NOCOLOR="1",
            ANSIBLE_FORCE_COLOR="0",
            ANSIBLE_DEPRECATION_WARNINGS="False",
        )
        env.update(extra)
        return env

    def ansible_cli(
        self, tool: str, *args: str, timeout: float = 120, **env: str
    ) -> subprocess.CompletedProcess[str]:
        """Run ``python3 -m ansible TOOL ARGS`` (adhoc, playbook, galaxy, ...) for this fleet."""
        return run(
            PYTHON, "-m", "ansible", tool, *args,
            check=False, timeout=timeout, env=self.ansible_env(**env), cwd=self.base,
        )  # fmt: skip

    def ansible(
        self, module: str, args: str = "", pattern: str = "fleet", **env: str
    ) -> dict[str, dict[str, Any]]:
        """An ad-hoc task on every host; each host's result (from the tree callback)."""
        tree = Path(tempfile.mkdtemp(dir=self.base / "ansible" / "tree"))
        argv = [pattern, "-m", module, "--tree", str(tree)]
        if args:
            argv += ["-a", args]
        p = self.ansible_cli("adhoc", *argv, timeout=120, **env)
        results = {f.name: json.loads(f.read_text()) for f in tree.iterdir()}
        if p.returncode != 0:
            raise AnsibleFailed(p, results)
        return results

    def playbook(
        self, playbook: str | Path, *args: str, **env: str
    ) -> tuple[subprocess.CompletedProcess[str], dict[str, dict[str, Any]]]:
        """Run a playbook; also each host's last task result (tree callback)."""
        tree = Path(tempfile.mkdtemp(dir=self.base / "ansible" / "tree"))
        p = self.ansible_cli(
            "playbook",
            str(playbook),
            *args,
            timeout=120,
            ANSIBLE_CALLBACKS_ENABLED="ansible.builtin.tree",
            ANSIBLE_CALLBACK_TREE_DIR=str(tree),
            **env,
        )
        return p, {f.name: json.loads(f.read_text()) for f in tree.iterdir()}

    # -- writers ----------------------------------------------------------------------

    def start_writer(self, name: str = "records.log", **kw: Any) -> Any:
        """A hopping writer over every host's data filesystem (stopped by :meth:`close`)."""
        from quiesce_testing.ground_writer import HoppingWriter

        w = HoppingWriter(self.hosts, name, **kw)
        self.writers.append(w)
        return w

    # -- teardown ---------------------------------------------------------------------

    def close(self, check: bool = True) -> None:
        """Remove everything the fleet made, whatever state it is in; then verify that.

        Each step runs even if an earlier one failed; the errors are raised at the end
        (when ``check``), together with anything found left behind.
        """
        if self.closed:
            return
        self.closed = True
        t0 = time.monotonic()
        errors = self.teardown_errors

        def step(what: str, fn: Any, *a: Any, **kw: Any) -> None:
            try:
                fn(*a, **kw)
            except Exception as e:  # teardown goes on; reported below
                errors.append(f"{what}: {e}")

        for h in self.hosts:  # 1. thaw first: nothing below may wait on a frozen fs
            step(f"{h.name} thaw", thaw_host, h, quiet=True)
        for w in self.writers:  # 2. the writers' agents hold files open on the volumes
            step("writer stop", w.stop)
        step("ssh masters", self._close_ssh_masters)
        for h in self.hosts:  # 3. every process in the namespace, by pid
            step(f"{h.name} processes", self._end_host_processes, h)
        for h in self.hosts:  # 4. unmount inside, then let the namespace go
            step(f"{h.name} unmount", self._unmount_host, h)
            for fd in h.fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
        for dev, image in reversed(self.loop_devices):  # 5. loops (autocleared by now)
            step(f"losetup -d {dev}", _detach, dev, image)
        step("remove temp dir", shutil.rmtree, self.base)
        if self.made_privsep:
            with contextlib.suppress(OSError):
                PRIVSEP_DIR.rmdir()
        self.timings["down_s"] = time.monotonic() - t0
        left = self.leftovers()
        if check and (errors or left):
            raise RuntimeError(f"fleet teardown: errors={errors} left={left}")

    def _close_ssh_masters(self) -> None:
        """Ansible's ControlPersist masters (their sockets are in this run's cp dir)."""
        cp = self.base / "ansible" / "cp"
        if not cp.is_dir():
            return
        for sock in cp.iterdir():
            run("ssh", "-o", f"ControlPath={sock}", "-O", "exit", "fleet", check=False, timeout=10)
        time.sleep(0.05)
        stragglers = [p for p in _pids_with_cmdline(str(cp))]
        end_pids(stragglers)

    def _end_host_processes(self, h: Host) -> None:
        end_pids([h.pid])
        with contextlib.suppress(subprocess.TimeoutExpired):
            h.sshd.wait(timeout=5)
        # Sessions that outlived the listener (all descendants of the sshd we started).
        left = end_pids(pids_in_ns(h.ns))
        if left:
            raise RuntimeError(f"processes would not end: {left}")

    def _unmount_host(self, h: Host) -> None:
        for v in reversed(h.volumes):
            for _ in range(50):
                if h.run("umount", v.mountpoint, check=False).returncode == 0:
                    break
                time.sleep(0.1)
            else:
                h.run("umount", "-l", v.mountpoint, check=False)
                raise RuntimeError(f"{v.mountpoint} busy: unmounted lazily")
        h.run("umount", "/srv", check=False)

    def leftovers(self) -> list[str]:
        """What this fleet made that still exists (an empty list after a clean close)."""
        left: list[str] = []
        attached = run("losetup", "-a", check=False).stdout
        left += [f"loop: {ln}" for ln in attached.splitlines() if str(self.base) in ln]
        for ns in self.namespaces:
            left += [f"process {pid} in {ns}" for pid in pids_in_ns(ns)]
        left += [f"process {pid}" for pid in self.started_pids if alive(pid)]
        mountinfo = Path("/proc/self/mountinfo").read_text()
        left += [
            f"mount: {ln}"
            for ln in mountinfo.splitlines()
            if "/srv/fleet" in ln or str(self.base) in ln
        ]
        if self.base.exists():
            left.append(f"dir: {self.base}")
        return left


class AnsibleFailed(RuntimeError):
    """An Ansible run that exited non-zero, with its output and per-host results."""

    def __init__(self, proc: subprocess.CompletedProcess[str], results: dict[str, dict[str, Any]]):
        super().__init__(f"ansible rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        self.proc = proc
        self.results = results


def _pids_with_cmdline(needle: str) -> Iterator[int]:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            if needle in Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace"):
                yield int(entry)


def _losetup(image: Path) -> str:
    """Attach ``image``; retried because parallel tests can race for the same free loop."""
    p = None
    for attempt in range(20):
        p = run("losetup", "-f", "--show", "--direct-io=on", str(image), check=False)
        if p.returncode == 0:
            return p.stdout.strip()
        time.sleep(0.05 * (attempt + 1))
    raise RuntimeError(f"losetup failed: {p.stderr if p else ''}")


def loop_backing(device: str) -> str | None:
    """The image behind a loop device now, or None if it is detached."""
    try:
        text = Path(f"/sys/block/{Path(device).name}/loop/backing_file").read_text().strip()
    except OSError:
        return None
    return text.removesuffix(" (deleted)") or None


def _detach(device: str, image: Path) -> None:
    """Detach ``device`` only if it is still ours: once autocleared, its number is anyone's."""
    if loop_backing(device) != str(image):
        return
    p = run("losetup", "-d", device, check=False)
    if p.returncode != 0 and loop_backing(device) == str(image):
        raise RuntimeError(p.stderr.strip())


def snapshot_overlapping(hosts: Sequence[Host], name: str) -> tuple[list[bytes], float]:
    """Freeze every host, copy every file, then thaw all: one instant for the whole fleet.

    Returns the copies and the window (first freeze to last thaw, s).
    """
    frozen: list[Host] = []
    t0 = time.monotonic()
    try:
        for h in hosts:
            freeze_host(h)
            frozen.append(h)
        copies = [h.read(f"{h.data.mountpoint}/{name}") for h in hosts]
    finally:
        for h in reversed(frozen):
            thaw_host(h)
    return copies, time.monotonic() - t0


def snapshot_one_by_one(hosts: Sequence[Host], name: str) -> tuple[list[bytes], float]:
    """The negative control: each host frozen, copied and thawed before the next one."""
    copies = []
    t0 = time.monotonic()
    for h in hosts:
        freeze_host(h)
        try:
            copies.append(h.read(f"{h.data.mountpoint}/{name}"))
        finally:
            thaw_host(h)
    return copies, time.monotonic() - t0
