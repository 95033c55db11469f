"""Helpers for the job, hook and writer tests: job files, locks, snapshot mounts."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

HELPERS = Path(__file__).parent
SESSION_HOOK = HELPERS / "session_hook.py"
PY = os.path.realpath(sys.executable)


def write_job(directory: Path, text: str, name: str = "job.toml", mode: int = 0o644) -> Path:
    path = directory / name
    path.write_text(text)
    path.chmod(mode)
    return path


def toml_list(items: list[str]) -> str:
    """A TOML array of strings (JSON's string escapes are TOML's)."""
    return json.dumps([str(i) for i in items])


def session_argv(lock: Path, log: Path, mode: str = "ok") -> list[str]:
    return [PY, str(SESSION_HOOK), str(lock), str(log), mode]


def lock_is_free(lock: Path, timeout: float = 10.0) -> bool:
    """True once an exclusive flock on ``lock`` can be taken (polls up to ``timeout``)."""
    deadline = time.monotonic() + timeout
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
                return True
            except BlockingIOError:
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.05)
    finally:
        os.close(fd)


def events(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def process_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def pid_alive(pid: int) -> bool:
    return process_state(pid) not in ("gone", "Z")


@contextlib.contextmanager
def mounted_image(image: str | Path, target: Path, options: str = "") -> Iterator[Path]:
    """Loop-mount a snapshot image (read-write unless options say ro); always undone."""
    target.mkdir(parents=True, exist_ok=True)
    dev = subprocess.run(["losetup", "-f", "--show", str(image)], check=True,
                         capture_output=True, text=True).stdout.strip()  # fmt: skip
    try:
        opts = ["-o", options] if options else []
        subprocess.run(["mount", *opts, dev, str(target)], check=True, capture_output=True)
        try:
            yield target
        finally:
            for _ in range(50):
                if subprocess.run(["umount", str(target)], capture_output=True).returncode == 0:
                    break
                time.sleep(0.1)
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True)
