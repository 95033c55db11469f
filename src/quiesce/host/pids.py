"""Other processes, by pid, from /proc: whether one is alive (a zombie is not), and when
it started (so that a recycled pid does not pass for the process recorded)."""

from __future__ import annotations

from pathlib import Path


def stat_fields(pid: int) -> list[str] | None:
    """``/proc/PID/stat`` after the command name (state first), or None if it is gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
        return data[data.rindex(b")") + 2 :].decode().split()
    except (OSError, ValueError):
        return None


def pid_alive(pid: object) -> bool:
    """Whether a process of this pid runs on this host: a zombie (dead, not yet reaped by
    its parent) counts as gone."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    fields = stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def start_time(pid: int) -> int | None:
    """When the process started (clock ticks since boot), so that a recycled pid does not
    pass for the process recorded; None if it is gone or a zombie."""
    fields = stat_fields(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return None
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


__all__ = ["pid_alive", "start_time", "stat_fields"]
