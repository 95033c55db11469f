"""``quiesce install-qga-hook``: make quiesce qemu-guest-agent's fsfreeze hook on a guest.

Writes the hook (a two-line shell script that ``exec``s the interpreter quiesce runs under,
so the agent stays the hook's parent: the watchdog watches that pid), a guest job if there
is none (the stock hook's scripts directory, /etc/qemu/fsfreeze-hook.d, keeps running, in
name order, each with a deadline), and a systemd drop-in that starts the agent with
``--fsfreeze-hook``. The stock hook (/etc/qemu/fsfreeze-hook) is left as it is.
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from quiesce.host.files import write_atomic
from quiesce.host.trust import make_private_dirs
from quiesce.integrations.qga.config import DEFAULT_JOB, STOCK_HOOK_DIR

HOOK = Path("/etc/qemu/quiesce-fsfreeze-hook")
DROP_IN = Path("/etc/systemd/system/qemu-guest-agent.service.d/quiesce.conf")
AGENT = "/usr/sbin/qemu-ga"

DEFAULT_GUEST_JOB = """\
# quiesce's guest job: what runs when qemu-guest-agent freezes this guest (docs/vm.md).
[guest]
deadline = 60   # seconds: past this, quiesce thaws the agent's freeze itself
lease = 10      # seconds the agent may stay stopped inside the window

[timeouts]
hook = 30       # each hook's own deadline
{directory}"""


def hook_script(job: Path, python: str = sys.executable, src: str | None = None) -> str:
    """The hook: ``thaw`` runs under ``python -S`` (no site-packages scan: it starts in a
    fraction of the time while the agent waits), with quiesce's directory on the path."""
    import quiesce

    src = src or str(Path(quiesce.__file__).resolve().parents[1])
    mod = "-m quiesce.integrations.qga"
    py, job_arg = shlex.quote(python), shlex.quote(str(job))
    return (
        "#!/bin/sh\n# qemu-guest-agent fsfreeze hook: quiesce (quiesce install-qga-hook)\n"
        f"export PYTHONDONTWRITEBYTECODE=1 PYTHONPATH={shlex.quote(src)}\n"
        f'if [ "$1" = thaw ]; then exec {py} -B -S {mod} "$@" --job {job_arg}; fi\n'
        f'exec {py} -B -s {mod} "$@" --job {job_arg}\n'
    )


def drop_in(hook: Path, agent: str = AGENT) -> str:
    return (
        "# quiesce install-qga-hook: the agent runs quiesce's fsfreeze hook\n[Service]\n"
        f"ExecStart=\nExecStart={agent} --fsfreeze-hook={hook}\n"
    )


@dataclass
class Installed:
    written: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)


def install(root: str | Path = "/", *, job: Path = DEFAULT_JOB, systemd: bool = True) -> Installed:
    """Write the hook, the guest job (kept if present) and the drop-in under ``root``."""
    base = Path(root)
    out = Installed()

    def place(path: Path) -> Path:
        return base / path.relative_to("/")

    hook = place(HOOK)
    hook.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(hook, hook_script(job), mode=0o755)
    out.written.append(hook)
    job_file = place(job)
    if job_file.exists():
        out.kept.append(job_file)
    else:
        make_private_dirs(job_file.parent)
        stock = place(STOCK_HOOK_DIR)
        directory = (
            f'\n[hooks]\ndirectory = "{STOCK_HOOK_DIR}"   # the stock hook\'s scripts\n'
            "directory_timeout = 30\n"
            if stock.is_dir()
            else ""
        )
        write_atomic(job_file, DEFAULT_GUEST_JOB.format(directory=directory))
        out.written.append(job_file)
    if systemd:
        unit = place(DROP_IN)
        unit.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(unit, drop_in(HOOK), mode=0o644)
        out.written.append(unit)
    os.sync()
    return out


__all__ = ["DROP_IN", "HOOK", "Installed", "drop_in", "hook_script", "install"]
