"""The Python examples in README.md and docs/ use the real API: every ``quiesce`` name they
import or reach resolves, and every call to one of them passes arguments its signature
accepts. (TOML examples are loaded by test_job_config.py.)
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.M | re.S)


def _blocks() -> list[tuple[str, int, str]]:
    out = []
    for doc in DOCS:
        for i, m in enumerate(_BLOCK.finditer(doc.read_text())):
            out.append((doc.name, i, m.group(1)))
    return out


def _resolve(dotted: str) -> Any:
    """``quiesce.snapshot.create`` -> the object, importing as needed."""
    parts = dotted.split(".")
    obj: Any = importlib.import_module(parts[0])
    for part in parts[1:]:
        obj = getattr(obj, part)
    return obj


class _Names(ast.NodeVisitor):
    """Local names bound to quiesce objects, and the calls made through them."""

    def __init__(self) -> None:
        self.bound: dict[str, str] = {}
        self.calls: list[tuple[str, ast.Call]] = []

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            if a.name.split(".")[0] == "quiesce":
                self.bound[(a.asname or a.name).split(".")[0]] = (a.asname and a.name) or "quiesce"

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if (node.module or "").split(".")[0] == "quiesce":
            for a in node.names:
                self.bound[a.asname or a.name] = f"{node.module}.{a.name}"

    def dotted(self, node: ast.AST) -> str | None:
        if isinstance(node, ast.Name):
            return self.bound.get(node.id)
        if isinstance(node, ast.Attribute):
            base = self.dotted(node.value)
            return f"{base}.{node.attr}" if base else None
        return None

    def visit_Call(self, node: ast.Call) -> None:
        name = self.dotted(node.func)
        if name:
            self.calls.append((name, node))
        self.generic_visit(node)


BLOCKS = _blocks()


def test_the_docs_have_python_examples():
    assert any(doc == "README.md" for doc, _, _ in BLOCKS)


@pytest.mark.parametrize(("doc", "i", "code"), BLOCKS, ids=[f"{d}#{i}" for d, i, _ in BLOCKS])
def test_example_uses_the_real_api(doc: str, i: int, code: str):
    tree = ast.parse(code)
    names = _Names()
    names.visit(tree)
    for dotted in set(names.bound.values()):
        _resolve(dotted)  # an import that would fail
    for dotted, call in names.calls:
        obj = _resolve(dotted)
        try:
            sig = inspect.signature(obj)
        except (TypeError, ValueError):
            continue
        args = [ast.Constant(None)] * len(call.args)
        kwargs = {k.arg: None for k in call.keywords if k.arg}
        try:
            sig.bind(*args, **kwargs)
        except TypeError as e:
            pytest.fail(f"{doc} example {i}: {dotted}(...) does not fit its signature: {e}")


def test_the_checker_catches_a_wrong_keyword():
    """Negative control: a keyword the function does not take is caught."""
    names = _Names()
    names.visit(ast.parse("import quiesce\nquiesce.snapshot.create(['/x'], 'btrfs', jobb='a')"))
    ((dotted, call),) = names.calls
    sig = inspect.signature(_resolve(dotted))
    with pytest.raises(TypeError):
        sig.bind(*[None] * len(call.args), **{k.arg: None for k in call.keywords if k.arg})


def _subset(small: Any, big: Any, where: str) -> None:
    """``small`` is ``big`` with some keys (and list items, matched by name) left out."""
    if isinstance(small, dict):
        assert isinstance(big, dict), where
        for k, v in small.items():
            assert k in big, f"{where}.{k} is not in the tested playbook"
            _subset(v, big[k], f"{where}.{k}")
    elif isinstance(small, list) and small and all(isinstance(x, dict) for x in small):
        assert isinstance(big, list), where
        by_name = {x.get("name"): x for x in big if isinstance(x, dict)}
        for x in small:
            assert x.get("name") in by_name, f"{where}: no task named {x.get('name')!r}"
            _subset(x, by_name[x.get("name")], f"{where}[{x.get('name')}]")
    else:
        assert small == big, f"{where}: {small!r} != {big!r}"


def test_the_fleet_playbook_in_the_docs_is_part_of_the_tested_one():
    """docs/fleet.md's playbook parses and is a subset of the collection's group.yml,
    the file tests/test_fleet_group.py runs against the fleet ground."""
    yaml = pytest.importorskip("yaml")
    blocks = re.findall(
        r"^```yaml\n(.*?)^```", (ROOT / "docs" / "fleet.md").read_text(), re.M | re.S
    )
    assert len(blocks) == 1
    doc = yaml.safe_load(blocks[0])
    tested = ROOT / "ansible_collections/quiesce/fleet/playbooks/group.yml"
    _subset(doc, yaml.safe_load(tested.read_text()), "play")
    assert "group.yml" in (ROOT / "tests" / "test_fleet_group.py").read_text()


def test_the_fleet_defaults_agree_in_code_module_playbook_and_docs():
    """hold, attempts, deadline, lease and lead: the coordinator's defaults are the group
    module's, the playbook's, and the ones docs/fleet.md states."""
    from quiesce.integrations.fleet.coordinator import Group

    sig = inspect.signature(Group).parameters
    coll = ROOT / "ansible_collections/quiesce/fleet"
    module = (coll / "plugins/modules/group.py").read_text()
    play = (coll / "playbooks/group.yml").read_text()
    docs = (ROOT / "docs" / "fleet.md").read_text()
    for key, param in [("hold", "hold_s"), ("attempts", "attempts"), ("deadline", "deadline_s"),
                       ("lease", "lease_s"), ("lead", "lead_s")]:  # fmt: skip
        want = sig[param].default
        spec = re.search(rf'"{key}": {{"type": "\w+", "default": ([\d.]+)}}', module)
        assert spec and float(spec.group(1)) == want, key
        used = re.search(rf"quiesce_{key} \| default\(([\d.]+)\)", play)
        assert used and float(used.group(1)) == want, key
    assert f"(default {sig['hold_s'].default:g} s)" in docs
    assert f"(`quiesce_lead`, default {sig['lead_s'].default:g} s" in docs
    assert f"(`quiesce_attempts`, default {sig['attempts'].default})" in docs
