"""`quiesce backup` and the metrics file: an older snapshot's backup does not replace
the newest freeze-window figure."""

from __future__ import annotations

import subprocess
import sys

from helpers.backup_tree import make_tree
from helpers.snaptools import image_on_reflink_host

from quiesce import snapshot as snapshots
from quiesce.job.metrics import parse


def test_backup_of_an_old_snapshot_keeps_the_newest_freeze_window(loopfs, tmp_path) -> None:
    pair = image_on_reflink_host(loopfs, "ext4")
    make_tree(pair.inner.mountpoint / "d", n_files=3)
    state, prom = tmp_path / "state", tmp_path / "textfile" / "quiesce.prom"
    job = tmp_path / "nightly.toml"
    job.write_text(
        f'volumes = ["{pair.inner.path}"]\nstate_dir = "{state}"\nmetrics_file = "{prom}"\n'
        '[provider]\ntype = "reflink"\n\n'
        f'[backup]\nmount_root = "{tmp_path / "run"}"\nverify_dir = "{tmp_path}"\n'
        f'target = "tar"\ndirectory = "{tmp_path / "tars"}"\nverify = "none"\n'
    )
    job.chmod(0o600)
    first = snapshots.create([pair.inner.path], "reflink", job="nightly", state_dir=state)
    second = snapshots.create([pair.inner.path], "reflink", job="nightly", state_dir=state)
    assert first.window_s != second.window_s

    def backup(*args: str) -> dict[str, float]:
        p = subprocess.run(
            [sys.executable, "-m", "quiesce", "backup", str(job), *args],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert p.returncode == 0, p.stderr
        return parse(prom.read_text())["nightly"]

    assert backup()["freeze_window_seconds"] == second.window_s
    m = backup("--snapshot", first.id)
    assert m["freeze_window_seconds"] == second.window_s  # not the old snapshot's
    assert m["runs_total"] == 2 and m["last_run_exit_code"] == 0
    assert backup("--snapshot", second.id)["freeze_window_seconds"] == second.window_s
