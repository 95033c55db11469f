"""Hints in the job file's syntax: inside a job, the command line's flags mean nothing.

Providers, the freezer and the guardian give hints for the command line (``--option
dest=DIR``, ``raise --timeout``); a job run and ``quiesce check`` show them in the
job's own terms (``dest = "DIR"``, ``timeouts.freeze``).
"""

from __future__ import annotations

import json
import re

_OPTION_VALUE = re.compile(r"--option (\w+)=('[^']*'|[^\s),;]+)")
_OPTION_KEY = re.compile(r"--option (\w+)\b(?!=)")
_FLAGS = (
    (re.compile(r"--allow-self \(allow_self=True\)"), "allow_self = true"),
    (re.compile(r"--allow-self\b"), "allow_self = true"),
    (re.compile(r"--timeout\b"), "timeouts.freeze"),
    (re.compile(r"--lease\b"), "timeouts.lease"),
    (re.compile(r"--option KEY=VALUE"), "the [provider] table's keys"),
)


def job_hint(hint: str) -> str:
    """``hint`` in the job's syntax: ``--option dest=DIR`` -> ``dest = "DIR"``,
    ``--option timeout`` -> ``provider.timeout``, ``--timeout`` -> ``timeouts.freeze``."""
    for pattern, replacement in _FLAGS[:2]:
        hint = pattern.sub(replacement, hint)
    hint = _FLAGS[4][0].sub(_FLAGS[4][1], hint)
    hint = _OPTION_VALUE.sub(lambda m: f"{m[1]} = {json.dumps(m[2].strip(chr(39)))}", hint)
    hint = _OPTION_KEY.sub(lambda m: f"provider.{m[1]}", hint)
    for pattern, replacement in _FLAGS[2:4]:
        hint = pattern.sub(replacement, hint)
    return hint


__all__ = ["job_hint"]
