"""Typing is checked, not claimed: mypy (with the pydantic plugin, pyproject.toml's
[tool.mypy]) reports nothing on src/."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="pip install mypy")
def test_mypy_is_clean_on_src() -> None:
    p = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-error-summary", "src"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    errors = [ln for ln in p.stdout.splitlines() if re.match(r"^\S+\.py:\d+: error:", ln)]
    assert p.returncode in (0, 1), p.stdout + p.stderr  # 2: mypy itself failed
    assert errors == []
