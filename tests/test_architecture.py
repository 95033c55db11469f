"""The architecture holds: each layer imports only the layers below it, no module cycle
(lazy imports included), at most 8 modules at the package root.

Read from the source (ast), so an import inside a function counts like one at the top.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "quiesce"
# Lowest first. A module may import its own layer and the layers before it.
LAYERS = [
    "errors",
    "util",
    "host",
    "freezing",
    "state",
    "providers",
    "snapshot",
    "backup",
    "apps",
    "job",
    "integrations",
    "cli",
]
TOP = {
    "__init__",
    "__main__",
    "writers",
    "hooks",
}  # the public API (and `python -m quiesce`) sees every layer


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every quiesce module ``path`` imports, at any depth of the file."""
    me = _module_name(path)
    return _imports_of(path.read_text(), me, is_package=path.name == "__init__.py")


def _imports_of(source: str, me: str, *, is_package: bool) -> set[str]:
    tree = ast.parse(source)
    package = me if is_package else me.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if _ours(a.name)}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            if not _ours(mod):
                continue
            for a in node.names:  # `from quiesce.host import kernel` imports a module
                sub = f"{mod}.{a.name}"
                out.add(sub if _exists(sub) else mod)
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and node.value.startswith((".", "quiesce."))
            and ":" in node.value
        ):  # lazy_exports / provider registry targets: ".engine:create"
            target = node.value.partition(":")[0]
            if target.startswith("."):
                target = package + target
            out.add(target)
    return {m for m in out if m != me}


def _ours(module: str) -> bool:
    """A module of the quiesce package (not quiesce_testing, the test ground beside it)."""
    return module == "quiesce" or module.startswith("quiesce.")


def _exists(module: str) -> bool:
    rel = Path(*module.split("."))
    return (PKG.parent / rel).with_suffix(".py").is_file() or (PKG.parent / rel).is_dir()


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in TOP:
        return None
    return LAYERS.index(parts[1])


MODULES = {_module_name(p): _imports(p) for p in sorted(PKG.rglob("*.py"))}


def test_every_module_is_in_a_layer():
    for module in MODULES:
        parts = module.split(".")
        if len(parts) > 1 and parts[1] not in TOP:
            assert parts[1] in LAYERS, f"{module} is not in a layer package"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_only_its_own_layer_or_below(module):
    mine = _layer(module)
    if mine is None:
        return
    upward = [m for m in MODULES[module] if (_layer(m) or 0) > mine]
    assert not upward, f"{module} (layer {LAYERS[mine]}) imports a higher layer: {upward}"


def test_no_import_cycles():
    graph = {m: {i for i in deps if i in MODULES} for m, deps in MODULES.items()}
    # Packages' __init__ re-exporting their own modules is not a cycle of behaviour.
    graph = {m: {i for i in deps if not m.startswith(i + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = [*stack[stack.index(n) :], n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_package_root_is_small():
    root = [p for p in PKG.glob("*.py")]
    assert len(root) <= 8, [p.name for p in root]


def test_nothing_below_the_cli_imports_it():
    for module, deps in MODULES.items():
        if not module.startswith("quiesce.cli") and _layer(module) is not None:
            assert not [d for d in deps if d.startswith("quiesce.cli")], module


def test_the_checker_sees_lazy_and_relative_upward_imports():
    """Negative control: imports hidden in a function, relative ones and lazy-export
    targets are all found, and would fail the layer rule from the host layer."""
    code = (
        "def f():\n    from quiesce.cli.app import main\n"
        "from ..job import run\n"
        "X = {'a': '.engine:create'}\n"
    )
    found = _imports_of(code, "quiesce.host.probe", is_package=False)
    assert "quiesce.cli.app" in found
    assert "quiesce.job.run" in found
    assert "quiesce.host.engine" in found
    assert all((_layer(m) or 0) > LAYERS.index("host") for m in found - {"quiesce.host.engine"})


@pytest.mark.parametrize(
    "package", ["quiesce", "quiesce.snapshot", "quiesce.backup", "quiesce.job", "quiesce.providers"]
)
def test_exports_are_not_shadowed_by_submodules(package):
    """Importing a submodule sets it as an attribute of its package: an exported function
    named like a submodule (``quiesce.snapshot.mount``) would turn into that module."""
    import importlib
    import pkgutil

    pkg = importlib.import_module(package)
    submodules = {m.name for m in pkgutil.iter_modules(pkg.__path__)}
    assert not set(getattr(pkg, "__all__", ())) & submodules


def test_architecture_doc_names_every_module():
    """docs/architecture.md says what each module holds: a new module is added there too."""
    doc = (PKG.parents[1] / "docs" / "architecture.md").read_text()
    missing = [
        str(p.relative_to(PKG))
        for p in sorted(PKG.rglob("*.py"))
        if p.name != "__init__.py" and f"{p.stem}" not in doc
    ]
    assert not missing, f"not in docs/architecture.md: {missing}"


_SPAWNERS = {"run", "Popen", "call", "check_call", "check_output", "getoutput",
             "getstatusoutput"}  # fmt: skip


def _direct_subprocess_calls(source: str) -> list[int]:
    """Lines that start a child without quiesce.host.proc (subprocess.X(...), os.system)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            base = node.func.value
            name = base.id if isinstance(base, ast.Name) else None
            if (name == "subprocess" and node.func.attr in _SPAWNERS) or (
                name == "os" and node.func.attr in ("system", "popen")
            ):
                lines.append(node.lineno)
    return lines


def test_children_are_started_only_by_the_one_runner():
    """Every child process in src/ goes through quiesce.host.proc (PDEATHSIG, own process
    group, bounded output): nothing else calls subprocess directly."""
    found = {
        str(path.relative_to(PKG)): calls
        for path in sorted(PKG.rglob("*.py"))
        if path.name != "proc.py" or path.parent.name != "host"
        if (calls := _direct_subprocess_calls(path.read_text()))
    }
    assert found == {}


def test_the_runner_check_sees_a_direct_call():
    """Negative control for the check above."""
    assert _direct_subprocess_calls("import subprocess\nsubprocess.run(['true'])\n") == [2]
    assert _direct_subprocess_calls("import os\nos.system('true')\n") == [2]
    assert _direct_subprocess_calls("from quiesce.host import proc\nproc.spawn(['true'])\n") == []


def _doc_table() -> dict[str, tuple[set[str], str]]:
    """docs/architecture.md's module table: per package, the names in its module column
    (``kernel.py``, ``guardian/``) and the text of its rows."""
    doc = (PKG.parents[1] / "docs" / "architecture.md").read_text()
    table: dict[str, tuple[set[str], str]] = {}
    package = ""
    for line in doc.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) < 3 or re.fullmatch(r"[-: ]+", cells[0]):
            continue
        if cells[0] not in ("", "package"):
            package = cells[0].strip("`")
        if package and cells[0] != "package":
            names, text = table.get(package, (set(), ""))
            names |= set(re.findall(r"`([\w/.]+)`", cells[1]))
            table[package] = (names, text + " " + " ".join(cells[1:]))
    return table


def test_architecture_table_matches_the_tree():
    """Each layer package's row lists exactly its modules and subpackages (``name.py``,
    ``name/``), and names every module of a subpackage; nothing listed is missing."""
    table = _doc_table()
    assert set(table) == set(LAYERS), sorted(set(table) ^ set(LAYERS))
    for package, (names, text) in table.items():
        if package == "errors":
            assert names == {"errors.py"}
            continue
        root = PKG / package
        on_disk = {p.name for p in root.glob("*.py") if p.name != "__init__.py"}
        on_disk |= {p.name + "/" for p in root.iterdir() if (p / "__init__.py").is_file()}
        listed = {n for n in names if n.endswith((".py", "/"))}
        assert listed == on_disk, (package, sorted(listed ^ on_disk))
        for sub in (p for p in root.iterdir() if (p / "__init__.py").is_file()):
            for mod in sub.rglob("*.py"):
                if mod.name != "__init__.py":
                    assert re.search(rf"\b{mod.stem}\b", text), f"{package}/{sub.name}: {mod.stem}"
