"""snapshots.create: phases, unwinding, manifests and the state directory.

A recording provider stands in for the storage (it makes no snapshot, it records what
was asked of it, and when); the loop filesystems, the freeze and the guardian are real.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any, ClassVar

import pytest
from conftest import is_writable
from helpers.snaptools import Recorder, image_on_reflink_host

from quiesce import snapshot as snapshots
from quiesce.errors import FreezeExpired, QuiesceError, UnsafePlan, UsageError
from quiesce.freezing.plan import GroupMember
from quiesce.providers.base import FreezeMode, Provider, Snapshot


class FakeProvider(Provider):
    name: ClassVar[str] = "fake"

    def __init__(self, log: list[str], mode: FreezeMode = FreezeMode.FIFREEZE, **kw: Any):
        super().__init__()
        self.log, self.mode, self.kw = log, mode, kw

    def freeze_mode(self, members: Sequence[GroupMember]) -> FreezeMode:
        return self.mode

    def check(self, members: Sequence[GroupMember]) -> None:
        self.log.append("check")

    def prepare(self, members: Sequence[GroupMember], name: str) -> None:
        self.log.append("prepare")
        self.snap_name = name

    def snapshot(self, members: Sequence[GroupMember]) -> list[Snapshot]:
        self.log.append("snapshot")
        if "probe" in self.kw:
            # short when a freeze is expected (it must time out), generous otherwise
            self.writable_inside = is_writable(members[0].name, timeout=self.kw["probe"])
        if "sleep" in self.kw:
            time.sleep(self.kw["sleep"])
        if "fail" in self.kw:
            raise QuiesceError(self.kw["fail"])
        return [
            Snapshot(f"{self.snap_name}/v{i}", "fake", m.name, m.volume.dev, m.volume.fstype,
                     time.time(), f"/nowhere/{i}")
            for i, m in enumerate(members)
        ]  # fmt: skip

    def after_thaw(self, snaps: list[Snapshot]) -> None:
        self.log.append("after_thaw")
        if "fail_after" in self.kw:
            raise QuiesceError("not completed")

    def abort(self) -> None:
        self.log.append("abort")

    def delete(self, snap: Snapshot) -> None:
        self.log.append(f"delete {snap.location}")


def test_phases_hooks_and_manifest(loopfs, tmp_path):
    fs = loopfs("ext4")
    log: list[str] = []
    prov = FakeProvider(log, probe=0.3)
    hooks = [Recorder("db", log), Recorder("wal", log)]
    man = snapshots.create([fs.path], prov, job="nightly", state_dir=tmp_path, quiescers=hooks)
    assert log == [
        "check", "prepare", "db.before_freeze", "wal.before_freeze", "snapshot",
        "wal.after_thaw(True)", "db.after_thaw(True)", "after_thaw",
    ]  # fmt: skip
    assert prov.writable_inside is False  # the snapshot ran inside the freeze
    assert re.fullmatch(r"nightly-\d{8}T\d{6}Z", man.id)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", man.created)
    assert (
        man.consistency == "atomic"
        and "hook 'db': ran before the freeze" in man.consistency_reason
        and "hook 'wal': ran before the freeze" in man.consistency_reason
    )
    assert man.window["thawed_by"] == "controller" and man.window_s > 0
    assert [p["phase"] for p in man.phases] == [
        "plan", "check", "prepare", "before_freeze", "window", "after_thaw",
        "provider_after_thaw",
    ]  # fmt: skip
    assert man.volumes[0]["mount_point"] == fs.path and man.freeze_mode == "fifreeze"
    assert (tmp_path / "snapshots" / f"{man.id}.json").is_file()
    assert snapshots.load(man.id, tmp_path).to_dict() == man.to_dict()


def test_snapshot_failure_thaws_releases_and_cleans_up(loopfs, tmp_path):
    fs = loopfs("ext4")
    log: list[str] = []
    with pytest.raises(QuiesceError, match="array offline; the group was thawed"):
        snapshots.create(
            [fs.path], FakeProvider(log, fail="array offline"), state_dir=tmp_path,
            quiescers=[Recorder("app", log)],
        )  # fmt: skip
    assert log[-3:] == ["snapshot", "app.after_thaw(False)", "abort"]
    assert is_writable(fs.path)
    assert not (tmp_path / "snapshots").exists()


def test_hook_failure_releases_started_hooks_in_reverse(loopfs, tmp_path):
    fs = loopfs("ext4")
    log: list[str] = []
    hooks = [Recorder("a", log), Recorder("b", log, fail_before=True), Recorder("c", log)]
    with pytest.raises(RuntimeError, match="b could not quiesce"):
        snapshots.create([fs.path], FakeProvider(log), state_dir=tmp_path, quiescers=hooks)
    assert log == [
        "check", "prepare", "a.before_freeze", "b.before_freeze",
        "b.after_thaw(False)", "a.after_thaw(False)", "abort",
    ]  # fmt: skip


def test_expired_window_deletes_the_snapshot(loopfs, tmp_path):
    """The guardian thaws at the deadline while the provider is still busy: whatever it
    made is not consistent and is deleted."""
    fs = loopfs("ext4")
    log: list[str] = []
    with pytest.raises(FreezeExpired):
        snapshots.create([fs.path], FakeProvider(log, sleep=1.0), timeout=0.3, state_dir=tmp_path)
    assert log[-2:] == ["delete /nowhere/0", "abort"]
    assert is_writable(fs.path)
    assert snapshots.list_manifests(tmp_path) == []


def test_after_thaw_failure_deletes_the_snapshot(loopfs, tmp_path):
    fs = loopfs("ext4")
    log: list[str] = []
    with pytest.raises(QuiesceError, match="not completed"):
        snapshots.create([fs.path], FakeProvider(log, fail_after=True), state_dir=tmp_path)
    assert log[-3:] == ["after_thaw", "delete /nowhere/0", "abort"]
    assert snapshots.list_manifests(tmp_path) == []


def test_state_dir_on_a_group_volume_is_refused_before_anything(loopfs):
    fs = loopfs("ext4")
    log: list[str] = []
    with pytest.raises(UnsafePlan, match="state directory"):
        snapshots.create([fs.path], FakeProvider(log), state_dir=fs.mountpoint / "state")
    assert log == []
    assert not (fs.mountpoint / "state").exists()


def test_atomic_provider_is_not_frozen_and_ids_stay_unique(loopfs, tmp_path, monkeypatch):
    monkeypatch.delenv(snapshots.STATE_ENV, raising=False)
    assert snapshots.state_dir_path() == snapshots.DEFAULT_STATE_DIR
    monkeypatch.setenv(snapshots.STATE_ENV, str(tmp_path))
    fs = loopfs("ext4")
    log: list[str] = []
    prov = FakeProvider(log, FreezeMode.NONE, probe=10.0)
    first = snapshots.create([fs.path], prov, job="j")
    assert prov.writable_inside is True
    assert first.window is None and first.freeze_mode == "none"
    assert first.consistency == "atomic" and "without a freeze" in first.consistency_reason
    second = snapshots.create([fs.path], FakeProvider(log, FreezeMode.NONE), job="j")
    assert second.id != first.id
    assert [m.id for m in snapshots.list_manifests()] == [first.id, second.id]


def test_bad_names_are_refused(loopfs, tmp_path):
    fs = loopfs("ext4")
    with pytest.raises(UsageError, match="bad job name"):
        snapshots.create([fs.path], FakeProvider([]), job="../x", state_dir=tmp_path)
    with pytest.raises(UsageError, match="not a snapshot id"):
        snapshots.load("../../etc/passwd", tmp_path)
    with pytest.raises(UsageError, match="no snapshot"):
        snapshots.delete("nope", tmp_path)


def test_release_failure_keeps_the_snapshot_and_says_so(loopfs, tmp_path):
    """The snapshot is good; an application that did not resume is still an error."""
    fs = loopfs("ext4")
    log: list[str] = []
    hooks = [Recorder("a", log), Recorder("b", log, fail_after=True)]
    with pytest.raises(QuiesceError, match="b could not resume") as err:
        snapshots.create(
            [fs.path], FakeProvider(log, FreezeMode.NONE), state_dir=tmp_path, quiescers=hooks
        )
    assert log[-3:] == ["b.after_thaw(True)", "a.after_thaw(True)", "after_thaw"]
    man = err.value.manifest
    assert [m.id for m in snapshots.list_manifests(tmp_path)] == [man.id]
    assert any("b could not resume" in w for w in man.warnings)


def test_sigkill_mid_create_leaves_a_clone_that_cleanup_removes(loopfs, tmp_path):
    """A run killed inside the window: the guardian thaws, the clone file it had made is
    in the journal, and `quiesce cleanup` removes it (no manifest refers to it)."""
    pair = image_on_reflink_host(loopfs, "ext4")
    state = tmp_path / "state"
    before = set(pair.outer.mountpoint.iterdir())
    env = {**os.environ, "QUIESCE_FAULT": "window", "QUIESCE_STATE_DIR": str(state)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "quiesce", "snapshot", "create", "--provider", "reflink",
         "--job", "killed", pair.inner.path],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with open(f"/proc/{proc.pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "T":
                    break
            time.sleep(0.02)
        else:
            raise AssertionError("the controller never reached the window")
        left = set(pair.outer.mountpoint.iterdir()) - before
        assert len(left) == 1, left  # the empty clone, made in prepare
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert is_writable(pair.inner.path)
    assert snapshots.list_manifests(state) == []
    p = subprocess.run(
        [sys.executable, "-m", "quiesce", "cleanup", "--state-dir", str(state)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert set(pair.outer.mountpoint.iterdir()) == before


class _Sequential(FakeProvider):
    """Atomic per volume, not across the group, and never frozen by quiesce."""

    group_atomic: ClassVar[bool] = False


def test_a_post_thaw_hook_does_not_upgrade_a_non_atomic_group_to_application(loopfs, tmp_path):
    from quiesce.apps.hooks.commands import HookSpec, PostThawCommands, PreFreezeCommands
    from quiesce.apps.hooks.context import HookContext
    from quiesce.job.build import PhaseMarks

    a, b = loopfs("ext4"), loopfs("ext4")
    ctx = HookContext(job="t")
    post = PostThawCommands(ctx, [HookSpec("resume", ["true"])])
    man = snapshots.create(
        [a.path, b.path], _Sequential([], FreezeMode.NONE), job="grp",
        state_dir=tmp_path / "s1", quiescers=PhaseMarks().wrap([post]),
    )  # fmt: skip
    assert man.consistency == "per-volume", man.consistency_reason
    pre = PreFreezeCommands(ctx, [HookSpec("flush", ["true"])])
    man = snapshots.create(
        [a.path, b.path], _Sequential([], FreezeMode.NONE), job="grp",
        state_dir=tmp_path / "s2", quiescers=PhaseMarks().wrap([post, pre]),
    )  # fmt: skip
    # a hook cannot make volumes taken one after another one instant
    assert man.consistency == "per-volume", man.consistency_reason
    assert man.consistency_reason.endswith(
        "pre-freeze hook 'flush': ran before the freeze (a hook proves no flushed state)"
    )


def test_what_quiesces_before_the_freeze_is_named_and_a_post_thaw_hook_is_not(tmp_path):
    """The steps the consistency reason names: writers, session hooks, hook-directory
    scripts and pre-freeze hooks quiesce; post-thaw hooks (even wrapped) do not."""
    from quiesce.apps.hooks.commands import (
        HookDirectory,
        HookSpec,
        PostThawCommands,
        PreFreezeCommands,
    )
    from quiesce.apps.hooks.context import HookContext
    from quiesce.apps.hooks.session import SessionHook, SessionSpec
    from quiesce.apps.writers.sqlite import SqliteWriter
    from quiesce.job.build import GuardedWriter, PhaseMarks
    from quiesce.snapshot.quiescers import quiesces, quiescing_steps

    ctx = HookContext(job="t")
    stack = PhaseMarks().wrap([
        PostThawCommands(ctx, [HookSpec("resume", ["true"])]),
        PreFreezeCommands(ctx, [HookSpec("flush", ["true"])]),
        HookDirectory(ctx, [tmp_path / "10-app"], None),
        SessionHook(ctx, SessionSpec("lock", ["true"])),
        GuardedWriter(ctx, SqliteWriter([tmp_path / "db"], name="sqlite[0]")),
    ])  # fmt: skip
    assert [quiesces(q) for q in stack] == [False, True, True, True, True]
    assert [s for q in stack for s in quiescing_steps(q)] == [
        "pre-freeze hook 'flush'", "hook-directory script '10-app'", "session hook 'lock'",
        "writer sqlite[0]",
    ]  # fmt: skip


def test_an_unreadable_manifest_is_reported_not_dropped(tmp_path):
    """A truncated manifest beside a good one: the library names it, and `snapshot list`
    and `cleanup` show it (JSON and text) instead of acting as if it were not there."""
    import json

    from quiesce.snapshot.consistency import Consistency
    from quiesce.snapshot.manifest import Manifest

    state = tmp_path / "state"
    (state / "snapshots").mkdir(parents=True, mode=0o700)
    state.chmod(0o700)
    good = Manifest("app-1", "app", "reflink", "2026-01-01T00:00:00Z", [], [], None,
                    FreezeMode.NONE, Consistency.PER_VOLUME, "test", [])  # fmt: skip
    (state / "snapshots" / "app-1.json").write_text(good.to_json())
    (state / "snapshots" / "app-2.json").write_text('{"id": "app-2", "job"')
    for p in (state / "snapshots").iterdir():
        p.chmod(0o600)
    found = snapshots.scan_manifests(state)
    assert [m.id for m in found.manifests] == ["app-1"]
    assert [u.path.name for u in found.unreadable] == ["app-2.json"]

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "quiesce", *args, "--state-dir", str(state)],
                              capture_output=True, text=True, timeout=60, cwd="/")  # fmt: skip

    listed = cli("snapshot", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    data = json.loads(listed.stdout)
    assert [s["id"] for s in data["snapshots"]] == ["app-1"]
    assert [u["path"] for u in data["unreadable"]] == [str(state / "snapshots" / "app-2.json")]
    text = cli("snapshot", "list")
    assert "app-2.json is unreadable" in text.stderr and "app-1" in text.stdout
    cleaned = cli("cleanup", "--json")
    assert json.loads(cleaned.stdout)["unreadable"][0]["path"].endswith("app-2.json")
    assert "app-2.json is unreadable" in cli("cleanup").stderr
