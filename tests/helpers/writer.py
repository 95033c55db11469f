"""Append sequence-numbered, fsync'd records; ack each on stdout; summarize on SIGTERM.

Usage: writer.py FILE INTERVAL. Prints "ready", then "ack N" per durable record, and
"summary ACKED ERRORS MAX_STALL_S" when terminated.
"""

import os
import signal
import sys
import time

path, interval = sys.argv[1], float(sys.argv[2])
stop = False


def _stop(_s, _f):
    global stop
    stop = True


signal.signal(signal.SIGTERM, _stop)
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
seq = errors = 0
max_stall = 0.0
print("ready", flush=True)
while not stop:
    t0 = time.monotonic()
    try:
        os.write(fd, f"{seq + 1}\n".encode())
        os.fsync(fd)
        seq += 1
        print(f"ack {seq}", flush=True)
    except OSError as e:
        errors += 1
        print(f"error {e}", flush=True)
    max_stall = max(max_stall, time.monotonic() - t0)
    time.sleep(interval)
os.close(fd)
print(f"summary {seq} {errors} {max_stall:.6f}", flush=True)
