"""A session hook for the tests: holds an flock on LOCK between 'ready' and 'done'.

Usage: session_hook.py LOCK LOG [MODE]. Appends one event per line to LOG (a file
outside the frozen volumes): started, locked, released-thaw, released-eof, ...
MODE: ok (default), fail-before-ready (exit 3), never-ready, never-done (ignores 'thaw'
and EOF: only a kill ends it), error (answers "error ...").
"""

import fcntl
import os
import sys
import time

lock, log = sys.argv[1], sys.argv[2]
mode = sys.argv[3] if len(sys.argv) > 3 else "ok"


def note(event: str) -> None:
    with open(log, "a") as f:
        f.write(event + "\n")


note("started")
if sys.stdin.readline().strip() != "freeze":
    note("eof-before-freeze")
    sys.exit(2)
if mode == "fail-before-ready":
    print("cannot take the lock: demo failure", file=sys.stderr, flush=True)
    sys.exit(3)
if mode == "error":
    print("error database unreachable", flush=True)
    sys.stdin.readline()
    sys.exit(1)
if mode == "never-ready":
    time.sleep(600)
fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
note("locked")
print("holding the lock", flush=True)  # not a protocol word: kept as output
print("ready", flush=True)
line = sys.stdin.readline()
if mode == "never-done":
    time.sleep(600)
if line == "":
    fcntl.flock(fd, fcntl.LOCK_UN)
    note("released-eof")
    sys.exit(0)
assert line.strip() == "thaw", line
fcntl.flock(fd, fcntl.LOCK_UN)
note("released-thaw")
print("done", flush=True)
sys.stdin.readline()  # EOF: quiesce closes our stdin after 'done'
note("exit")
