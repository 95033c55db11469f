"""Who blocks a freeze (host/blockers.py), against a real splice holder as uid 65534.

The holder splices from an empty pipe into a file on a test filesystem while holding the
pipe's write end: the kernel's write level stays taken, and a FIFREEZE started from a
separate process waits for it in the kernel (D state). The test only watches /proc; the
holder is always ended in teardown, so the freeze completes, and it is thawed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from conftest import thaw_quietly
from helpers.stuck import (
    PendingFreeze,
    SpliceHolder,
    nobody,
    probe_frozen,
    state_of,
    wait_for,
)

from quiesce.host.blockers import end_blockers, find_blockers
from quiesce.host.mounts import MountTable


@pytest.fixture
def stuck(loopfs) -> Iterator[dict]:
    """A filesystem, its dev, and a place to register holders and freezes to end."""
    fs = loopfs("ext4")
    dev = MountTable.read().volume_of_path(fs.path).dev
    made: dict = {"fs": fs, "dev": dev, "holders": [], "freezes": []}
    try:
        yield made
    finally:
        for h in made["holders"]:
            h.end()
        for f in made["freezes"]:
            with contextlib.suppress(Exception):
                f.proc.wait(timeout=30)
        thaw_quietly(fs.path)


def test_a_splice_holder_is_found_with_what_it_waits_in(stuck) -> None:
    fs, dev = stuck["fs"], stuck["dev"]
    h = SpliceHolder(fs.mountpoint / "victim")
    stuck["holders"].append(h)
    [b] = [b for b in find_blockers(dev) if b.pid == h.pid]
    assert b.uid == 65534 and b.uids == (65534,) * 4
    assert b.comm.startswith("python")
    assert "splice_holder.py" in b.cmdline
    assert b.state == "S"  # interruptible: a signal ends it
    assert b.in_flight == (f"splice by tid {h.pid} on {fs.mountpoint / 'victim'}",)
    assert b.holds_write and not b.waits_for_freeze
    assert str(fs.mountpoint / "victim") in b.files
    assert "pid" in b.describe() and "uid 65534" in b.describe()
    # the negative control: the same filesystem's dev number, another filesystem's view
    other = stuck["dev"].split(":")[0] + ":99999"
    assert [x for x in find_blockers(other) if x.pid == h.pid] == []


def test_a_pending_freeze_shows_its_holder_and_the_writers_it_stalls(stuck, loopfs) -> None:
    fs, dev = stuck["fs"], stuck["dev"]
    (fs.mountpoint / "w").write_text("")
    h = SpliceHolder(fs.mountpoint / "victim")
    stuck["holders"].append(h)
    freeze = PendingFreeze(fs.path)
    stuck["freezes"].append(freeze)
    # a writer that starts now waits for the freeze (D, percpu_rwsem_wait): a victim
    writer = subprocess.Popen(
        [sys.executable, "-c", "import os,sys; fd=os.open(sys.argv[1], os.O_WRONLY);"
         "print('open', flush=True); os.write(fd, b'x')", str(fs.mountpoint / "w")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert writer.stdout.readline().startswith("open")
        wait_for(lambda: state_of(writer.pid) == "D", what="the late writer to block")
        found = {b.pid: b for b in find_blockers(dev)}
        assert found[h.pid].in_flight and found[h.pid].holds_write
        late = found[writer.pid]
        assert late.d_threads == (writer.pid,) and late.waits_for_freeze
        assert not late.holds_write
        assert next(iter(found)) == h.pid  # in-flight writers first
        assert freeze.pending()
    finally:
        h.end()
        err, _ = freeze.result()
        assert err == 0  # the freeze completed once the splice ended
        thaw_quietly(fs.path)
        writer.wait(timeout=30)


def test_end_blockers_ends_the_unprivileged_holder_and_the_freeze_completes(stuck) -> None:
    fs, dev = stuck["fs"], stuck["dev"]
    h = SpliceHolder(fs.mountpoint / "victim")
    stuck["holders"].append(h)
    root_h = SpliceHolder(fs.mountpoint / "roots", uid=0)  # root's: never touched
    stuck["holders"].append(root_h)
    freeze = PendingFreeze(fs.path)
    stuck["freezes"].append(freeze)
    lines: list[str] = []
    # younger than the bound: spared
    assert end_blockers(dev, older_than=3600, log=lines.append) == []
    assert h.proc.poll() is None and lines == []
    t0 = time.monotonic()
    ended = end_blockers(dev, older_than=0.0, log=lines.append, exclude={freeze.pid})
    assert [b.pid for b in ended] == [h.pid]
    assert h.proc.wait(timeout=10) == -signal.SIGKILL  # the splice is interruptible
    assert len(lines) == 1 and f"pid {h.pid} (uid 65534, python" in lines[0]
    assert "splice" in lines[0] and dev in lines[0]
    assert root_h.proc.poll() is None  # root's holder still splicing...
    assert freeze.pending()  # ...so the freeze still waits: root's write is never ended
    root_h.end()
    err, _ = freeze.result()
    assert err == 0 and time.monotonic() - t0 < 30
    assert probe_frozen(fs.path)  # EBUSY: the freeze completed
    thaw_quietly(fs.path)
    assert not probe_frozen(fs.path)


def test_end_blockers_spares_writers_that_only_wait_for_the_freeze(stuck) -> None:
    """A writer blocked *by* the freeze (D in percpu_rwsem_wait) does not hold it."""
    fs, dev = stuck["fs"], stuck["dev"]
    fd = os.open(fs.mountpoint / "f", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o666)
    freeze = PendingFreeze(fs.path, wait_blocked=False)
    assert freeze.result()[0] == 0
    stuck["freezes"].append(freeze)
    code = "import os,sys; print('o', flush=True); os.write(int(sys.argv[1]), b'x')"
    w = subprocess.Popen(
        [*nobody(), sys.executable, "-c", code, str(fd)],
        stdout=subprocess.PIPE, text=True, pass_fds=[fd],
    )  # fmt: skip
    os.close(fd)
    try:
        assert w.stdout.readline().startswith("o")
        wait_for(lambda: state_of(w.pid) == "D", what="the writer to block on the freeze")
        assert end_blockers(dev, older_than=0.0, log=lambda _l: None) == []
        assert w.poll() is None
    finally:
        thaw_quietly(fs.path)
        assert w.wait(timeout=30) == 0


def test_freeze_with_end_blockers_after_ends_the_holder_and_says_so(stuck) -> None:
    """`quiesce freeze --end-blockers-after 1`: the uid-65534 splice holder that kept the
    FIFREEZE waiting is ended past the bound, logged, and the freeze completes (EBUSY)."""
    fs = stuck["fs"]
    h = SpliceHolder(fs.mountpoint / "victim")
    stuck["holders"].append(h)
    p = subprocess.run(
        [sys.executable, "-m", "quiesce", "freeze", "--timeout", "60", "--lease", "0",
         "--end-blockers-after", "1", fs.path],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    try:
        assert p.returncode == 0, p.stderr
        assert h.proc.wait(timeout=10) == -signal.SIGKILL
        assert f"ended pid {h.pid} (uid 65534, python" in p.stderr
        assert probe_frozen(fs.path)
    finally:
        subprocess.run([sys.executable, "-m", "quiesce", "thaw", fs.path], capture_output=True)
    assert not probe_frozen(fs.path)


def test_end_blockers_after_must_be_positive(stuck) -> None:
    p = subprocess.run(
        [sys.executable, "-m", "quiesce", "exec", "--end-blockers-after", "0", stuck["fs"].path,
         "--", "true"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert p.returncode == 2 and "--end-blockers-after must be" in p.stderr
    assert not probe_frozen(stuck["fs"].path)
