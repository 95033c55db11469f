"""A stand-in guardian for the second line's tests (tests/test_second_line.py).

``fake_guardian.py TIMEOUT PATH...``: resolves each path, starts a SecondLine exactly as
the guardian does, prints ``{"ready": true, "pid": .., "watchdog": ..}``, then obeys one
command per stdin line and answers one JSON line each:

``freeze I`` (note "freezing" with the call time, FIFREEZE, note the result; ``freeze-thread
I`` the same on a new thread, the main thread reading on),
``thaw I`` (note "thawing", FITHAW, note "thawed"), ``note I STATE``, ``stop``.

The test SIGKILLs it wherever it wants the guardian to die.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import threading
import time

from quiesce.freezing.guardian.protocol import open_run_dir
from quiesce.freezing.guardian.second import SecondLine
from quiesce.host import kernel
from quiesce.host.mounts import MountTable, resolve


def say(**kw: object) -> None:
    sys.stdout.write(json.dumps(kw) + "\n")
    sys.stdout.flush()


def main() -> None:
    timeout = float(sys.argv[1])
    table = MountTable.read()
    roots = [resolve(p, table) for p in sys.argv[2:]]
    dir_fd = open_run_dir(create=True)
    assert dir_fd is not None
    line = SecondLine.start(
        guardian_pid=os.getpid(),
        fds=[r.fd for r in roots],
        devs=[r.volume.dev for r in roots],
        names=[r.mount.mount_point for r in roots],
        timeout_s=timeout,
        dir_fd=dir_fd,
    )
    say(ready=True, pid=os.getpid(), watchdog=line.watchdog_pid, recorded=line.ready)
    for cmd in sys.stdin:
        op, *args = cmd.split()
        if op in ("freeze", "freeze-thread"):
            i = int(args[0])

            def freeze(i: int = i, op: str = op) -> None:
                t0 = time.monotonic_ns()
                line.note(i, "freezing", call_ns=t0)
                code = kernel.freeze_errno(roots[i].fd)
                state = "frozen" if code == 0 else "foreign" if code == errno.EBUSY else "failed"
                line.note(i, state, call_ns=t0)
                say(op=op, vol=i, errno=code, call_ns=t0)

            if op == "freeze":
                freeze()
            else:  # on a thread of its own, as the guardian's crew does
                threading.Thread(target=freeze, daemon=True).start()
        elif op == "thaw":
            i = int(args[0])
            line.note(i, "thawing")
            code = kernel.thaw_errno(roots[i].fd)
            line.note(i, "thawed")
            say(op=op, vol=i, errno=code)
        elif op == "note":
            line.note(int(args[0]), args[1])
            say(op=op)
        elif op == "stop":
            line.stop()
            say(op=op)


if __name__ == "__main__":
    main()
