"""FIFREEZE (or FITHAW) a mount point from a separate process, so that a test never
blocks in the kernel itself: prints ``start``, then ``rc ERRNO SECONDS`` when the ioctl
returns (ERRNO 0: it succeeded)."""

import fcntl
import os
import sys
import time

FIFREEZE, FITHAW = 0xC0045877, 0xC0045878
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
op = FITHAW if len(sys.argv) > 2 and sys.argv[2] == "thaw" else FIFREEZE
print("start", flush=True)
t0 = time.monotonic()
try:
    fcntl.ioctl(fd, op, 0)
    err = 0
except OSError as e:
    err = e.errno
print("rc", err, f"{time.monotonic() - t0:.3f}", flush=True)
