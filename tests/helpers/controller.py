"""A minimal controller for fault-injection tests and bench/guardian.py.

Usage: controller.py [--timeout T] [--lease L] [--hold S] [--no-syncfs] [--serial]
[--no-expedite] [--raw] PATH...

Default mode: freeze PATHS with ``quiesce.freeze``, hold the window for --hold seconds,
thaw, print one JSON object on stdout ({"ok", error fields, "window"}) and exit with the
error's exit code (0 on success), like the CLI. Set QUIESCE_FAULT to make it SIGSTOP
itself at a phase (see quiesce.freezer).

--raw mode talks to the guardian directly (no Freezer, no rollback): it asks it to freeze
every volume in plan order, keeps going past failures (EBUSY), then SIGSTOPs itself. After
SIGCONT it prints {"freeze": [replies], "status": guardian status} and closes the guardian.
That isolates the guardian's own promise: it thaws only what it froze itself.

Nothing is written to stdout until after the thaw.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

import quiesce
from quiesce.freezing.guardian import GuardedVolume, GuardianHandle


def run_freezer(args: argparse.Namespace) -> int:
    result: dict[str, object]
    code = 0
    window: quiesce.Window | None = None
    try:
        with quiesce.freeze(
            args.paths,
            timeout=args.timeout,
            lease=args.lease,
            syncfs=not args.no_syncfs,
            concurrent=not args.serial,
            expedite=not args.no_expedite,
        ) as window:
            time.sleep(args.hold)
        result = {"ok": True}
    except quiesce.QuiesceError as e:
        code = e.exit_code
        result = {"ok": False, **e.to_dict()}
        found = e.window
        window = found if isinstance(found, quiesce.Window) else window
    if window is not None:
        result["window"] = window.to_dict()
    sys.stdout.write(json.dumps(result) + "\n")
    return code


def run_raw(args: argparse.Namespace) -> int:
    with quiesce.make_plan(args.paths) as plan:
        specs = [
            GuardedVolume(fd=m.fd, name=m.name, fstype=m.volume.fstype, dev=m.volume.dev)
            for m in plan.members
        ]
        handle = GuardianHandle.start(specs, timeout=args.timeout, lease=args.lease)
        replies = [handle.freeze(i) for i in range(len(specs))]
        os.kill(os.getpid(), signal.SIGSTOP)
        status = handle.request("status")
        handle.close()
    sys.stdout.write(json.dumps({"freeze": replies, "status": status}) + "\n")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--lease", type=float, default=30.0)
    ap.add_argument("--hold", type=float, default=0.0)
    ap.add_argument("--no-syncfs", action="store_true")
    ap.add_argument("--serial", action="store_true", help="one volume at a time")
    ap.add_argument("--no-expedite", action="store_true")
    ap.add_argument("--raw", action="store_true")
    ap.add_argument("paths", nargs="+")
    args = ap.parse_args()
    return run_raw(args) if args.raw else run_freezer(args)


if __name__ == "__main__":
    sys.exit(main())
