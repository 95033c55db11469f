"""docs/kernel.md (the kernel facts quiesce relies on) cannot drift: every reference to it
in the code names a section that exists, no comment cites a document outside the
repository, and every test or benchmark a section names as its evidence exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "kernel.md"
TREES = ("src", "tests", "docs", "bench", "scripts", "ansible_collections")
REF = re.compile(r"docs/kernel\.md((?:\s*(?:§\d+|and|,))+)")


def _sections() -> set[str]:
    return set(re.findall(r"^## (§\d+) ", DOC.read_text(), re.M))


def _sources() -> list[Path]:
    out = []
    for tree in TREES:
        for p in (ROOT / tree).rglob("*"):
            if p.is_file() and p.suffix in (".py", ".md", ".sh", ".yml", ".c") and p != DOC:
                if p == Path(__file__).resolve():
                    continue
                out.append(p)
    return out


def test_every_reference_names_an_existing_section() -> None:
    sections = _sections()
    assert sections == {f"§{i}" for i in range(1, len(sections) + 1)}, sorted(sections)
    found = 0
    for p in _sources():
        for m in REF.finditer(p.read_text(errors="replace")):
            for sec in re.findall(r"§\d+", m.group(1)):
                found += 1
                assert sec in sections, f"{p.relative_to(ROOT)}: docs/kernel.md {sec}"
    assert found >= 8  # the plan's order rule, LVM, ZFS, the nested-loop tests ...


def test_no_reference_to_a_document_outside_the_repository() -> None:
    for p in _sources():
        text = p.read_text(errors="replace")
        assert "kernel-freeze-facts" not in text, p.relative_to(ROOT)
        # a bare "§N" cites something: it must say which document (docs/kernel.md)
        for line in text.splitlines():
            if "§" in line and "kernel.md" not in line and p.suffix == ".py":
                raise AssertionError(f"{p.relative_to(ROOT)}: {line.strip()}")


def test_every_named_test_exists() -> None:
    named = re.findall(r"`((?:tests|bench)/[\w/]+\.py)(?:::(\w+))?`", DOC.read_text())
    assert len(named) >= 15
    for path, func in named:
        f = ROOT / path
        assert f.is_file(), path
        if func:
            assert re.search(rf"^def {func}\(", f.read_text(), re.M), f"{path}::{func}"


def test_every_section_names_its_evidence() -> None:
    parts = re.split(r"^## ", DOC.read_text(), flags=re.M)[1:]
    for part in parts:
        assert "Shown by:" in part, part.splitlines()[0]
