"""What a hook or writer step did (one report row each), and the errors a failed one raises."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from quiesce.errors import HookFailed, RunTimeout
from quiesce.util.redact import redact, redact_data


@dataclass
class HookResult:
    """What one hook (or writer step) did: the report shows one row per result."""

    name: str
    kind: str  # pre-freeze post-thaw hook-dir:freeze hook-dir:thaw session writer:...
    argv: list[str] = field(default_factory=list)
    status: str = "ok"  # ok failed timeout error skipped
    returncode: int | None = None
    start: float = 0.0  # unix time
    end: float = 0.0
    duration_s: float = 0.0
    output: str = ""
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "skipped")

    def describe(self) -> str:
        """One line for messages: `pre-freeze hook 'x' failed: exit 3`."""
        what = self.error or self.status
        return redact(f"{self.kind} {self.name!r}: {what}")

    def to_dict(self) -> dict[str, Any]:
        """The report's row, redacted: a hook's output may echo a password."""
        return redact_data(asdict(self))


class StepTimer:
    """Times one step into its result: unix start/end, monotonic duration."""

    def __init__(self, result: HookResult) -> None:
        self.result = result
        self.t0 = time.monotonic()
        result.start = time.time()

    def stop(self) -> HookResult:
        self.result.duration_s = time.monotonic() - self.t0
        self.result.end = self.result.start + self.result.duration_s
        return self.result


__all__ = ["HookFailed", "HookResult", "RunTimeout", "StepTimer"]
