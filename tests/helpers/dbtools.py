"""Throwaway database servers for the writer tests, on loop filesystems.

Never the system services: each server gets its own data directory, socket and log in
directories the test made. The loop filesystems live under a world-traversable temp
directory (pytest's own is 0700), because the servers run as the postgres/mysql users.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import LoopFactory

SETUP_HINT = "run `bash scripts/db-setup.sh` (installs Debian's postgresql and mariadb-server)"


def pg_bin() -> Path | None:
    """The newest PostgreSQL's bin directory (by version number: 16 after 9)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version_key)
    return Path(found[-1]).parent if found else None


def _version_key(path: str) -> tuple[int, ...]:
    return tuple(int(x) for x in Path(path).parts[-3].split(".") if x.isdigit())


def mariadb_bin() -> dict[str, str] | None:
    tools = {}
    for tool in ("mariadbd", "mariadb-install-db"):
        path = shutil.which(tool) or (f"/usr/sbin/{tool}" if os.path.exists(f"/usr/sbin/{tool}")
                                      else None)  # fmt: skip
        if path is None:
            return None
        tools[tool] = path
    return tools


@contextlib.contextmanager
def open_loops() -> Iterator[LoopFactory]:
    """conftest's LoopFactory in a directory other users can traverse; torn down after."""
    base = Path(tempfile.mkdtemp(prefix="quiesce-db-", dir="/tmp"))
    base.chmod(0o755)
    factory = LoopFactory(base)
    try:
        yield factory
    finally:
        factory.cleanup()
        shutil.rmtree(base, ignore_errors=True)


def shared_dir(owner: str) -> Path:
    """A temp dir (sockets, logs, pid files) owned by a server's user, outside any volume."""
    d = Path(tempfile.mkdtemp(prefix=f"quiesce-{owner}-", dir="/tmp"))
    shutil.chown(d, owner, owner)
    d.chmod(0o755)
    return d


def as_user(user: str, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(["runuser", "-u", user, "--", *argv], capture_output=True, text=True,
                       timeout=timeout)  # fmt: skip
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({p.returncode}): {p.stderr}{p.stdout}")
    return p


def wait_for_path(path: Path, timeout: float = 60, proc: subprocess.Popen | None = None) -> None:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"server exited ({proc.returncode}) before {path} appeared")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout}s")
        time.sleep(0.05)


def need(condition: bool, what: str) -> None:
    if not condition:
        pytest.skip(f"{what} not installed: {SETUP_HINT}")


def start_row_writer(
    connect: Callable[[], Any], insert: Callable[[Any, int], None], first: int = 100
) -> tuple[list[tuple[float, int]], threading.Event, threading.Thread]:
    """A client thread committing one row per transaction (``insert(conn, seq)`` in
    autocommit), each acked as (monotonic time, seq) after its COMMIT; returns once
    ``first`` rows are acked. Stop it with ``stop.set(); thread.join()``."""
    acked: list[tuple[float, int]] = []
    stop = threading.Event()

    def write() -> None:
        with connect() as conn:
            seq = 0
            while not stop.is_set():
                insert(conn, seq + 1)
                seq += 1
                acked.append((time.monotonic(), seq))

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    while len(acked) < first:
        time.sleep(0.01)
    return acked, stop, thread
