"""Keep a write in flight on a filesystem for as long as this process lives.

``splice()`` from an empty pipe into a file (fd ARGV[1], opened for writing by the
caller) while this process itself holds the pipe's write end: the kernel takes the
filesystem's write level (``file_start_write``) and then waits for pipe data that never
comes. A FIFREEZE meanwhile waits, uninterruptibly, until the splice returns: the attack
of issue 18 (any user with a file it may write). The wait itself is interruptible: a
signal ends it. Prints ``ready`` just before the splice.
"""

import os
import sys

out = int(sys.argv[1])
r, w = os.pipe()  # w stays open: the splice never sees EOF
print("ready", os.getpid(), flush=True)
os.splice(r, out, 1 << 16)
print("splice returned", flush=True)
