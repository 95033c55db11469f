"""The ``qemu`` provider and qcow2 backing chains (providers/chain.py), without a guest.

A real chain (``qemu-img create -b``: raw base, qcow2 middle, qcow2 top, data written into
each layer with ``qemu-io``) on an XFS reflink loop filesystem. The provider's freeze goes
through an agent (tests/helpers/fakeqga.py, here freezing nothing: no guest runs on these
images); what is tested is the chain: every file cloned, each clone pointing at the clone
below, the snapshot independent of the live files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers.fakeqga import FakeAgent
from helpers.snaptools import sh

from quiesce.errors import UsageError
from quiesce.providers.options import QemuOptions
from quiesce.providers.qemu import QemuProvider

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(
        shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
        reason="qemu-img/qemu-io are not installed (Debian: apt-get install qemu-utils)",
    ),
]


def _write(image: Path, fmt: str, pattern: int, offset_mb: int) -> None:
    sh("qemu-io", "-f", fmt, "-c", f"write -P {pattern} {offset_mb}M 1M", str(image))


def _chain(d: Path, name: str = "top.qcow2") -> tuple[Path, Path, Path]:
    """base.raw <- mid.qcow2 (relative backing name) <- top (absolute backing name)."""
    base, mid, top = d / "base.raw", d / "mid.qcow2", d / name
    if not base.exists():
        sh("qemu-img", "create", "-q", "-f", "raw", str(base), "16M")
        _write(base, "raw", 0x11, 0)
        sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", str(mid))
        _write(mid, "qcow2", 0x22, 1)
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(mid), "-F", "qcow2", str(top))
    _write(top, "qcow2", 0x33, 2)
    return base, mid, top


def _provider(agent: Path, images: list[Path], dest: Path) -> QemuProvider:
    return QemuProvider(
        QemuOptions.model_validate(
            {"guests": [{"name": "vm1", "agent": agent, "images": images}], "dest": dest}
        )
    )


def _info(image: str) -> list[dict[str, str]]:
    out = sh("qemu-img", "info", "--backing-chain", "--output=json", image).stdout
    return list(json.loads(out))


def test_a_qcow2_chain_is_cloned_whole_and_rebased_onto_its_clones(loopfs, tmp_path):
    host = loopfs("xfs")
    d = host.mountpoint / "vms"
    d.mkdir()
    base, _mid, top = _chain(d)
    top2 = _chain(d, "top2.qcow2")[2]  # a second image over the same middle and base
    snaps_dir = host.mountpoint / "snaps"
    snaps_dir.mkdir()
    expected = tmp_path / "expected.raw"  # the guest's disk as it was: flattened
    sh("qemu-img", "convert", "-O", "raw", str(top), str(expected))
    agent = FakeAgent(tmp_path / "qga.sock", [])
    try:
        p = _provider(agent.path, [top, top2], snaps_dir)
        p.check([])
        p.prepare([], "s1")
        snaps = p.snapshot([])
        p.after_thaw(snaps)
    finally:
        agent.close()
    made = sorted(x.name for x in snaps_dir.iterdir())
    # each file once: the two tops, the shared middle and base
    assert made == sorted(
        ["s1--vm1--top.qcow2", "s1--vm1--top2.qcow2", "s1--vm1--mid.qcow2", "s1--vm1--base.raw"]
    ), made
    snap = snaps[0]
    chain = _info(snap.location)
    assert [Path(c["filename"]).name for c in chain] == [
        "s1--vm1--top.qcow2", "s1--vm1--mid.qcow2", "s1--vm1--base.raw",
    ]  # fmt: skip
    assert all(Path(c["filename"]).parent == snaps_dir for c in chain)
    # named relative to the clones' directory: the snapshot's files can move together
    assert [c.get("backing-filename") for c in chain] == [
        "s1--vm1--mid.qcow2", "s1--vm1--base.raw", None,
    ]  # fmt: skip
    assert [c["format"] for c in chain] == ["qcow2", "qcow2", "raw"]
    assert snap.extra["backing"] == [str(snaps_dir / "s1--vm1--mid.qcow2"),
                                     str(snaps_dir / "s1--vm1--base.raw")]  # fmt: skip
    assert sh("qemu-img", "compare", str(top), snap.location, check=False).returncode == 0

    # the live chain changes (the guest writes on, someone commits into the base): the
    # snapshot still reads the disk as it was; the source no longer does (the control)
    _write(top, "qcow2", 0x44, 3)
    _write(base, "raw", 0x55, 4)
    assert sh("qemu-img", "compare", str(expected), snap.location, check=False).returncode == 0
    assert sh("qemu-img", "compare", str(expected), str(top), check=False).returncode == 1

    # deleting the snapshots removes every clone of the chain
    for s in snaps:
        p.delete(s)
    assert list(snaps_dir.iterdir()) == []


def test_a_backing_file_off_the_clone_filesystem_is_refused_at_check(loopfs, tmp_path):
    host = loopfs("xfs")
    elsewhere = tmp_path / "other"  # not on the XFS loop filesystem
    elsewhere.mkdir()
    base = _chain(elsewhere)[0]
    top = host.mountpoint / "top.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(top))
    agent = FakeAgent(tmp_path / "qga.sock", [])
    try:
        with pytest.raises(UsageError, match="a reflink clone cannot reach it") as e:
            _provider(agent.path, [top], host.mountpoint).check([])
        assert str(base) in e.value.message and agent.calls == []
    finally:
        agent.close()
