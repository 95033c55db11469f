"""Inside the throwaway guest of ``quiesce demo --vm`` and the VM tier (never on a host).

Run as the guest's one program (virtme-ng ``--exec``) with the shared directory ``RW`` (a
writable 9p share of a host temp dir) as its argument. It mounts the two data disks
(virtio serials ``qa``/``qb``), writes the guest job, starts qemu-guest-agent with quiesce's
fsfreeze hook, and runs the hopping writer: record n is appended and fsync'd to
``a/records`` (n odd) or ``b/records`` (n even), and only then acknowledged in
``RW/acks``. A cut of the two disks at one instant holds a prefix 1..k of the records
with every acknowledged one; a cut that is not one instant can hold n+1 without n.

The host steers it with files: ``RW/cmd-NAME`` runs a command (``stop-agent``,
``cont-agent``, ``quit``) and answers ``RW/done-NAME``; ``RW/fail-quiescer`` makes the
guest's pre-freeze hook fail. The guest's kernel-log lines of quiesce go to
``RW/kmsg.log``, the agent's pid to ``RW/agent.pid``; ``RW/ready`` says all is running.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

from quiesce.host import proc

MNT = Path("/tmp/qd")
JOB = Path("/run/quiesce-guest.toml")
HOOK = Path("/run/quiesce-fsfreeze-hook")
HOOK_DIR = Path("/run/fsfreeze-hook.d")
QGA = os.environ.get("QUIESCE_QGA_BIN", "/usr/sbin/qemu-ga")


def sh(*argv: str, check: bool = True) -> None:
    done = proc.run_bounded(argv, timeout=120, merge_stderr=True)
    if check and done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)}: {done.stdout.decode()}")


def disk_by_serial(serial: str) -> str:
    for blk in Path("/sys/block").iterdir():
        s = blk / "serial"
        if s.exists() and s.read_text().strip() == serial:
            return f"/dev/{blk.name}"
    raise SystemExit(f"no virtio disk with serial {serial}")


def agent_port() -> str:
    for p in Path("/sys/class/virtio-ports").iterdir():
        if (p / "name").read_text().strip() == "org.qemu.guest_agent.0":
            return f"/dev/{p.name}"
    raise SystemExit("no org.qemu.guest_agent.0 port")


def write_job(rw: Path, deadline: float, lease: float) -> None:
    fail = rw / "fail-quiescer"
    check = f"test ! -e {fail} || {{ echo 'app refused to quiesce' >&2; exit 3; }}"
    JOB.write_text(
        "[guest]\n"
        f"deadline = {deadline}\nlease = {lease}\n"
        "[timeouts]\nhook = 20\n"
        "[hooks]\n"
        f'directory = "{HOOK_DIR}"\ndirectory_timeout = 20\n'
        "[[hooks.pre_freeze]]\n"
        'name = "app-flush"\n'
        f"command = {json_list(['/bin/sh', '-c', check])}\n"
    )
    JOB.chmod(0o600)
    HOOK_DIR.mkdir(mode=0o755, exist_ok=True)
    script = HOOK_DIR / "10-stock-script"
    script.write_text(f'#!/bin/sh\necho "$1" >> {rw}/hookdir.log\n')
    script.chmod(0o755)
    from quiesce.integrations.qga.install import hook_script

    HOOK.write_text(hook_script(JOB))
    HOOK.chmod(0o755)


def json_list(items: list[str]) -> str:
    import json

    return json.dumps(items)


def writer(rw: Path, stop: threading.Event) -> None:
    fds = [
        os.open(MNT / d / "records", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) for d in "ab"
    ]
    acks = os.open(rw / "acks", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    n = 0
    while not stop.is_set():
        n += 1
        fd = fds[0] if n % 2 else fds[1]
        os.write(fd, b"%d\n" % n)
        os.fsync(fd)
        os.write(acks, b"%d\n" % n)
        os.fsync(acks)  # through 9p to the host now: the host waits on these
        time.sleep(0.02)


def kmsg_tail(rw: Path) -> None:
    fd = os.open("/dev/kmsg", os.O_RDONLY)
    os.lseek(fd, 0, os.SEEK_END)
    with open(rw / "kmsg.log", "ab", buffering=0) as out:
        while True:
            try:
                line = os.read(fd, 8192)
            except OSError:
                continue
            if b"quiesce-qga" in line:
                text = line.split(b";", 1)[-1]
                out.write(b"%.3f " % time.time() + text)


def main() -> int:
    rw = Path(sys.argv[1])
    deadline = float(sys.argv[2]) if len(sys.argv) > 2 else 10.0
    lease = float(sys.argv[3]) if len(sys.argv) > 3 else 2.0
    for mod in ("virtio_blk", "virtio_console", "ext4"):
        sh("modprobe", mod, check=False)
    for d in "ab":
        (MNT / d).mkdir(parents=True, exist_ok=True)
        sh("mount", "-t", "ext4", disk_by_serial(f"q{d}"), str(MNT / d))
    write_job(rw, deadline, lease)
    Path("/run/qga-state").mkdir(mode=0o700, exist_ok=True)
    agent = proc.spawn(
        [QGA, "-m", "virtio-serial", "-p", agent_port(), "-t", "/run/qga-state",
         f"--fsfreeze-hook={HOOK}"],
        stdout=None, stderr=None,
    )  # fmt: skip
    (rw / "agent.pid").write_text(f"{agent.pid}\n")
    stop = threading.Event()
    threading.Thread(target=kmsg_tail, args=(rw,), daemon=True).start()
    w = threading.Thread(target=writer, args=(rw, stop), daemon=True)
    w.start()
    (rw / "ready").write_text("ready\n")
    while True:
        for cmd in sorted(rw.glob("cmd-*")):
            name = cmd.name.removeprefix("cmd-")
            cmd.unlink()
            if name == "stop-agent":
                os.kill(agent.pid, signal.SIGSTOP)
            elif name == "cont-agent":
                os.kill(agent.pid, signal.SIGCONT)
            elif name == "quit":
                stop.set()
                proc.kill_group(agent)
                (rw / "done-quit").write_text("")
                return 0
            (rw / f"done-{name}").write_text("")
        time.sleep(0.1)


if __name__ == "__main__":
    sys.exit(main())
