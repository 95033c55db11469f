"""The policy shared by the hooks and writers of one run: failure policy, time budget,
environment, and the results they record."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from quiesce.apps.hooks.results import HookResult
from quiesce.errors import HookFailed, RunTimeout
from quiesce.util.redact import is_secret_name

SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_LOCALE = re.compile(r"^(LANG|LANGUAGE|LC_[A-Z_]+|TZ)$")


def base_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """What every hook starts from: a safe PATH, HOME, and the locale and time zone of
    quiesce's environment. Nothing else is inherited, so the passwords quiesce was given
    (RESTIC_PASSWORD, the variable ``password_env`` names, AWS keys, ...) never reach
    a hook: a hook's output ends up in reports and in the ``after_run`` hooks' stdin."""
    env = os.environ if environ is None else environ
    out = {"PATH": SAFE_PATH, "HOME": "/root" if os.path.isdir("/root") else "/"}
    out |= {k: v for k, v in env.items() if _LOCALE.match(k) and not is_secret_name(k)}
    return out


@dataclass
class HookContext:
    """State shared by the hooks and writers of one run: policy, budget, results."""

    job: str = "adhoc"
    volumes: Sequence[str] = ()
    on_hook_failure: str = "abort"  # "abort" | "crash-consistent"
    default_timeout: float = 60.0
    deadline: float | None = None  # monotonic: the whole run's budget
    results: list[HookResult] = field(default_factory=list)
    degraded: list[str] = field(default_factory=list)  # why only crash-consistent
    release_failures: list[str] = field(default_factory=list)  # post-thaw steps that failed
    warnings: list[str] = field(default_factory=list)
    status: str = "ok"  # what post-thaw hooks see in QUIESCE_STATUS

    def env(self, phase: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """A hook's whole environment: :func:`base_env`, the hook's own ``env`` table
        from the job, then quiesce's QUIESCE_* variables (which the table cannot change)."""
        return (
            base_env()
            | dict(extra or {})
            | {
                "QUIESCE_JOB": self.job,
                "QUIESCE_PHASE": phase,
                "QUIESCE_VOLUMES": "\n".join(self.volumes),
                "QUIESCE_STATUS": self.status,
            }
        )

    def budget(self, timeout: float | None, *, releasing: bool = False) -> float:
        """The timeout a step gets: its own, capped by what is left of the run's budget.

        Releasing steps (post-thaw) always get their own timeout: releasing an
        application matters more than the run's budget.
        """
        own = self.default_timeout if timeout is None else timeout
        if releasing or self.deadline is None:
            return own
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise RunTimeout("the run's time budget (timeouts.run) was used up before the freeze")
        return min(own, left)

    def record(self, result: HookResult) -> HookResult:
        self.results.append(result)
        return result

    def failed(self, result: HookResult, *, quiescing: bool) -> None:
        """Apply ``on_hook_failure`` to a failed step.

        Quiescing steps (before the window) raise HookFailed under ``abort``; under
        ``crash-consistent`` they mark the run as only crash-consistent and go on.
        Releasing steps (after the window) never stop the release of the others: they
        are collected in ``release_failures``, and the run reports them as its error.
        """
        if not quiescing:
            self.release_failures.append(result.describe())
            return
        if self.on_hook_failure == "crash-consistent":
            self.degraded.append(result.describe())
            self.warnings.append(
                f"{result.describe()}; continuing: the snapshot is only crash-consistent "
                '(on_hook_failure = "crash-consistent")'
            )
            return
        raise HookFailed(f"{result.describe()}; nothing was snapshotted", result=result)


__all__ = ["SAFE_PATH", "HookContext", "base_env"]
