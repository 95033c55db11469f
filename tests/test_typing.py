"""Typing is checked, not claimed: mypy (with the pydantic plugin, pyproject.toml's
[tool.mypy]) reports nothing on src/. The guardian's package is the lead's rewrite in
progress: its errors are listed by the test but do not fail it yet (FREEZING_PENDING)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FREEZING_PENDING = "src/quiesce/freezing/"


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="pip install mypy")
def test_mypy_is_clean_on_src() -> None:
    p = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-error-summary", "src"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    errors = [ln for ln in p.stdout.splitlines() if re.match(r"^\S+\.py:\d+: error:", ln)]
    assert p.returncode in (0, 1), p.stdout + p.stderr  # 2: mypy itself failed
    pending = [e for e in errors if e.startswith(FREEZING_PENDING)]
    if pending:
        print(f"mypy: {len(pending)} error(s) left in {FREEZING_PENDING}:", *pending, sep="\n  ")
    assert [e for e in errors if not e.startswith(FREEZING_PENDING)] == []
