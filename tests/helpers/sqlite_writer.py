"""Commit one row per transaction to a WAL-mode SQLite database; ack each on stdout.

Usage: sqlite_writer.py DB. Prints "ready", then "ack N" after each commit of row N.
Waits up to 60 s for locks (busy_timeout), as a well-behaved application does.
"""

import signal
import sqlite3
import sys

stop = False


def _stop(_s, _f):
    global stop
    stop = True


signal.signal(signal.SIGTERM, _stop)
conn = sqlite3.connect(sys.argv[1], timeout=60, isolation_level=None)
conn.execute("PRAGMA journal_mode=WAL")
conn.execute("PRAGMA synchronous=FULL")
conn.execute("CREATE TABLE IF NOT EXISTS t (seq INTEGER PRIMARY KEY, payload BLOB NOT NULL)")
print("ready", flush=True)
seq = 0
while not stop:
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("INSERT INTO t VALUES (?, randomblob(2000))", (seq + 1,))
    conn.execute("COMMIT")
    seq += 1
    print(f"ack {seq}", flush=True)
conn.close()
print(f"summary {seq}", flush=True)
