"""The smaller wordings of issue 19: hints that name the job's own state directory, a
backup of a snapshot already backed up, retention with delete_snapshot, the dry run's
re-clone step."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers.snaptools import image_on_reflink_host
from rich.console import Console

from quiesce.cli.render import print_backup_report, retention_lines
from quiesce.job.hints import with_job


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("run `quiesce cleanup`", "run `quiesce cleanup --job /j.toml`"),
        ("see `quiesce snapshot list`", "see `quiesce snapshot list --job /j.toml`"),
        ("`quiesce snapshot mount ID DIR`", "`quiesce snapshot mount ID DIR --job /j.toml`"),
        ("`quiesce status`", "`quiesce status --job /j.toml`"),
        ("`quiesce cleanup --job /x.toml`", "`quiesce cleanup --job /x.toml`"),  # as it is
        ("`quiesce check JOB.toml`", "`quiesce check JOB.toml`"),  # not a state command
    ],
)
def test_state_commands_in_hints_name_the_job(text: str, want: str) -> None:
    assert with_job(text, "/j.toml") == want
    assert with_job(text, None) == text  # the default state directory: as it is


def _printed(data: dict) -> str:
    con = Console(record=True, width=200)
    print_backup_report(data, con, con)
    return con.export_text()


def test_a_snapshot_already_backed_up_says_so_not_0_bytes() -> None:
    data = {
        "job": "j", "target": "restic", "snapshot": "j-1", "already_backed_up": True,
        "backup": {"target": "restic", "snapshot_id": "abcd1234", "bytes": 0, "files": 0,
                   "duration_s": 0.0},
        "warnings": [], "error": None,
    }  # fmt: skip
    text = _printed(data)
    assert "already backed up as abcd1234: made no new backup" in text
    assert "0 B" not in text and "0 file(s)" not in text
    data["already_backed_up"] = False  # the control: a real backup prints its figures
    assert "backed up 0 B in 0 file(s)" in _printed(data)


def test_retention_with_delete_snapshot_says_what_it_deleted() -> None:
    r = {"kept": {}, "deleted": ["j-1"], "failed": [], "held": ["j-1"], "deleted_backed_up": "j-1"}
    lines = retention_lines(r)
    assert lines == ["deleted snapshot j-1 after its backup (delete_snapshot = true)"]
    r = {"kept": {"j-3": ["last"]}, "deleted": ["j-0", "j-2"], "failed": [], "held": [],
         "incomplete": {"deleted": ["j-2"], "kept": []}}  # fmt: skip
    assert retention_lines(r) == [
        "retention: kept 1 complete snapshot(s), deleted 1",
        "retention: deleted 1 incomplete snapshot(s) (backup, verification or drill failed; "
        "a newer run is complete): j-2",
    ]


def test_the_dry_run_lists_the_re_clone_before_the_freeze(loopfs, tmp_path) -> None:
    pair = image_on_reflink_host(loopfs, "ext4")
    job = tmp_path / "j.toml"
    for mode, listed in (("delta", True), ("clone", False)):
        job.write_text(
            f'volumes = ["{pair.inner.path}"]\nstate_dir = "{tmp_path / "s"}"\n'
            f'[provider]\ntype = "reflink"\nmode = "{mode}"\n'
        )
        job.chmod(0o600)
        p = subprocess.run([sys.executable, "-m", "quiesce", "run", str(job), "--dry-run",
                            "--json"], capture_output=True, text=True, timeout=60)  # fmt: skip
        assert p.returncode == 0, p.stderr
        steps = json.loads(p.stdout)["steps"]
        at = [i for i, s in enumerate(steps) if s.startswith("reflink: re-clone")]
        assert bool(at) == listed, steps
        if at:  # after the flush, before the freeze
            freeze = next(i for i, s in enumerate(steps) if s.startswith("FIFREEZE"))
            assert at[0] == freeze - 1, steps
