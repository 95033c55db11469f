"""The mount model: mountinfo parsing (unit + property tests) and path resolution.

The property tests render :class:`Mount` records the way the kernel's ``show_mountinfo``
does (``mangle()`` escapes space, tab, newline and backslash in paths, fstype and source;
``seq_show_option`` also escapes commas in option values) and parse them back.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
from conftest import LoopFS
from hypothesis import given, settings
from hypothesis import strategies as st

from quiesce.errors import NotADirectory, NotAMountRoot, PathNotFound
from quiesce.host.mounts import (
    Mount,
    MountinfoError,
    MountTable,
    escape,
    loop_backing_file,
    parse_mountinfo,
    parse_mountinfo_line,
    resolve,
    unescape,
)

# -- unit tests on real-looking lines ------------------------------------------------------

NO_OPTIONAL = "22 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard"
ONE_OPTIONAL = "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue"
SEVERAL_OPTIONAL = (
    "61 22 7:3 / /srv/data rw,nosuid,nodev shared:5 master:3 propagate_from:2 unbindable"
    " - xfs /dev/loop3 rw,attr2,inode64,logbufs=8,noquota"
)
BTRFS_SUBVOL = (
    "84 22 0:39 /sv1 /mnt/sv rw,relatime shared:40 - btrfs /dev/loop7"
    " rw,space_cache=v2,subvolid=256,subvol=/sv1"
)
BTRFS_TOP = (
    "83 22 0:39 / /mnt/top rw,relatime shared:39 - btrfs /dev/loop7"
    " rw,space_cache=v2,subvolid=5,subvol=/"
)
ESCAPED = (
    r"90 22 7:5 /dir\040with\011tab\012nl\134bs /mnt/my\040disk\134x rw - ext4"
    r" /dev/loop5 ro,data=ordered"
)


def test_line_without_optional_fields() -> None:
    m = parse_mountinfo_line(NO_OPTIONAL)
    assert (m.mount_id, m.parent_id, m.dev) == (22, 1, "254:0")
    assert (m.root, m.mount_point) == ("/", "/")
    assert m.options == ("rw", "relatime")
    assert m.optional == ()
    assert (m.fstype, m.source) == ("ext4", "/dev/vda")
    assert m.super_options == ("rw", "discard")
    assert not m.read_only_sb


def test_line_with_one_optional_field() -> None:
    m = parse_mountinfo_line(ONE_OPTIONAL)
    assert m.optional == ("master:1",)
    assert (m.root, m.mount_point, m.fstype, m.source) == ("/mnt1", "/mnt2", "ext3", "/dev/root")
    assert m.super_option("errors") == "continue"
    assert m.super_option("missing") is None


def test_line_with_several_optional_fields() -> None:
    m = parse_mountinfo_line(SEVERAL_OPTIONAL)
    assert m.optional == ("shared:5", "master:3", "propagate_from:2", "unbindable")
    assert m.fstype == "xfs"
    assert m.options == ("rw", "nosuid", "nodev")
    assert m.super_option("logbufs") == "8"


def test_escapes_in_root_and_mount_point() -> None:
    m = parse_mountinfo_line(ESCAPED)
    assert m.root == "/dir with\ttab\nnl\\bs"
    assert m.mount_point == "/mnt/my disk\\x"
    assert m.read_only_sb  # "ro" in the super options, not in the per-mount options


def test_btrfs_subvolume_root_and_super_options() -> None:
    m = parse_mountinfo_line(BTRFS_SUBVOL)
    assert m.root == "/sv1"
    assert m.super_option("subvol") == "/sv1"
    assert m.super_option("subvolid") == "256"


def test_super_option_value_with_escaped_comma() -> None:
    line = r"70 22 0:50 / /merged rw - overlay overlay rw,lowerdir=/a\054b,upperdir=/u"
    m = parse_mountinfo_line(line)
    assert m.super_option("lowerdir") == "/a,b"
    assert m.super_option("upperdir") == "/u"


def test_table_groups_bind_and_subvolume_mounts_by_superblock() -> None:
    bind = "85 22 0:39 /sv1 /a rw,relatime shared:40 - btrfs /dev/loop7 rw,subvol=/sv1"
    table = MountTable(parse_mountinfo("\n".join([NO_OPTIONAL, BTRFS_SUBVOL, BTRFS_TOP, bind])))
    assert set(table.volumes) == {"254:0", "0:39"}
    vol = table.volumes["0:39"]
    assert [m.mount_id for m in vol.mounts] == [84, 83, 85]
    # The natural name mounts the fs root, even though "/a" is a shorter path.
    assert vol.mount_point == "/mnt/top"
    assert table.depth(vol) == len(Path("/mnt/top").parts) > table.depth(table.volumes["254:0"])
    assert table.volumes["254:0"].is_root_fs
    assert not vol.is_root_fs
    assert table.volume_of_mount_id(85) is vol
    assert table.volume_of_mount_id(999) is None


@pytest.mark.parametrize(
    "line",
    [
        "",
        "22 1 254:0 / / rw,relatime ext4 /dev/vda rw",  # no separator
        "x 1 254:0 / / rw - ext4 /dev/vda rw",  # bad mount id
        "22 y 254:0 / / rw - ext4 /dev/vda rw",  # bad parent id
        "22 1 254-0 / / rw - ext4 /dev/vda rw",  # bad major:minor
        "22 1 254:0 / / rw - ext4",  # no source
        "22 1 254:0 / - ext4 /dev/vda rw",  # too few fields before the separator
    ],
)
def test_malformed_lines_raise(line: str) -> None:
    with pytest.raises(MountinfoError):
        parse_mountinfo_line(line)


# -- property tests --------------------------------------------------------------------------

option_token = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_=.", min_size=1, max_size=12)
optional_field = st.one_of(
    st.builds(lambda k, n: f"{k}:{n}", st.sampled_from(["shared", "master", "propagate_from"]),
              st.integers(1, 10_000)),
    st.just("unbindable"),
)  # fmt: skip

LINE_BREAKS = "\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"  # str.splitlines() splits here
any_char = st.characters(exclude_categories=["Cs"])
no_line_breaks = st.characters(exclude_categories=["Cs"], exclude_characters=LINE_BREAKS)


def mounts_of(chars: st.SearchStrategy[str]) -> st.SearchStrategy[Mount]:
    """Mount records whose free-text fields are drawn from ``chars``."""

    def text(min_size: int = 0, max_size: int | None = None) -> st.SearchStrategy[str]:
        return st.text(alphabet=chars, min_size=min_size, max_size=max_size)

    return st.builds(
        Mount,
        mount_id=st.integers(0, 2**31),
        parent_id=st.integers(0, 2**31),
        dev=st.builds(lambda a, b: f"{a}:{b}", st.integers(0, 4095), st.integers(0, 2**20)),
        root=text(1),
        mount_point=text(1),
        options=st.lists(option_token, min_size=1, max_size=5).map(tuple),
        optional=st.lists(optional_field, max_size=4).map(tuple),
        fstype=text(1, 20),
        source=text(0, 30),
        super_options=st.builds(
            lambda first, rest: (first, *rest),
            st.sampled_from(["rw", "ro"]),
            st.lists(text(1, 20), max_size=5),
        ),
    )


mounts = mounts_of(any_char)


def render(m: Mount) -> str:
    """One mountinfo line for ``m``, escaped as the kernel writes it."""

    def opt(o: str) -> str:
        return escape(o).replace(",", "\\054")

    fields = [
        str(m.mount_id), str(m.parent_id), m.dev, escape(m.root), escape(m.mount_point),
        ",".join(m.options), *m.optional, "-", escape(m.fstype), escape(m.source),
        ",".join(opt(o) for o in m.super_options),
    ]  # fmt: skip
    return " ".join(fields)


@given(st.text())
def test_escape_unescape_round_trip(text: str) -> None:
    escaped = escape(text)
    assert unescape(escaped) == text
    assert not set(escaped) & {" ", "\t", "\n"}


@given(mounts)
def test_rendered_mount_parses_back_identically(m: Mount) -> None:
    assert parse_mountinfo_line(render(m)) == m
    assert parse_mountinfo_line(render(m) + "\n") == m


@given(st.lists(mounts_of(no_line_breaks), max_size=5))
def test_whole_mountinfo_parses_back(records: list[Mount]) -> None:
    assert parse_mountinfo("\n".join(render(m) for m in records) + "\n") == records


@given(mounts, st.data())
def test_truncated_lines_raise(m: Mount, data: st.DataObject) -> None:
    """Cutting a line anywhere before its source field leaves no valid line."""
    tokens = render(m).split(" ")
    sep = tokens.index("-", 6)
    cut = data.draw(st.integers(0, sep + 1), label="tokens kept")
    with pytest.raises(MountinfoError):
        parse_mountinfo_line(" ".join(tokens[:cut]))


@given(mounts, st.sampled_from(["mount_id", "parent_id", "dev", "separator"]), st.text(
    alphabet="abc:-/xyz", min_size=1, max_size=5))  # fmt: skip
def test_corrupted_fields_raise(m: Mount, which: str, junk: str) -> None:
    tokens = render(m).split(" ")
    if which == "separator":
        sep = tokens.index("-", 6)
        tokens[sep] = "+"
        tokens = [t for t in tokens if t != "-"]
    else:
        tokens[["mount_id", "parent_id", "dev"].index(which)] = junk
    with pytest.raises(MountinfoError):
        parse_mountinfo_line(" ".join(tokens))


@settings(max_examples=300)
@given(st.text(alphabet=st.sampled_from(list("0123456789:/- ,abcrw\\")), max_size=60))
def test_arbitrary_text_parses_or_raises_mountinfo_error(line: str) -> None:
    with contextlib.suppress(MountinfoError):
        parse_mountinfo_line(line)


# -- odd bytes in mount points ---------------------------------------------------------------


@pytest.mark.parametrize("odd", ["\r", "\x1c", "\x85", "\u2028"])
def test_mountinfo_with_line_separator_like_char_in_path(odd: str) -> None:
    records = [
        parse_mountinfo_line(NO_OPTIONAL),
        parse_mountinfo_line(f"63 22 0:40 / /tmp/a{odd}b rw - tmpfs tmpfs rw"),
    ]
    text = "\n".join(render(m) for m in records) + "\n"
    assert parse_mountinfo(text) == records


@pytest.mark.parametrize("raw", [b"/tmp/a\rb", b"/tmp/lat\xe9"])
def test_mount_table_reads_any_mount_point_bytes(tmp_path: Path, raw: bytes) -> None:
    info = tmp_path / "mountinfo"
    info.write_bytes(NO_OPTIONAL.encode() + b"\n63 22 0:40 / " + raw + b" rw - tmpfs tmpfs rw\n")
    table = MountTable.read(str(info))
    assert len(table.mounts) == 2
    assert os.fsencode(table.by_id[63].mount_point) == raw


# -- the live table and path resolution on real loop filesystems ----------------------------


def test_loop_backing_file_of_a_real_loop_device(loopfs) -> None:
    fs: LoopFS = loopfs("ext4")
    assert loop_backing_file(fs.device) == str(fs.image)
    assert loop_backing_file("tmpfs") is None
    assert loop_backing_file("/dev/no-such-device") is None


def test_resolve_real_mounts(loopfs, tmp_path: Path) -> None:
    fs: LoopFS = loopfs("ext4")
    (fs.mountpoint / "sub").mkdir()
    (fs.mountpoint / "file").write_text("x")
    bind = loopfs.bind(fs.mountpoint)
    table = MountTable.read()

    target = resolve(fs.path, table)
    other = resolve(str(bind), table)
    try:
        assert target.mount.mount_point == fs.path
        assert target.volume.source == fs.device
        assert target.volume.fstype == "ext4"
        assert other.volume.dev == target.volume.dev
        assert other.mount.mount_id != target.mount.mount_id
    finally:
        target.close()
        other.close()

    with pytest.raises(NotAMountRoot, match="not a mount point"):
        resolve(str(fs.mountpoint / "sub"), table)
    with pytest.raises(NotADirectory):
        resolve(str(fs.mountpoint / "file"), table)
    with pytest.raises(PathNotFound):
        resolve(str(tmp_path / "missing"), table)
