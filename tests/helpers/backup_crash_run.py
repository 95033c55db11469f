"""A backup run that gets SIGKILLed by test_journal.py in the middle of `restic backup`.

Usage: backup_crash_run.py STATE INNER_MOUNT INNER_IMAGE CLONE MOUNT_ROOT REPO PWFILE

It does what a run does, through the cleanup journal: clone the inner filesystem's
image inside a freeze, attach the clone to a read-only loop device, mount it at the
stable path, start restic, and print "backing-up" on its first progress line; then it
blocks until the test kills it.
"""

import os
import sys
import time
from pathlib import Path

from quiesce import freeze
from quiesce.backup.mount import mount_readonly, stable_path
from quiesce.backup.targets.restic import ResticTarget
from quiesce.host import kernel
from quiesce.state.journal import Journal

state, inner_mount, inner_image, clone, root, repo, pw = sys.argv[1:8]
j = Journal.open(state, job="crash")
eid = j.intent("file", path=clone)
src = os.open(inner_image, os.O_RDONLY)
dst = os.open(clone, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
with freeze([inner_mount], timeout=10):
    kernel.ficlone(dst, src)
os.close(src)
os.close(dst)
target = stable_path("crash", "vol", root)
mount_readonly(clone, target, journal=j, fstype="ext4", root=Path(root))
print("mounted", flush=True)


def progress(_update):
    print("backing-up", flush=True)
    time.sleep(3600)


t = ResticTarget(repo, password_file=pw, job="crash", cache_dir=Path(state) / "cache")
t.backup(Path(root) / "crash", paths=["vol"], progress=progress)
time.sleep(3600)
