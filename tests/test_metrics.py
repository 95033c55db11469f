"""Prometheus textfile output: format, atomic replace, several jobs in one file."""

from __future__ import annotations

import errno
import os
import re
import threading
from pathlib import Path

from quiesce.job.metrics import METRICS, RunMetrics, parse, write_textfile

# The text exposition format, strictly: comments, or `name{labels} value`.
LINE = re.compile(
    r'^(# (HELP|TYPE) quiesce_[a-z_]+ .+|quiesce_[a-z_]+\{job="([^"\\]|\\.)*"\} '
    r"(-?[0-9.e+-]+|NaN|\+Inf|-Inf))$"
)


def _check_format(text: str) -> None:
    assert text.endswith("\n")
    seen_type = set()
    for line in text.splitlines():
        assert LINE.match(line), line
        if line.startswith("# TYPE"):
            name = line.split()[2]
            assert name not in seen_type, f"duplicate TYPE for {name}"
            assert line.endswith(" counter" if name == "quiesce_runs_total" else " gauge")
            seen_type.add(name)
        elif not line.startswith("#"):
            assert line.split("{")[0] in seen_type, "sample before its TYPE line"


def test_success_then_failure_keeps_last_success(tmp_path: Path) -> None:
    f = tmp_path / "tf" / "quiesce.prom"
    ok = RunMetrics(
        "db", True, finished=1000.0, duration_s=12.5, freeze_window_s=0.0042,
        backup_bytes=2 << 30, backup_added_bytes=123, backup_files=4000,
        backup_duration_s=10.25, verify_ok=True, drill_ok=True, drill_recovery_s=1.25,
        consistency="atomic",
    )  # fmt: skip
    text = write_textfile(f, ok)
    assert 'quiesce_consistency_level{job="db"} 1' in text
    _check_format(text)
    assert 'quiesce_freeze_window_seconds{job="db"} 0.0042' in text
    assert 'quiesce_backup_bytes{job="db"} 2147483648' in text
    assert set(parse(text)["db"]) == set(METRICS)
    text = write_textfile(f, RunMetrics("db", False, finished=2000.0, duration_s=1.0))
    _check_format(text)
    db = parse(f.read_text())["db"]
    assert db["last_run_success"] == 0
    assert db["last_run_timestamp_seconds"] == 2000
    assert db["last_success_timestamp_seconds"] == 1000  # survives the failure
    assert "backup_bytes" not in db  # not measured this run: no stale sample
    assert oct(os.stat(f).st_mode & 0o777) == "0o644"
    assert [p.name for p in f.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_jobs_share_a_file_and_odd_names_are_escaped(tmp_path: Path) -> None:
    f = tmp_path / "quiesce.prom"
    names = [f'job"{i}\\x' for i in range(8)]
    threads = [
        threading.Thread(target=write_textfile, args=(f, RunMetrics(n, True, duration_s=i)))
        for i, n in enumerate(names)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    text = f.read_text()
    _check_format(text)
    jobs = parse(text)
    assert set(jobs) == set(names)  # concurrent writers lost nothing
    assert jobs[names[3]]["run_duration_seconds"] == 3
    assert text.count("# TYPE quiesce_last_run_success gauge") == 1


def test_temp_and_lock_files_are_private_and_never_follow_links(tmp_path: Path) -> None:
    """The temp file's name was predictable (``.NAME.PID.tmp``) and opened with
    open("w"): a link planted there made root overwrite (and chmod 0644) the file it
    points to. Now: mkstemp (O_EXCL, unguessable), the lock 0600 with O_NOFOLLOW."""
    f = tmp_path / "tf" / "quiesce.prom"
    f.parent.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("root's file\n")
    victim.chmod(0o600)
    (f.parent / f".{f.name}.{os.getpid()}.tmp").symlink_to(victim)
    old = os.umask(0o022)
    try:
        write_textfile(f, RunMetrics("db", True, finished=1.0))
    finally:
        os.umask(old)
    assert victim.read_text() == "root's file\n" and victim.stat().st_mode & 0o777 == 0o600
    assert parse(f.read_text())["db"]["last_run_success"] == 1
    assert f.stat().st_mode & 0o777 == 0o644  # node_exporter must read it (documented)
    lock = f.parent / f".{f.name}.lock"
    assert lock.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in f.parent.iterdir() if p.name.endswith(".tmp")] == [
        f".{f.name}.{os.getpid()}.tmp"  # the planted link, left alone
    ]
    # a lock that is a link: refused, nothing is created where it points
    lock.unlink()
    lock.symlink_to(tmp_path / "created-by-root")
    try:
        write_textfile(f, RunMetrics("db", False))
    except OSError as e:
        assert e.errno == errno.ELOOP
    else:
        raise AssertionError("a lock file that is a symlink was followed")
    assert not (tmp_path / "created-by-root").exists()


def test_exit_code_and_run_counter(tmp_path: Path) -> None:
    f = tmp_path / "quiesce.prom"
    write_textfile(f, RunMetrics("db", True, finished=10.0))
    write_textfile(f, RunMetrics("db", False, exit_code=12, finished=20.0))
    text = write_textfile(f, RunMetrics("other", False, finished=30.0))
    _check_format(text)
    assert "# TYPE quiesce_runs_total counter" in text
    jobs = parse(text)
    assert (jobs["db"]["runs_total"], jobs["db"]["last_run_exit_code"]) == (2, 12)
    assert (jobs["other"]["runs_total"], jobs["other"]["last_run_exit_code"]) == (1, 1)


def _stale_alert() -> str:
    """The documented staleness alert's PromQL expression (docs/operations.md)."""
    doc = (Path(__file__).parent.parent / "docs" / "operations.md").read_text()
    m = re.search(r"alert: QuiesceBackupStale\n\s+expr: (.+)\n", doc)
    assert m, "docs/operations.md lost the QuiesceBackupStale alert"
    return m.group(1)


def _fires(expr: str, samples: dict[str, float], now: float) -> bool:
    """Evaluate ``time() - METRIC > N * M`` the way Prometheus does for one job: a
    metric the job has no sample of yields no series, and the alert cannot fire."""
    m = re.fullmatch(r"time\(\) - quiesce_([a-z_]+) > (\d+) \* (\d+)", expr)
    assert m, f"the test understands only `time() - METRIC > N * M`, not {expr!r}"
    name, a, b = m.group(1), int(m.group(2)), int(m.group(3))
    if name not in samples:
        return False
    return now - samples[name] > a * b


def test_the_stale_alert_fires_for_a_job_that_never_succeeded(tmp_path: Path) -> None:
    expr, f, day = _stale_alert(), tmp_path / "quiesce.prom", 86400.0
    now = 100 * day
    write_textfile(f, RunMetrics("new", False, exit_code=12, finished=now - 60))
    assert _fires(expr, parse(f.read_text())["new"], now)  # never succeeded: stale
    write_textfile(f, RunMetrics("new", True, finished=now - 30))
    assert not _fires(expr, parse(f.read_text())["new"], now)  # fresh
    write_textfile(f, RunMetrics("new", False, finished=now - 20))
    assert not _fires(expr, parse(f.read_text())["new"], now)  # one failure: still fresh
    assert _fires(expr, parse(f.read_text())["new"], now + 2 * day)  # two days later
    # negative control: the evaluator does not fire on a series that is missing
    assert not _fires(expr, {}, now)


def test_keep_leaves_an_unmeasured_figure_alone(tmp_path: Path) -> None:
    f = tmp_path / "quiesce.prom"
    write_textfile(f, RunMetrics("db", True, freeze_window_s=0.004, backup_bytes=5))
    old = RunMetrics("db", True, keep=frozenset({"freeze_window_seconds"}))
    db = parse(write_textfile(f, old))["db"]
    assert db["freeze_window_seconds"] == 0.004 and "backup_bytes" not in db


def test_the_level_metric_reads_old_names_and_orders_the_levels(tmp_path: Path) -> None:
    from quiesce.job.metrics import LEVEL_VALUE
    from quiesce.snapshot.consistency import Consistency

    assert [LEVEL_VALUE[c] for c in Consistency] == [2, 1, 0]  # the strongest is highest
    f = tmp_path / "q.prom"
    for old, want in (("application", 1), ("crash", 0), ("clean", 2)):
        write_textfile(f, RunMetrics("db", True, consistency=old))
        assert parse(f.read_text())["db"]["consistency_level"] == want


def test_a_run_refused_before_it_starts_sets_last_run_success_to_0(tmp_path: Path) -> None:
    """Issue 19: a key typo left last_run_success at 1 until the staleness alert fired."""
    import subprocess
    import sys

    prom = tmp_path / "m" / "q.prom"
    write_textfile(prom, RunMetrics("nightly", True, finished=1000.0, freeze_window_s=0.01))
    job = tmp_path / "nightly.toml"
    job.write_text(f'volumes = ["/nonexistent"]\nmetrics_file = "{prom}"\nvolumse = 1\n'
                   '[provider]\ntype = "reflink"\n')  # fmt: skip
    job.chmod(0o600)
    p = subprocess.run([sys.executable, "-m", "quiesce", "run", str(job)],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert p.returncode == 2, p.stderr
    db = parse(prom.read_text())["nightly"]
    assert db["last_run_success"] == 0 and db["last_run_exit_code"] == 2
    assert db["freeze_window_seconds"] == 0.01  # the last good run's samples stay
    assert db["runs_total"] == 2
    # the control: check (and --dry-run) are not runs
    subprocess.run([sys.executable, "-m", "quiesce", "check", str(job)], capture_output=True)
    assert parse(prom.read_text())["nightly"]["runs_total"] == 2
