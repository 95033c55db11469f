"""The fleet's writer specs (a host's ``quiesce_writers``): what docs/fleet.md shows is
what the play accepts, and what must not travel or cannot work is refused up front, on
the controller, naming the host and the writer (no root, no hosts needed)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest

from quiesce.errors import QuiesceError
from quiesce.integrations.fleet.agent import WRITER_KINDS, _build_writers, check_writers
from quiesce.integrations.fleet.coordinator import Group, Member

DOC = Path(__file__).resolve().parents[1] / "docs" / "fleet.md"


def doc_writers() -> dict[str, list[dict[str, Any]]]:
    """Each inventory line's quiesce_writers in docs/fleet.md's ini blocks, by host."""
    found = {}
    for block in re.findall(r"^```ini\n(.*?)^```", DOC.read_text(), re.M | re.S):
        for line in block.splitlines():
            words = shlex.split(line)
            ini = dict(w.split("=", 1) for w in words[1:] if "=" in w)
            if "quiesce_writers" in ini:
                found[words[0]] = json.loads(ini["quiesce_writers"])
    return found


def group(writers: list[dict[str, Any]]) -> Group:
    return Group([Member("db1", ["ssh", "root@db1"], ["/srv/db"], writers=writers)])


def test_the_docs_writers_are_accepted_and_built_and_cover_every_type() -> None:
    specs = doc_writers()
    assert {s["type"] for ws in specs.values() for s in ws} == set(WRITER_KINDS)
    for host, ws in specs.items():
        check_writers(ws, host)
        built = _build_writers(ws)  # the constructors only: nothing connects yet
        assert [w.kind for w in built] == [s["type"] for s in ws]
        group(ws)


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ({"type": "mysql", "unix_socket": "/run/m.sock", "password": "s3cret"}, "a password"),
        ({"type": "postgresql", "dsn": "postgresql://app:s3cret@db/app"}, "a password"),
        ({"type": "postgresql", "dsn": "host=/run dbname=app password=s3cret"}, "a password"),
        ({"type": "oracle"}, "unknown writer type 'oracle'"),
        ({"type": "mysql", "socket": "/run/m.sock"}, "unknown key 'socket' for a mysql"),
        ({"databases": ["/a.db"]}, "unknown writer type None"),
    ],
)
def test_a_bad_writer_spec_is_refused_before_anything_starts(spec: dict, says: str) -> None:
    with pytest.raises(QuiesceError) as e:
        group([{"type": "sqlite", "databases": ["/srv/db/a.db"]}, spec])
    assert e.value.message.startswith("db1: quiesce_writers[1]: ") and says in e.value.message
    assert "s3cret" not in e.value.message + (e.value.hint or "")
    assert e.value.hint


def test_the_agent_has_no_test_operation() -> None:
    """The product's agent takes no fault from the wire: a negative control runs its own
    faulty agent (quiesce_testing.faults) instead."""
    import os

    from quiesce.integrations.fleet.agent import Agent

    r, w = os.pipe()
    try:
        Agent(rfd=r, wfd=w).handle({"op": "test-thaw-early", "after_s": 0})
        said = json.loads(os.read(r, 4096).decode().splitlines()[-1])
    finally:
        os.close(r)
        os.close(w)
    assert said == {"op": "error", "error": "unknown op 'test-thaw-early'"}


def test_one_model_per_writer_for_the_job_the_fleet_and_python(tmp_path: Path) -> None:
    """A writer's settings are one model (next to the writer): a job's table, a fleet spec
    and a Python call give the writer the same config, and each refuses the same typo."""
    from pydantic import ValidationError

    from quiesce.apps.writers import MysqlWriter, SqliteWriter
    from quiesce.job.build import build_writers
    from quiesce.job.schema import WRITER_CONFIGS, JobConfig

    db = str(tmp_path / "a.db")
    table = {"databases": [db], "busy_timeout": 3.0, "checkpoint": "FULL", "name": "app"}
    job = JobConfig.model_validate(
        {"volumes": ["/srv"], "provider": {"type": "reflink", "dest": "/x"},
         "writers": {"sqlite": [table]}}
    )  # fmt: skip
    (from_job,) = build_writers(job)
    (from_fleet,) = _build_writers([{"type": "sqlite", **table}])
    from_python = SqliteWriter([db], busy_timeout=3, checkpoint="full", name="app")
    assert from_job.config == from_fleet.config == from_python.config
    assert type(from_job.config) is WRITER_CONFIGS["sqlite"] is SqliteWriter.Config
    with pytest.raises(ValidationError):
        MysqlWriter(socket="/run/m.sock")
    with pytest.raises(QuiesceError, match="unknown key 'socket'"):
        check_writers([{"type": "mysql", "socket": "/run/m.sock"}], "w")
