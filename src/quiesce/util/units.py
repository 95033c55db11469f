"""Numbers for people: durations and sizes in the units an operator reads at a glance."""

from __future__ import annotations


def human_duration(s: float | None, missing: str = "-") -> str:
    """``0.39 ms``, ``36.89 ms``, ``650.3 ms``, ``2.01 s``, ``95 s``: freeze windows keep
    their hundredths of a millisecond, runs read in seconds."""
    if s is None:
        return missing
    if s < 0.1:
        return f"{s * 1000:.2f} ms"
    if s < 1:
        return f"{s * 1000:.1f} ms"
    if s < 60:
        return f"{s:.2f} s"
    return f"{s:.0f} s"


def human_bytes(n: float | None, missing: str = "?") -> str:
    """``512 B``, ``1.5 KiB``, ``2.0 GiB`` (binary units, like restic and du -h)."""
    if n is None:
        return missing
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


__all__ = ["human_bytes", "human_duration"]
