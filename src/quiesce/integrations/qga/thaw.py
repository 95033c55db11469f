"""The hook's ``thaw``: tell the watchdog the agent thawed (stdlib only, run under
``python -S``: the agent is waiting, and every second here adds to the measured window).

When the watchdog is gone (it thawed the guest itself) this prints its record. It always
exits 0 once the filesystems are thawed: a failing thaw hook makes the agent answer the
host's thaw with an error.
"""

import json
import os
import socket
import sys
import tomllib
from pathlib import Path

from quiesce.integrations.qga.paths import RECORD, RUN_DIR, SOCKET


def _kmsg(text: str) -> None:
    try:
        fd = os.open("/dev/kmsg", os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.write(fd, f"<5>quiesce-qga: {text}\n".encode())
    except OSError:
        pass
    finally:
        os.close(fd)


def run_dir_of(job_path: str | None) -> Path:
    """``[guest] run_dir`` of the guest job (the watchdog validated the file at freeze)."""
    if job_path:
        try:
            with open(job_path, "rb") as f:
                guest = tomllib.load(f).get("guest", {})
            if isinstance(guest, dict) and isinstance(guest.get("run_dir"), str):
                return Path(guest["run_dir"])
        except (OSError, tomllib.TOMLDecodeError):
            pass
    return RUN_DIR


def started() -> float:
    """When this process started, on CLOCK_BOOTTIME (/proc/self/stat: ticks since boot)."""
    try:
        with open("/proc/self/stat", "rb") as f:
            stat = f.read()
        ticks = int(stat[stat.rfind(b")") + 2 :].split()[19])
        return ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def thaw(job_path: str | None) -> int:
    start = started()
    run_dir = run_dir_of(job_path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(60)
    try:
        s.connect(str(run_dir / SOCKET))
    except OSError:
        s.close()
        try:
            rec = json.loads((run_dir / RECORD).read_bytes())
        except (OSError, ValueError):
            _kmsg("thaw hook: no watchdog was armed (did the freeze hook run?)")
            return 0
        if rec.get("event") == "watchdog":
            print(f"quiesce: the guest had already thawed itself: {rec.get('reason')}")
        return 0
    with s:
        s.sendall(f"thaw {start:.3f}\n".encode())
        try:
            print(s.makefile("rb").readline().decode().strip())
        except OSError as e:
            _kmsg(f"thaw hook: no answer from the watchdog: {e}")
    return 0


def main(argv: list[str]) -> int:
    job = argv[argv.index("--job") + 1] if "--job" in argv[:-1] else None
    return thaw(job)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
