"""The docs say what the code does: every documented key and default (docs/jobs.md's
tables against the job schema's models), the exit codes (ExitCode against README's and
jobs.md's tables and `quiesce --help`), which commands take `--json`, the CLI defaults the
README shows, and hints in a job's syntax for what a job run can raise.

Each comparison has a negative control, so that a parser that finds nothing cannot pass.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from quiesce.backup.config import BackupConfig
from quiesce.cli.app import app
from quiesce.errors import ExitCode
from quiesce.job.hints import job_hint
from quiesce.job.schema import (
    HooksConfig,
    JobConfig,
    MysqlConfig,
    PostgresConfig,
    SqliteConfig,
    TimeoutsConfig,
)
from quiesce.providers.options import OPTIONS
from quiesce.state.retention import RetentionPolicy

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
JOBS = (ROOT / "docs" / "jobs.md").read_text()

# -- docs/jobs.md's tables against the models ------------------------------------------------

SECTIONS: dict[str, type[BaseModel]] = {
    "Top level": JobConfig,
    "`[timeouts]`": TimeoutsConfig,
    "`[hooks]`": HooksConfig,
    "`[backup]`": BackupConfig,
    "`[retention]`": RetentionPolicy,
    **{f"`{name}`": model for name, model in OPTIONS.items()},
}
WRITERS = {"sqlite": SqliteConfig, "postgresql": PostgresConfig, "mysql": MysqlConfig}


def _tables(text: str) -> dict[str, list[dict[str, str]]]:
    """The first table under each heading, as rows keyed by the header's names."""
    out: dict[str, list[dict[str, str]]] = {}
    for m in re.finditer(r"^#{2,4} (.+)\n((?:(?!^#).*\n)*)", text, re.M):
        lines = [ln for ln in m.group(2).splitlines() if ln.startswith("|")]
        if len(lines) < 3:
            continue
        cells = [[c.strip() for c in re.split(r"(?<!\\)\|", ln)[1:-1]] for ln in lines]
        out[m.group(1).strip()] = [dict(zip(cells[0], row, strict=True)) for row in cells[2:]]
    return out


def _key(cell: str) -> str:
    return cell.strip("`")


def _literal(cell: str) -> tuple[bool, Any]:
    """A default cell as a value: ``30``, ``true``, `` `"abort"` ``, ``**required**``,
    ``none``; (False, None) for a description ("file name", "next to each image")."""
    text = cell.strip().strip("`")
    if text in ("**required**", "required"):
        return True, "<required>"
    if text == "none":
        return True, None
    try:
        return True, json.loads(text)
    except ValueError:
        return False, None


def _default(info: FieldInfo) -> Any:
    if info.is_required():
        return "<required>"
    value = info.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "<table>"
    if isinstance(value, Path):
        return str(value)
    return value


def _compare(section: str, rows: list[dict[str, str]], model: type[BaseModel]) -> list[str]:
    fields = model.model_fields
    keys = [_key(r["key"]) for r in rows]
    wrong = []
    if sorted(keys) != sorted(fields):
        wrong.append(
            f"{section}: documented {sorted(set(keys) - set(fields))} are not keys; "
            f"undocumented keys {sorted(set(fields) - set(keys))}"
        )
    for row in rows:
        key = _key(row["key"])
        if key not in fields or "default" not in row:
            continue
        known, value = _literal(row["default"])
        if known and value != _default(fields[key]):
            wrong.append(
                f"{section}: {key} documented default {row['default']} != {_default(fields[key])!r}"
            )
    return wrong


def _writer_keys(cell: str) -> dict[str, str | None]:
    """``[[writers.x]]``'s keys cell: `key` (default), ... -> key -> default text."""
    out: dict[str, str | None] = {}
    for m in re.finditer(r"`(\w+)`(?:\s*\(([^;)]*)[;)])?", cell):
        out[m.group(1)] = m.group(2)
    return out


def _writer_drift(rows: list[dict[str, str]]) -> list[str]:
    wrong = []
    for row in rows:
        name = re.fullmatch(r"`\[\[writers\.(\w+)\]\]`", row["writer"])
        assert name, row
        model = WRITERS[name.group(1)]
        documented = _writer_keys(row["keys (default)"])
        if sorted(documented) != sorted(model.model_fields):
            wrong.append(f"writers.{name.group(1)}: {sorted(documented)} != keys of the model")
        for key, text in documented.items():
            if text is None or key not in model.model_fields:
                continue
            known, value = _literal(text.split(":")[0].strip())
            if known and value != _default(model.model_fields[key]):
                wrong.append(f"writers.{name.group(1)}.{key}: documented default {text}")
    return wrong


def test_every_key_and_default_in_jobs_md_is_the_code():
    tables = _tables(JOBS)
    missing = [s for s in [*SECTIONS, "`[writers]`"] if s not in tables]
    assert not missing, f"docs/jobs.md has no table under {missing}"
    wrong = []
    for section, model in SECTIONS.items():
        wrong += _compare(section, tables[section], model)
    wrong += _writer_drift(tables["`[writers]`"])
    assert wrong == []


def test_a_drifted_default_or_key_is_caught():
    """The negative control: the comparison sees a wrong default and a missing key."""
    tables = _tables(JOBS.replace("| `freeze` | 30 |", "| `freeze` | 60 |"))
    assert _compare("`[timeouts]`", tables["`[timeouts]`"], TimeoutsConfig)
    rows = [r for r in _tables(JOBS)["`[backup]`"] if r["key"] != "`extra_args`"]
    assert _compare("`[backup]`", rows, BackupConfig)
    writers = _tables(JOBS.replace("`busy_timeout` (10)", "`busy_timeout` (5)"))["`[writers]`"]
    assert _writer_drift(writers)


# -- exit codes ----------------------------------------------------------------------------


def _code_table(text: str) -> dict[int, str]:
    rows = re.findall(r"^\| (\d+) \| (.+) \|$", text, re.M)
    return {int(code): meaning for code, meaning in rows}


def _codes() -> dict[int, str]:
    return {int(v): k for k, v in vars(ExitCode).items() if k.isupper()}


def _help_codes(text: str) -> set[int]:
    m = re.search(r"Exit codes:(.*?)Docs:", " ".join(text.split()))
    assert m, "quiesce --help lists no exit codes"
    return {int(c) for c in re.findall(r"(\d+) [a-z]", m.group(1))}


def test_exit_codes_in_readme_jobs_md_and_help_are_exit_code():
    assert set(_code_table(README)) == set(_codes())
    help_text = subprocess.run(
        [sys.executable, "-m", "quiesce", "--help"], capture_output=True, text=True,
        timeout=60, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"} | _pythonpath(),
    ).stdout  # fmt: skip
    assert _help_codes(help_text) == set(_codes())
    # jobs.md names codes in prose: each must be the code of what it says
    said = {
        r"A run exits with `(\d+)` when a hook or writer failed": ExitCode.HOOK,
        r"and with `(\d+)` when the snapshot was made but the backup": ExitCode.BACKUP,
        r"`(\d+)` when the restore drill": ExitCode.DRILL,
        r"the run exits with code (\d+)\s+\(`HookFailed`\)": ExitCode.HOOK,
        r"the run reports it and exits with code (\d+), because the application": ExitCode.HOOK,
    }
    for pattern, code in said.items():
        m = re.search(pattern, JOBS)
        assert m, pattern
        assert int(m.group(1)) == code, m.group(0)


def _pythonpath() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k in ("PYTHONPATH", "HOME")}


def test_a_drifted_exit_code_table_is_caught():
    assert set(_code_table(README.replace("| 12 |", "| 13 |"))) != set(_codes())
    assert _help_codes("Exit codes: 0 ok, 1 internal error. Docs: x") != set(_codes())


# -- which commands take --json, and the CLI defaults the README shows --------------------


def _commands(group: Any, prefix: str = "") -> dict[str, Any]:
    """Every leaf command of the CLI (typer's click groups have ``commands``)."""
    out: dict[str, Any] = {}
    for name, cmd in group.commands.items():
        full = f"{prefix}{name}"
        if hasattr(cmd, "commands"):
            out |= _commands(cmd, full + " ")
        else:
            out[full] = cmd
    return out


def _without_json_in_readme(text: str) -> set[str]:
    m = re.search(r"Every command takes `--json`(?: \([^)]*\))?(?: except ([^.]+))?\.", text)
    assert m, "README no longer says which commands take --json"
    return set(re.findall(r"`([^`]+)`", m.group(1) or ""))


def test_the_readme_says_exactly_which_commands_take_json():
    commands = _commands(typer.main.get_command(app))  # type: ignore[arg-type]
    without = {
        name for name, cmd in commands.items()
        if not any("--json" in p.opts for p in cmd.params)
    }  # fmt: skip
    assert _without_json_in_readme(README) == without
    assert _without_json_in_readme("Every command takes `--json`.") == set()  # the control


def test_the_cli_defaults_in_the_readme_are_the_code():
    """`quiesce freeze [--timeout 30]`: the README's number is the command's default."""
    commands = _commands(typer.main.get_command(app))  # type: ignore[arg-type]
    shown = re.findall(r"`quiesce ([a-z ]+?) \[--(\w[\w-]*) ([^\]]+)\]", README)
    assert shown, "the README shows no CLI default"
    for command, flag, value in shown:
        [param] = [p for p in commands[command].params if f"--{flag}" in p.opts]
        assert float(value) == float(param.default), (command, flag)


# -- hints: a job run's errors speak the job's syntax ---------------------------------------

CLI_FLAG = re.compile(r"--(option|timeout|lease|allow-self)\b")


# Where a flag is spelled on purpose: the command line's own rendering of option errors
# (chosen by style="flag"), and the translation itself.
SPELLS_FLAGS = {"providers/options.py", "job/hints.py"}


def _docstrings(tree: ast.AST) -> set[int]:
    return {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }


def _hint_literals() -> list[str]:
    """Every string (not a docstring) below src/quiesce, outside cli/, that names a CLI
    flag: what a provider, the freezer or the guardian may put in a hint a job shows."""
    found = []
    src = ROOT / "src" / "quiesce"
    for path in src.rglob("*.py"):
        rel = path.relative_to(src)
        if rel.parts[0] == "cli" or rel.as_posix() in SPELLS_FLAGS:
            continue
        tree = ast.parse(path.read_text())
        docs = _docstrings(tree)
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and CLI_FLAG.search(node.value)
                and id(node) not in docs
            ):
                found.append(node.value)
            if isinstance(node, ast.JoinedStr):
                text = "".join(v.value if isinstance(v, ast.Constant) else "X" for v in node.values)
                if CLI_FLAG.search(text):
                    found.append(text)
    return found


def test_every_cli_flag_in_a_hint_has_a_job_syntax():
    literals = _hint_literals()
    assert any("--option dest=DIR" in s for s in literals)  # the scan finds hints
    assert [s for s in literals if CLI_FLAG.search(job_hint(s))] == []


@pytest.mark.parametrize(
    ("hint", "job"),
    [
        ("choose a clone directory (--option dest=DIR) on the image's filesystem",
         'choose a clone directory (dest = "DIR") on the image\'s filesystem'),
        ("raise --timeout or make the snapshot step faster",
         "raise timeouts.freeze or make the snapshot step faster"),
        ("check it; raise --option timeout", "check it; raise provider.timeout"),
        ("pass --allow-self (allow_self=True) only if", "pass allow_self = true only if"),
        ("--option region=eu-west-1 or AWS_REGION", 'region = "eu-west-1" or AWS_REGION'),
    ],
)  # fmt: skip
def test_job_hint(hint: str, job: str):
    assert job_hint(hint) == job
