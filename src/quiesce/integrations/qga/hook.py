"""qemu-guest-agent's fsfreeze hook: ``HOOK freeze`` before its FIFREEZE, ``HOOK thaw``
after its FITHAW (``qemu-ga --fsfreeze-hook=HOOK``).

``freeze`` forks the watchdog (integrations/qga/watchdog.py) before anything else, so no
thread of a quiescer is lost in the fork, and waits for its answer on a pipe: "ready" (exit
0: the agent freezes) or the failure (exit non-zero: the agent does not freeze and tells
the host ``fsfreeze hook has failed with status N``; the message is in the kernel log and
in ``/run/quiesce/qga/last.json``, which the host reads through the agent). The watchdog
runs on after the hook exits: qemu-ga waits for the hook process only.

``thaw`` is thaw.py (standard library only, so it starts fast while the agent waits).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

from quiesce.errors import ExitCode, QuiesceError
from quiesce.integrations.qga.config import load_guest_job
from quiesce.integrations.qga.watchdog import Watchdog, kmsg

USAGE = "usage: quiesce-qga-hook freeze|thaw [--job PATH]"


def _read_all(fd: int) -> bytes:
    out = b""
    while chunk := os.read(fd, 65536):
        out += chunk
    return out


def freeze(job_path: str | None) -> int:
    """Fork the watchdog, wait for its answer, exit like it says."""
    agent_pid = os.getppid()
    try:
        gj = load_guest_job(job_path)
    except QuiesceError as e:
        lines = [e.message, *(str(p) for p in getattr(e, "problems", []))]
        kmsg("guest job refused, the agent will not freeze: " + "; ".join(lines))
        print("\n".join(lines), file=sys.stderr)
        return e.exit_code
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the watchdog: its own session, outlives this hook
        os.close(r)
        os.setsid()
        # Let go of the hook's stdio: whoever reads the hook's output (an agent that logs
        # it, a test) must see EOF when the hook exits, not when the watchdog does.
        null = os.open(os.devnull, os.O_RDWR)
        for std in (0, 1, 2):
            os.dup2(null, std)
        os.close(null)
        code = ExitCode.FAILURE
        try:
            dog = Watchdog(gj, agent_pid, w)
            code = dog.prepare()
            if code == 0:
                code = dog.serve()
        except BaseException as e:
            kmsg(f"watchdog failed: {e!r}")
            with contextlib.suppress(OSError):
                os.write(w, json.dumps({"ok": False, "message": repr(e)}).encode() + b"\n")
        finally:
            os._exit(int(code))
    os.close(w)
    answer = _read_all(r)
    os.close(r)
    try:
        res = json.loads(answer.splitlines()[0]) if answer else {}
    except (ValueError, IndexError):
        res = {}
    if res.get("ok"):
        return 0
    msg = res.get("message") or "the watchdog ended without an answer"
    print(f"quiesce: {msg}", file=sys.stderr)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return code if code > 0 else ExitCode.HOOK


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    job = None
    if "--job" in args:
        i = args.index("--job")
        if i + 1 >= len(args):
            print(USAGE, file=sys.stderr)
            return ExitCode.USAGE
        job = args[i + 1]
        del args[i : i + 2]
    if args == ["freeze"]:
        return freeze(job)
    if args == ["thaw"]:
        from quiesce.integrations.qga.thaw import thaw

        return thaw(job)
    print(USAGE, file=sys.stderr)
    return ExitCode.USAGE


__all__ = ["freeze", "main"]
