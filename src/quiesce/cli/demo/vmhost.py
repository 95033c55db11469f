"""A throwaway guest for ``quiesce demo --vm`` and the VM tier: boot, steer, check, remove.

The guest is virtme-ng's cheapest kind: Debian's kernel under qemu (KVM when /dev/kvm
runs guests, software emulation otherwise) with this host's root shared read-only over 9p
(so Debian's qemu-guest-agent and this quiesce are there), two raw data disks (ext4, each
a file on an XFS reflink loop filesystem made here, so the host can clone them), and a
virtio-serial port ``org.qemu.guest_agent.0`` whose host end is a unix socket. Inside it
runs cli/demo/vm_guest.py. Everything is removed in ``close()``: qemu killed by pid, the
filesystems unmounted, the loop device detached, the directory deleted.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from quiesce.errors import UsageError
from quiesce.host import kernel, proc
from quiesce.providers.options import QemuGuest, QemuOptions

QGA_BIN = os.environ.get("QUIESCE_QGA_BIN", "/usr/sbin/qemu-ga")  # Debian's qemu-guest-agent
VM_DIR = Path(os.environ.get("QUIESCE_VM_DIR", "/opt/quiesce-vm"))
SETUP = (
    "run `bash scripts/vm-setup.sh` as root (qemu, Debian's kernel, virtme-ng, qemu-guest-agent)"
)


def kernel_image() -> Path | None:
    found = sorted(
        glob.glob("/boot/vmlinuz-6.1.*"), key=lambda p: [int(x) for x in re.findall(r"\d+", p)]
    )
    return Path(found[-1]) if found else None


def vng_binary() -> Path | None:
    for cand in (VM_DIR / "venv/bin/vng", *(Path(p) / "vng" for p in os.get_exec_path())):
        if cand.is_file() and os.access(cand, os.X_OK):
            return cand
    return None


def missing() -> str | None:
    """Why a guest cannot be booted here (None: it can)."""
    if os.geteuid() != 0:
        return "the VM guest needs root"
    if vng_binary() is None:
        return f"virtme-ng (vng) is not installed; {SETUP}"
    for tool in ("qemu-system-x86_64", "mkfs.xfs", "mkfs.ext4", "losetup"):
        if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists():
            return f"{tool} is not installed; {SETUP}"
    if not Path(QGA_BIN).exists():
        return f"qemu-guest-agent is not installed; {SETUP}"
    if kernel_image() is None:
        return f"Debian's 6.1 kernel is not installed; {SETUP}"
    return None


def _kvm_works() -> bool:
    """Whether /dev/kvm can run a guest here (this machine's cannot: test-infra.md)."""
    return os.environ.get("QUIESCE_VM_KVM") == "1" and os.access("/dev/kvm", os.R_OK | os.W_OK)


def _run(*argv: str, check: bool = True, timeout: float = 120) -> str:
    done = proc.run_bounded(argv, timeout=timeout, merge_stderr=True)
    if check and (done.returncode != 0 or done.timed_out):
        raise RuntimeError(f"{' '.join(argv)}: exit {done.returncode}: {done.stdout.decode()}")
    return done.stdout.decode().strip()


@dataclass
class Guest:
    """One booted guest and everything made for it."""

    root: Path
    xfs: Path
    loop: str = ""
    rw: Path = Path()
    agent: Path = Path()
    disks: list[Path] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    output: list[str] = field(default_factory=list)
    boot_s: float = 0.0
    mounted: bool = False

    # -- the host's view of the guest ------------------------------------------------------

    def options(self, **kw: object) -> QemuOptions:
        guest = QemuGuest(name="vm1", agent=self.agent, images=self.disks)
        return QemuOptions.model_validate({"guests": [guest], "dest": self.xfs / "snaps", **kw})

    def acks(self) -> int:
        """How many records the guest's writer acknowledged so far."""
        try:
            data = (self.rw / "acks").read_bytes()
        except FileNotFoundError:
            return 0
        return data.count(b"\n")

    def wait_acks(self, more: int, timeout: float = 120) -> float:
        """Wait until ``more`` records beyond the current count are acknowledged; the
        time it took (the guest's disks are writable again)."""
        start, t0 = self.acks(), time.monotonic()
        while self.acks() < start + more:
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"the guest's writer made no progress in {timeout:g}s")
            time.sleep(0.05)
        return time.monotonic() - t0

    def kmsg(self) -> str:
        with contextlib.suppress(FileNotFoundError):
            return (self.rw / "kmsg.log").read_text(errors="replace")
        return ""

    def wait_for(self, predicate: object, timeout: float, what: str) -> None:
        t0 = time.monotonic()
        while not predicate():  # type: ignore[operator]
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"the guest died waiting for {what}:\n{self.tail()}")
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"no {what} after {timeout:g}s:\n{self.tail()}")
            time.sleep(0.05)

    def command(self, name: str, timeout: float = 60) -> None:
        """Run a guest-side command (stop-agent, cont-agent, quit) and wait for it."""
        done = self.rw / f"done-{name}"
        with contextlib.suppress(FileNotFoundError):
            done.unlink()
        (self.rw / f"cmd-{name}").write_text("")
        self.wait_for(done.exists, timeout, f"guest command {name}")

    def tail(self, n: int = 40) -> str:
        return "".join(self.output[-n:])

    # -- clones and their check -------------------------------------------------------------

    def clone(self, src: Path, dst: Path) -> None:
        s = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
        try:
            d = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                kernel.ficlone(d, s)
            finally:
                os.close(d)
        finally:
            os.close(s)

    def records(self, images: list[Path]) -> list[list[int]]:
        """The records in each image (mounted read-only on a loop device, journal replayed
        on a crash-consistent one: like a restore would)."""
        out = []
        for img in images:
            mnt = Path(tempfile.mkdtemp(prefix="check-", dir=self.root))
            try:
                _run("mount", "-t", "ext4", "-o", "loop", str(img), str(mnt))
                try:
                    text = (mnt / "records").read_text()
                finally:
                    _run("umount", "-d", str(mnt))
            finally:
                mnt.rmdir()
            out.append([int(x) for x in text.split()])
        return out

    # -- teardown ------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop qemu (by pid), unmount and detach what was made, delete the directory."""
        if self.proc is not None:
            proc.kill_group(self.proc)  # vng and its qemu: one process group
            self.proc.wait()
            t0 = time.monotonic()  # qemu holds the images until it is gone
            while _group_alive(self.proc.pid) and time.monotonic() - t0 < 30:
                time.sleep(0.05)
        if self.mounted:
            for _ in range(100):
                if proc.run_bounded(["umount", str(self.xfs)], timeout=60).returncode == 0:
                    break
                time.sleep(0.1)
        if self.loop:
            _run("losetup", "-d", self.loop, check=False)
        shutil.rmtree(self.root, ignore_errors=True)


def _group_alive(pgid: int) -> bool:
    """Whether any process of process group ``pgid`` is still there."""
    for stat in glob.glob("/proc/[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(stat, "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            if int(fields[2]) == pgid:
                return True
    return False


def check_cut(cut: list[list[int]], acked_before: int) -> tuple[bool, str]:
    """A cut of the two disks is one instant iff its records are a prefix 1..k, and it
    keeps every record acknowledged before the cut began."""
    have = sorted(set(cut[0]) | set(cut[1]))
    k = len(have)
    if have != list(range(1, k + 1)):
        gap = next(i for i in range(1, k + 2) if i not in set(have))
        return False, f"record {gap} is missing while {have[-1]} is there: not one instant"
    if k < acked_before:
        return False, f"only {k} records, {acked_before} were acknowledged before the cut"
    return True, f"records 1..{k}, every one of the {acked_before} acknowledged ones"


def boot(
    *, deadline: float = 10.0, lease: float = 2.0, memory: str = "1G", timeout: float = 240
) -> Guest:
    """Make the disks and boot the guest; returns once its agent and writer run."""
    why = missing()
    if why:
        raise UsageError(why, SETUP)
    root = Path(tempfile.mkdtemp(prefix="quiesce-vm-"))
    g = Guest(root=root, xfs=root / "xfs")
    try:
        img = root / "host-xfs.img"
        with open(img, "wb") as f:
            f.truncate(512 << 20)
        _run("mkfs.xfs", "-q", "-m", "reflink=1", str(img))
        g.loop = _run("losetup", "-f", "--show", str(img))
        g.xfs.mkdir()
        _run("mount", g.loop, str(g.xfs))
        g.mounted = True
        (g.xfs / "snaps").mkdir()
        for d in "ab":
            disk = g.xfs / f"disk-{d}.raw"
            with open(disk, "wb") as f:
                f.truncate(64 << 20)
            _run("mkfs.ext4", "-q", "-F", str(disk))
            g.disks.append(disk)
        g.rw = root / "rw"
        g.rw.mkdir(mode=0o700)
        g.agent = root / "qga.sock"
        _start(g, deadline, lease, memory)
        g.wait_for((g.rw / "ready").exists, timeout, "guest ready")
        g.boot_s = time.monotonic() - g.boot_s
        return g
    except BaseException:
        g.close()
        raise


def _start(g: Guest, deadline: float, lease: float, memory: str) -> None:
    import quiesce

    image, vng = kernel_image(), vng_binary()
    assert image is not None and vng is not None
    src = str(Path(quiesce.__file__).resolve().parents[1])
    qemu = [
        "-cpu", "qemu64" if not _kvm_works() else "host",
        "-chardev", f"socket,id=qga0,path={g.agent},server=on,wait=off",
        "-device", "virtio-serial-pci,id=vser0",
        "-device", "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0",
    ]  # fmt: skip
    for d, disk in zip("ab", g.disks, strict=True):
        qemu += ["-drive", f"file={disk},format=raw,if=none,id=d{d},cache=writeback"]
        qemu += ["-device", f"virtio-blk-pci,drive=d{d},serial=q{d}"]
    guest_cmd = (
        f"env PYTHONPATH={shlex.quote(src)} PYTHONDONTWRITEBYTECODE=1 "
        f"QUIESCE_QGA_BIN={shlex.quote(QGA_BIN)} "
        f"{shlex.quote(_guest_python())} -B -s -m quiesce.cli.demo.vm_guest "
        f"{shlex.quote(str(g.rw))} {deadline} {lease}"
    )
    argv = [
        str(vng), "--force-9p", *([] if _kvm_works() else ["--disable-kvm"]),
        "--memory", memory, "--rwdir", str(g.rw), f"--qemu-opts={shlex.join(qemu)}",
        "--cwd", "/", "--run", str(image), "--exec", guest_cmd,
    ]  # fmt: skip
    env = dict(os.environ)
    env["PATH"] = f"{vng.parent}:{env.get('PATH', '/usr/bin:/bin')}"
    g.boot_s = time.monotonic()
    g.proc = proc.spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)

    def pump() -> None:
        assert g.proc is not None and g.proc.stdout is not None
        for line in g.proc.stdout:
            g.output.append(line.decode(errors="replace"))

    threading.Thread(target=pump, daemon=True).start()


def _guest_python() -> str:
    """Debian's python3 starts in ~3 s under emulation; a pyenv one takes ~15 s over 9p."""
    system = "/usr/bin/python3"
    if os.path.exists(system):
        code = "import sys, pydantic; print(sys.version_info >= (3, 11))"
        if _run(system, "-c", code, check=False) == "True":
            return system
    return os.path.realpath(sys.executable)


__all__ = ["Guest", "boot", "check_cut", "missing"]
