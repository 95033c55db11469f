from conftest import Writer, is_writable

import quiesce


def test_freeze_blocks_writer_and_thaws(loopfs, writer_factory):
    fs = loopfs("ext4")
    w: Writer = writer_factory(fs.path)
    with quiesce.freeze(fs.path, timeout=10) as window:
        assert not is_writable(fs.path, timeout=0.3)
    assert is_writable(fs.path)
    summary = w.stop()
    assert summary["errors"] == 0
    w.verify(summary["acked"])
    assert window.thawed_by == "controller"
    assert window.duration and window.duration >= 0.3
