"""The full `quiesce demo` (demo_full.run_full_demo): real loop filesystems, a real SQLite
writer, restic; it must prove the restored database consistent and leave nothing."""

from __future__ import annotations

import subprocess
from pathlib import Path

from quiesce.cli.demo.full import run_full_demo


def _ours(text: str) -> list[str]:
    return [line for line in text.splitlines() if "quiesce-demo-" in line]


def test_full_demo_restores_a_consistent_database_and_cleans_up() -> None:
    before = set(Path("/var/tmp").glob("quiesce-demo-*"))
    result = run_full_demo(None, as_json=False)
    restore = result["restore"]
    assert restore["integrity_check"] == "ok" and restore["all_committed_rows_present"]
    assert restore["rows"] >= restore["committed_before_snapshot"] > 0
    first, second = result["runs"]
    assert second["backup"]["backup"]["files_unmodified"] >= 200  # the static assets
    assert second["backup"]["retention"]["deleted"] == [first["snapshot"]]
    assert all(r["backup"]["verify"]["ok"] for r in result["runs"])
    assert all(r["consistency"] in ("clean", "atomic") for r in result["runs"])
    assert result["duration_s"] < 60
    assert set(Path("/var/tmp").glob("quiesce-demo-*")) == before
    assert _ours(subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout) == []
    assert _ours(Path("/proc/self/mountinfo").read_text()) == []
