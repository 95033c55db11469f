"""Build a 2-host fleet, freeze host 0 under the hopping writer, report, wait to be killed.

Run by test_fleet_ground.py, which SIGKILLs this process (no teardown runs) to prove that
the ground still unwinds by itself: the freeze holder thaws on EOF, the sshds get their
parent-death signal, the namespaces die, and the autoclear loops detach.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quiesce_testing.ground import Fleet, freeze_host

fleet = Fleet(2).start()
writer = fleet.start_writer()
writer.wait_for(20)
freeze_host(fleet.hosts[0])
acked = writer.acked
time.sleep(0.2)
report = {
    "base": str(fleet.base),
    "sshd": [h.pid for h in fleet.hosts],
    "ns": [h.ns for h in fleet.hosts],
    "images": [str(h.data.image) for h in fleet.hosts],
    "stalled": writer.acked - acked <= 1,  # blocked on host 0's next record
}
print(json.dumps(report), flush=True)
time.sleep(600)
