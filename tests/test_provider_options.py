"""Provider options: one typed model per provider, unknown keys refused where the user
wrote them (Python keywords, `--option KEY=VALUE`), values coerced from the command
line's strings, and docs/jobs.md listing exactly the models' keys and defaults."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quiesce.errors import ExitCode, UsageError
from quiesce.providers import (
    PROVIDERS,
    CommandOptions,
    EbsOptions,
    LvmOptions,
    ProviderOptionsError,
    ReflinkOptions,
    get_options,
    get_provider,
)
from quiesce.providers.options import OPTIONS

pytestmark = pytest.mark.timeout(120)
DOCS = Path(__file__).resolve().parents[1] / "docs" / "jobs.md"

# provider: (a typo, the key it should have been, a valid value)
TYPOS = {
    "reflink": ("dset", "dest", "/srv/clones"),
    "btrfs": ("dst", "dest", "/srv/.snapshots"),
    "lvm": ("lvcreate_timout", "lvcreate_timeout", "30"),
    "zfs": ("timout", "timeout", "30"),
    "ebs": ("regoin", "region", "eu-west-1"),
    "command": ("creat", "create", "/bin/true"),
}
REQUIRED = {
    "command": {"create": ["/bin/true"]},
    "qemu": {"guests": [{"name": "vm", "agent": "/run/qga.sock", "images": ["/vm/a.raw"]}]},
}

# -- Python ------------------------------------------------------------------------------------


def test_every_provider_has_a_model() -> None:
    assert sorted(OPTIONS) == sorted(PROVIDERS)
    for name in PROVIDERS:
        assert get_provider(name).Options is get_options(name)


@pytest.mark.parametrize("name", sorted(TYPOS))
def test_a_typo_is_refused_with_did_you_mean(name: str) -> None:
    typo, meant, value = TYPOS[name]
    with pytest.raises(ProviderOptionsError) as e:
        get_provider(name)(**REQUIRED.get(name, {}), **{typo: value})
    assert isinstance(e.value, UsageError) and e.value.exit_code == ExitCode.USAGE
    assert e.value.message == (
        f"option {typo!r}: unknown option for provider {name}; did you mean {meant!r}?"
    )
    assert meant in e.value.hint and e.value.keys == [typo]


def test_provider_made_from_its_model_records_the_given_keys() -> None:
    prov = get_provider("reflink")(ReflinkOptions(dest=Path("/srv/clones")))
    assert prov.config == ReflinkOptions(dest="/srv/clones")
    assert prov.options == {"dest": "/srv/clones"}  # the manifest's JSON record
    assert get_provider("reflink")(prov.options).config == prov.config


def test_a_model_of_another_provider_is_refused() -> None:
    with pytest.raises(ProviderOptionsError, match="unknown option for provider reflink"):
        get_provider("reflink")(LvmOptions(size="1G"))


def test_wrong_values_are_refused_before_anything_runs() -> None:
    with pytest.raises(ProviderOptionsError, match="bad LVM snapshot size 'huge'"):
        get_provider("lvm")(size="huge")
    with pytest.raises(ProviderOptionsError, match="greater than 0"):
        get_provider("zfs")(timeout=0)
    with pytest.raises(ProviderOptionsError, match="an empty command"):
        get_provider("command")(create="")
    with pytest.raises(ProviderOptionsError, match="required by provider command"):
        get_provider("command")()
    with pytest.raises(ProviderOptionsError, match="bad tag 'x'"):
        get_provider("ebs")(tags="x")


def test_stored_options_load_leniently_for_mount_and_delete() -> None:
    """A manifest written by another version may hold keys this one does not take: the
    snapshot must stay deletable, so they are dropped (and bad values get defaults)."""
    prov = get_provider("command").from_record(
        {"create": ["snap"], "delete": "rm {id}", "old_key": 1, "timeout": "soon"}
    )
    assert prov.config == CommandOptions(create=["snap"], delete=["rm", "{id}"])
    with pytest.raises(ProviderOptionsError, match="required"):
        get_provider("command").from_record({"old_key": 1})


def test_a_manifest_with_old_keys_still_gives_its_provider() -> None:
    from types import SimpleNamespace

    from quiesce.snapshot.mounting import provider_for

    man = SimpleNamespace(provider="reflink", options={"dest": "/srv/c", "compress": True})
    assert provider_for(man).config == ReflinkOptions(dest="/srv/c")  # type: ignore[arg-type]


def test_options_given_twice_are_refused(tmp_path: Path) -> None:
    from quiesce import snapshot

    prov = get_provider("reflink")()
    with pytest.raises(UsageError, match="options given twice"):
        snapshot.create([str(tmp_path)], prov, options={"dest": "/x"}, state_dir=tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_importing_the_models_does_not_import_boto3() -> None:
    code = (
        "import sys\nfrom quiesce.providers import EbsOptions, get_provider\n"
        "get_provider('ebs')(EbsOptions(region='eu-west-1'))\n"
        "print('boto3' in sys.modules, 'quiesce.providers.ebs' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]


# -- property tests ----------------------------------------------------------------------------

_path = st.from_regex(r"/[a-z0-9_.-]{1,12}(/[a-z0-9_.-]{1,12}){0,2}", fullmatch=True)
_word = st.from_regex(r"[A-Za-z0-9_.:-]{1,16}", fullmatch=True)
_argv = st.lists(st.from_regex(r"[A-Za-z0-9_/{}.=-]{1,12}", fullmatch=True), min_size=1)
_pos = st.floats(min_value=0.001, max_value=1e6, allow_nan=False)
_size = st.one_of(
    st.from_regex(r"[1-9][0-9]{0,3}(\.[0-9])?[kKmMgGtT]?", fullmatch=True),
    st.from_regex(r"[1-9][0-9]?%(ORIGIN|VG|FREE|PVS)", fullmatch=True),
)
# Valid values of every key, in the types a job or a Python caller gives them.
VALID: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "reflink": {
        "dest": _path,
        "mode": st.sampled_from(["delta", "clone"]),
        "base": st.booleans(),
    },
    "btrfs": {"dest": _path},
    "lvm": {"size": _size, "kernel": _word, "lvcreate_timeout": _pos},
    "zfs": {"timeout": _pos},
    "ebs": {
        "region": _word,
        "profile": _word,
        "instance_id": _word,
        "sysfs_root": _path,
        "tags": st.dictionaries(_word, _word, max_size=3),
        "description": _word,
        "copy_tags": st.booleans(),
        "wait": st.booleans(),
        "wait_delay": _pos,
        "wait_attempts": st.integers(1, 10_000),
    },
    "command": {"create": _argv, "delete": _argv, "list": _argv, "timeout": _pos},
    "qemu": {
        "guests": st.lists(
            st.fixed_dictionaries(
                {"name": _word, "agent": _path, "images": st.lists(_path, min_size=1, max_size=2)},
                optional={"mountpoints": st.lists(_path, max_size=2)},
            ),
            min_size=1,
            max_size=2,
        ),
        "dest": _path,
        "agent_timeout": _pos,
        "timeout": _pos,
        "freeze": st.booleans(),
    },
}


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_word.filter(lambda k: k.strip() == k), _word, max_size=5))
def test_tags_from_the_command_line_form(tags: dict[str, str]) -> None:
    text = ",".join(f"{k}={v}" for k, v in tags.items())
    assert EbsOptions.parse(tags=text).tags == tags
    assert EbsOptions.parse(tags=tags).tags == tags


@settings(max_examples=500, deadline=None)
@given(st.one_of(_size, st.text(alphabet="0123456789.%kMGbsORIGNVFEP ", max_size=10)))
def test_lvm_size_refused_by_the_model_exactly_when_lvcreate_args_refuse_it(size: str) -> None:
    """The model refuses a size before anything runs; size_args builds lvcreate's
    arguments at run time: they must agree on every string."""
    from quiesce.providers.lvm import size_args

    try:
        size_args(size)
        valid = True
    except UsageError:
        valid = False
    try:
        LvmOptions.parse(size=size)
        assert valid, size
    except ProviderOptionsError:
        assert not valid, size


def test_the_strategies_cover_every_key() -> None:
    assert {n: sorted(v) for n, v in VALID.items()} == {
        n: sorted(m.model_fields) for n, m in OPTIONS.items()
    }


def _as_flag(value: Any) -> str:
    """How a user writes ``value`` after ``--option KEY=`` (parse_options' input)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)


@st.composite
def _valid_options(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    name = draw(st.sampled_from(sorted(VALID)))
    keys = draw(st.lists(st.sampled_from(sorted(VALID[name])), unique=True))
    options = {k: draw(VALID[name][k]) for k in keys}
    return name, {**REQUIRED.get(name, {}), **options}


@settings(max_examples=300, deadline=None)
@given(_valid_options())
def test_known_keys_with_valid_values_are_accepted(case: tuple[str, dict[str, Any]]) -> None:
    from quiesce.cli.snapshot import provider_options

    name, options = case
    model = get_options(name).parse(options)
    assert set(model.to_options()) == set(options)
    assert get_options(name).model_validate(options, strict=True) == model  # as in a job
    flags = [f"{k}={_as_flag(v)}" for k, v in options.items()]
    assert provider_options(name, flags) == model  # the command line's strings, coerced


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(sorted(VALID)),
    st.from_regex(r"[a-z][a-z0-9_]{0,20}", fullmatch=True),
    st.text(max_size=10).filter(lambda v: v[:1] not in "[{"),  # those are read as JSON
)
def test_any_unknown_key_is_refused(name: str, key: str, value: str) -> None:
    from quiesce.cli.snapshot import provider_options

    if key in VALID[name]:
        return
    with pytest.raises(ProviderOptionsError) as e:
        get_options(name).parse({**REQUIRED.get(name, {}), key: value})
    assert e.value.keys == [key] and f"option {key!r}: unknown option" in e.value.message
    flags = [f"{k}={_as_flag(v)}" for k, v in REQUIRED.get(name, {}).items()]
    with pytest.raises(ProviderOptionsError) as e:
        provider_options(name, [*flags, f"{key}={value}"])
    assert e.value.message.startswith(f"--option {key}: unknown option for provider {name}")


# -- the command line --------------------------------------------------------------------------


def quiesce(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "quiesce", *map(str, args)],
                          capture_output=True, text=True, timeout=60, cwd="/")  # fmt: skip


@pytest.mark.parametrize("name", sorted(TYPOS))
def test_cli_refuses_a_typo_in_flag_syntax(tmp_path: Path, name: str) -> None:
    typo, meant, value = TYPOS[name]
    state = tmp_path / "state"
    p = quiesce("snapshot", "create", "--provider", name, "--option", f"{typo}={value}",
                "--state-dir", state, tmp_path)  # fmt: skip
    assert p.returncode == ExitCode.USAGE, p.stderr
    lines = p.stderr.splitlines()
    want = f"quiesce: --option {typo}: unknown option for provider {name}; did you mean {meant}?"
    assert lines[0].startswith(want), lines
    assert lines[1].startswith("hint: ") and len(lines) == 2, lines
    assert not state.exists()


def test_cli_coerces_and_refuses_values_in_flag_syntax(tmp_path: Path) -> None:
    from quiesce.cli.snapshot import provider_options

    ebs = provider_options("ebs", ["wait=false", "wait_delay=2.5", "tags=a=b,c=d"])
    assert ebs == EbsOptions(wait=False, wait_delay=2.5, tags={"a": "b", "c": "d"})
    cmd = provider_options("command", ["create=snap --name {name}", 'delete=["rm", "{id}"]'])
    assert (cmd.create, cmd.delete) == (["snap", "--name", "{name}"], ["rm", "{id}"])
    p = quiesce("snapshot", "create", "-p", "zfs", "-o", "timeout=soon", tmp_path)
    assert p.returncode == ExitCode.USAGE
    assert p.stderr.splitlines()[0].startswith("quiesce: --option timeout=soon: must be a valid")
    p = quiesce("snapshot", "create", "-p", "command", tmp_path)
    assert p.stderr.splitlines() == [
        "quiesce: --option create: required by provider command",
        "hint: --option create='/usr/local/bin/array-snapshot create {name}'",
    ]
    p = quiesce("snapshot", "create", "-p", "command", "-o", "comand=snap", tmp_path)
    assert p.stderr.splitlines() == [
        "quiesce: --option comand: unknown option for provider command; "
        "--option create: required by provider command",
        "hint: options of command: create, delete, list, timeout",
    ]


# -- the documentation -------------------------------------------------------------------------


def _documented() -> dict[str, dict[str, str]]:
    """docs/jobs.md's [provider] section: provider -> key -> default cell."""
    text = DOCS.read_text()
    section = text.split("### `[provider]`", 1)[1].split("\n### ", 1)[0]
    out: dict[str, dict[str, str]] = {}
    for block in section.split("\n#### ")[1:]:
        name = re.match(r"`(\w+)`", block)
        assert name, block[:40]
        rows = re.findall(r"^\| `(\w+)` \| [^|]+ \| ([^|]+) \|", block, re.M)
        out[name[1]] = {k: d.strip() for k, d in rows}
    return out


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return f"{value:g}"
    if isinstance(value, dict):
        return f"`{json.dumps(value)}`"
    return f'`"{value}"`'


def test_docs_list_every_key_and_default_of_the_models() -> None:
    documented = _documented()
    assert sorted(documented) == sorted(OPTIONS)
    for name, model in OPTIONS.items():
        assert sorted(documented[name]) == sorted(model.model_fields), name
        for key, info in model.model_fields.items():
            cell = documented[name][key]
            if info.is_required():
                assert cell == "**required**", (name, key)
            elif info.default is None:
                assert cell != "**required**" and cell, (name, key)  # said in words
            else:
                assert cell in (_toml(info.default), _toml(str(info.default))), (name, key, cell)
