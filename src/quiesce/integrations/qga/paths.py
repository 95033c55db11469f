"""Where the guest's watchdog keeps its socket, pid file and record (stdlib only: the
thaw hook imports this under ``python -S``, so it starts fast while the agent waits)."""

from pathlib import Path

RUN_DIR = Path("/run/quiesce/qga")  # tmpfs: writable while the guest's disks are frozen
SOCKET, PIDFILE, RECORD = "watchdog.sock", "watchdog.pid", "last.json"
