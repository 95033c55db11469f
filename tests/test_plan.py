"""The planner: freeze order over loop-backing dependencies, and plans of real mounts.

The order rule comes from docs/kernel.md §5: a filesystem whose loop image lives
on another one must freeze before it and thaw after it, or the kernel deadlocks.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import LoopFS, is_writable, run
from hypothesis import given, settings
from hypothesis import strategies as st

import quiesce
from quiesce.errors import UnsafePlan, UnsupportedFilesystem, UsageError
from quiesce.freezing.plan import Plan, backing_chain, freeze_order, waves

# -- pure functions: property tests -----------------------------------------------------------


@st.composite
def forests(draw: st.DrawFn) -> tuple[dict[str, str], dict[str, int], list[str]]:
    """Random volumes, loop-backing links forming a forest, depths, and a group (in a random
    order). ``backing_of[v] = p``: v's loop image is a file on p."""
    n = draw(st.integers(1, 12))
    names = [f"{7}:{i}" for i in range(n)]
    backing_of: dict[str, str] = {}
    for i in range(1, n):
        parent = draw(st.one_of(st.none(), st.integers(0, i - 1)))
        if parent is not None:
            backing_of[names[i]] = names[parent]
    depth = {v: draw(st.integers(1, 6)) for v in names}
    group = draw(st.lists(st.sampled_from(names), min_size=1, unique=True))
    return backing_of, depth, group


def ancestors(v: str, backing_of: dict[str, str]) -> list[str]:
    """Every volume below ``v``, walked independently of the code under test."""
    out = []
    while v in backing_of:
        v = backing_of[v]
        out.append(v)
    return out


def must_precede_of(group: list[str], backing_of: dict[str, str]) -> dict[str, set[str]]:
    """As make_plan builds it: each member before every member on its backing chain."""
    members = set(group)
    return {d: {b for b in backing_chain(d, backing_of) if b in members} for d in group}


@given(forests())
def test_backing_chain_is_the_transitive_backing_list(
    forest: tuple[dict[str, str], dict[str, int], list[str]],
) -> None:
    backing_of, _, _ = forest
    for v in {*backing_of, *backing_of.values()}:
        assert backing_chain(v, backing_of) == ancestors(v, backing_of)


@given(forests())
def test_freeze_order_puts_loop_images_before_their_backing_volumes(
    forest: tuple[dict[str, str], dict[str, int], list[str]],
) -> None:
    backing_of, depth, group = forest
    order = freeze_order(group, must_precede_of(group, backing_of), depth)
    assert sorted(order) == sorted(group) and len(order) == len(group)
    pos = {v: i for i, v in enumerate(order)}
    for v in group:
        # Transitively, also through volumes that are not in the group.
        for below in ancestors(v, backing_of):
            if below in pos:
                assert pos[v] < pos[below], (v, below, order)


@given(forests())
def test_freeze_order_is_deepest_first_when_unconstrained(
    forest: tuple[dict[str, str], dict[str, int], list[str]],
) -> None:
    _, depth, group = forest
    expected = sorted(group, key=lambda v: (-depth[v], group.index(v)))
    assert freeze_order(group, {}, depth) == expected


@given(st.dictionaries(st.integers(0, 8).map(str), st.integers(0, 8).map(str)))
def test_backing_chain_terminates_on_cycles(backing_of: dict[str, str]) -> None:
    for v in backing_of:
        chain = backing_chain(v, backing_of)
        assert v not in chain
        assert len(chain) == len(set(chain))


def test_freeze_order_examples() -> None:
    # Unconstrained: deepest first. Constrained: a before b although b is deeper.
    assert freeze_order(["a", "b", "c"], {}, {"a": 2, "b": 4, "c": 3}) == ["b", "c", "a"]
    assert freeze_order(["a", "b", "c"], {"a": {"b"}}, {"a": 1, "b": 5, "c": 3}) == [
        "c",
        "a",
        "b",
    ]
    with pytest.raises(ValueError, match="cycle"):
        freeze_order(["a", "b"], {"a": {"b"}, "b": {"a"}}, {})


# -- plans of real mounts ---------------------------------------------------------------------


def test_bind_mount_and_original_are_one_member(loopfs) -> None:
    fs: LoopFS = loopfs("ext4")
    bind = loopfs.bind(fs.mountpoint)
    with quiesce.make_plan([str(bind), fs.path]) as plan:
        assert len(plan.members) == 1
        member = plan.members[0]
        assert member.paths == [str(bind), fs.path]
        assert member.volume.source == fs.device
        assert member.skip is None
        plan.check()
    assert is_writable(fs.path)  # planning touches nothing


def test_read_only_mount_is_skipped_with_a_warning(loopfs) -> None:
    fs: LoopFS = loopfs("ext4", mount_opts="ro")
    with quiesce.make_plan([fs.path]) as plan:
        (member,) = plan.members
        assert member.skip and "read-only" in member.skip
        assert any(fs.path in w and "read-only" in w for w in plan.warnings)
        assert plan.to_dict()["order"][0]["action"] == "skip"  # type: ignore[index]


def _nested(loopfs) -> tuple[LoopFS, LoopFS]:
    outer: LoopFS = loopfs("xfs")
    inner: LoopFS = loopfs("ext4", image_dir=outer.mountpoint)
    return outer, inner


@pytest.mark.parametrize("given_order", ["outer-first", "inner-first"])
def test_nested_loop_inner_freezes_first(loopfs, given_order: str) -> None:
    outer, inner = _nested(loopfs)
    paths = [outer.path, inner.path]
    if given_order == "inner-first":
        paths.reverse()
    with quiesce.make_plan(paths) as plan:
        assert [m.name for m in plan.members] == [inner.path, outer.path]
        inner_dev, outer_dev = (m.volume.dev for m in plan.members)
        assert plan.must_precede[inner_dev] == {outer_dev}
        assert plan.inners(outer_dev) == {inner_dev}
        assert plan.warnings == []


def test_loop_image_on_group_volume_outside_the_group_warns(loopfs) -> None:
    outer, inner = _nested(loopfs)
    with quiesce.make_plan([outer.path]) as plan:
        assert [m.name for m in plan.members] == [outer.path]
        (warning,) = plan.warnings
        assert inner.path in warning and outer.path in warning
        assert "not in the group" in warning
        plan.check()  # a warning, not a refusal


def test_deeper_mount_freezes_first(loopfs) -> None:
    parent: LoopFS = loopfs("ext4")
    child_dir = parent.mountpoint / "child"
    child_dir.mkdir()
    child: LoopFS = loopfs("ext4")
    # Mount the second filesystem again, deeper, on a directory of the first.
    run("mount", child.device, str(child_dir))
    try:
        with quiesce.make_plan([parent.path, str(child_dir)]) as plan:
            assert [m.paths for m in plan.members] == [[str(child_dir)], [parent.path]]
    finally:
        run("umount", str(child_dir))


def test_unfreezable_and_unsafe_plans_are_refused(loopfs, tmp_path: Path) -> None:
    with pytest.raises(UnsupportedFilesystem, match="tmpfs"):
        quiesce.make_plan([str(loopfs.tmpfs())])
    with pytest.raises(UsageError):
        quiesce.make_plan([])
    # Planning / only opens an fd; check() must refuse it.
    with quiesce.make_plan(["/"]) as plan:
        assert {h.kind for h in plan.hazards} >= {"root"}
        with pytest.raises(UnsafePlan, match="root filesystem"):
            plan.check()


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 8).flatmap(
        lambda n: st.tuples(
            st.just(n),
            st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), max_size=12),
        )
    )
)
def test_waves_keep_every_order_constraint_and_nothing_more(case) -> None:
    """A volume freezes one wave after the last volume that must precede it (a loop
    image's fs before the fs holding the image); with no constraint, in the first wave."""
    from types import SimpleNamespace

    n, edges = case
    devs = [f"7:{i}" for i in range(n)]
    must = {}
    for a, b in edges:
        if a < b:  # plan order is topological: a before b
            must.setdefault(devs[a], set()).add(devs[b])
    plan = Plan(members=[], must_precede=must)
    members = [SimpleNamespace(volume=SimpleNamespace(dev=d)) for d in devs]
    got = waves(plan, members)  # type: ignore[arg-type]
    level = {k: w for w, ks in enumerate(got) for k in ks}
    assert sorted(level) == list(range(n))  # every volume exactly once
    assert all(ks == sorted(ks) for ks in got)  # plan order kept inside a wave
    for a, b in edges:
        if a < b:
            assert level[a] < level[b]
    for k in range(n):  # as early as the constraints allow
        preds = [a for a, b in edges if b == k and a < k]
        assert level[k] == (max(level[a] for a in preds) + 1 if preds else 0)
