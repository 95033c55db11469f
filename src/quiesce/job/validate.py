"""Validating a job: the schema's errors as TOML-keyed problems, and the checks that need
the machine (who owns the hook scripts, whether the volumes can be frozen, whether the
backup target is installed). Every problem at once, before anything runs.

A job file (:func:`load_job`) and a :class:`JobConfig` built in Python
(:func:`job_from_config`) get the same checks.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import re
import shutil
import tomllib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from quiesce.apps.hooks import executable_problem, hook_dir_scripts, permission_problem
from quiesce.apps.hooks.context import SAFE_PATH
from quiesce.apps.writers import ENV_NAME_RE
from quiesce.backup.config import semantic_problems
from quiesce.errors import QuiesceError, TrustError, UntrustedState, UsageError
from quiesce.host.trust import open_checked, read_all
from quiesce.job.hints import job_hint
from quiesce.job.schema import (
    NAME_RE,
    PROVIDERS,
    WRITER_CONFIGS,
    Job,
    JobConfig,
    JobConfigError,
    Problem,
)
from quiesce.providers.options import OPTIONS, ProviderOptions
from quiesce.state.statedir import checked_state_dir
from quiesce.util.redact import has_credentials, holds_secret_value

if TYPE_CHECKING:
    from quiesce.freezing.plan import GroupMember
    from quiesce.host.mounts import MountTable
    from quiesce.providers.base import Provider

CHOWN_HINT = "make it root's and writable only by root: chown root:root {p} && chmod go-w {p}"
# Where a password goes instead of the job file, by the table that tried to hold one.
_PASSWORD_HINTS = {
    "writers.mysql": 'use defaults_file = "/etc/mysql/debian.cnf" (a root-owned 0600 option '
    'file with the password) or password_env = "NAME" (an environment variable quiesce reads)',
    "writers.postgresql": "use ~/.pgpass or PGPASSFILE (a root-owned 0600 file), or "
    'password_env = "NAME" (an environment variable quiesce reads)',
    "backup": 'use password_file = "/etc/quiesce/restic.pass" (root-owned, mode 600) or '
    'password_env = "NAME" (an environment variable quiesce reads)',
}
_SECRET_KEYS = ("password", "passwd", "passphrase", "secret")

# -- pydantic errors -> problems ------------------------------------------------------------

_TOML_TYPE = {
    str: "string",
    int: "integer",
    float: "float",
    bool: "boolean",
    list: "array",
    dict: "table",
}
_EXPECTED = {
    "string_type": "a string",
    "float_type": "a number",
    "int_type": "an integer",
    "bool_type": "true or false",
    "list_type": "an array",
    "dict_type": "a table",
    "model_type": "a table",
    "model_attributes_type": "a table",
    "int_from_float": "an integer",
    "float_parsing": "a number",
    "int_parsing": "an integer",
}
_REQUIRED_HINTS = {
    "volumes": 'volumes = ["/srv/data"] (the mount points to snapshot together)',
    "provider": '[provider] with type = "reflink" (or ' + ", ".join(PROVIDERS) + ")",
    "provider.type": 'type = "reflink" (one of: ' + ", ".join(PROVIDERS) + ")",
    "command": 'command = ["/usr/local/bin/my-hook", "arg"] (an argv list; no shell)',
    "databases": 'databases = ["/srv/db/app.sqlite"]',
}


def _key_path(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _model_at(loc: Sequence[int | str]) -> type[BaseModel] | None:
    """The model class that the table at ``loc`` validates against."""
    model: Any = JobConfig
    for part in loc:
        if isinstance(part, int):
            continue
        info = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        if info is None:
            return None
        ann = info.annotation
        args = getattr(ann, "__args__", ())
        model = next(
            (a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None
        )
        if model is None:
            return None
    return model if isinstance(model, type) else None


def _toml_type(value: Any) -> str:
    for t, name in _TOML_TYPE.items():
        if type(value) is t:
            return name
    return type(value).__name__


def _problem_from(err: dict[str, Any]) -> Problem:
    loc = err["loc"]
    path = _key_path(loc)
    kind = err["type"]
    value = err.get("input")
    if kind == "extra_forbidden" and str(loc[-1]).lower() in _SECRET_KEYS:
        table = re.sub(r"\[\d+\]", "", _key_path(loc[:-1]))
        return Problem(
            path,
            "a password does not belong in the job file (anyone who can read it, a backup "
            "of /etc, a config repository would have it)",
            _PASSWORD_HINTS.get(table, 'name an environment variable: password_env = "NAME"'),
        )
    if kind == "extra_forbidden":
        model = _model_at(loc[:-1])
        allowed = sorted(model.model_fields) if model else []
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return Problem(path, "unknown key", hint + "allowed here: " + ", ".join(allowed))
    if kind == "missing":
        hint = _REQUIRED_HINTS.get(path) or _REQUIRED_HINTS.get(str(loc[-1]), "")
        return Problem(path, "missing (required)", hint or "add this key")
    if kind == "argv_string":
        return Problem(
            path,
            err["msg"],
            f'write {_shlex_hint(value)}; for a shell write ["/bin/sh", "-c", "..."]',
        )
    if kind == "literal_error":
        return Problem(path, err["msg"].replace("Input should be", "must be"), "")
    if kind == "value_error":
        return Problem(path, str(err["msg"]).removeprefix("Value error, "), "")
    if kind == "job_problem":  # a model's own check, with its hint (apps.writers.problem)
        return Problem(path, err["msg"], str((err.get("ctx") or {}).get("hint", "")))
    if kind in _EXPECTED:
        hint = "see docs/jobs.md for this key's type"
        if isinstance(value, str) and kind in ("float_type", "int_type", "bool_type"):
            bare = value.strip().lower()
            if bare in ("true", "false") or bare.replace(".", "", 1).isdigit():
                hint = f"write it without quotes: {loc[-1]} = {bare}"
        return Problem(
            path, f"wrong type: expected {_EXPECTED[kind]}, got {_toml_type(value)} {value!r}", hint
        )
    msg = err["msg"].replace("Input should be", "must be").replace("List should", "must")
    return Problem(path, msg, "")


def _shlex_hint(value: Any) -> str:
    import shlex

    try:
        return "[" + ", ".join(f'"{a}"' for a in shlex.split(str(value))) + "]"
    except ValueError:
        return '["/path/to/program", "arg"]'


# -- checks that need the machine ------------------------------------------------------------


def _file_problems(path: Path, key: str) -> list[Problem]:
    problem = permission_problem(path)
    return [Problem(key, problem, CHOWN_HINT.format(p=path))] if problem else []


def _command_problems(argv: Any, key: str, env: Any = None) -> list[Problem]:
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        return []  # the schema reports it
    problem = executable_problem(argv)
    path = env.get("PATH") if isinstance(env, dict) else None
    path = path if isinstance(path, str) else SAFE_PATH
    if problem is None and "/" not in argv[0] and shutil.which(argv[0], path=path) is None:
        # a hook runs with the hooks' PATH, not quiesce's (docs/jobs.md, "A hook's environment")
        return [
            Problem(
                key,
                f"{argv[0]} is not on a hook's PATH ({path})",
                "give its absolute path, or set PATH in the hook's env table",
            )
        ]
    if problem is None:
        return []
    if "owned by" in problem or "writable by" in problem:
        culprit = problem.split(" is ")[0]
        return [Problem(key, problem, CHOWN_HINT.format(p=culprit))]
    return [Problem(key, problem, "give the absolute path of an executable (no shell is used)")]


def _list_of_tables(raw: dict[str, Any], *keys: str) -> list[dict[str, Any]]:
    cur: Any = raw
    for k in keys:
        cur = cur.get(k) if isinstance(cur, dict) else None
    return [t if isinstance(t, dict) else {} for t in cur] if isinstance(cur, list) else []


def _env_problems(env: Any, key: str) -> list[Problem]:
    """A hook's ``env`` table: valid names, no QUIESCE_* (quiesce sets those), and no
    secret: a password in the job file is readable by whoever reads the file."""
    if not isinstance(env, dict):
        return []  # the schema reports it
    problems = []
    for name, value in env.items():
        at = f"{key}.{name}"
        if not ENV_NAME_RE.match(name):
            problems.append(
                Problem(at, f"{name!r} is not a valid variable name", "use letters, digits, '_'")
            )
        elif name.upper().startswith("QUIESCE_"):
            problems.append(
                Problem(at, "quiesce sets the QUIESCE_* variables itself", "use another name")
            )
        elif holds_secret_value(name):
            problems.append(
                Problem(
                    at,
                    "a secret does not belong in the job file",
                    "put it in a root-owned 0600 file and pass the file's path (e.g. "
                    "PGPASSFILE, RESTIC_PASSWORD_FILE), or let the hook read it itself",
                )
            )
        elif isinstance(value, str) and has_credentials(value):
            problems.append(
                Problem(
                    at,
                    "the value carries a password (user:pass@ or password=)",
                    "put the password in a root-owned 0600 file the hook reads",
                )
            )
        elif isinstance(value, str) and "\0" in value:
            problems.append(Problem(at, "the value contains a NUL byte", "remove it"))
    return problems


def _depends_problems(paths: Any, key: str) -> list[Problem]:
    """``depends_on``: absolute paths, on a hook that quiesces (proven on the group)."""
    if not paths or not isinstance(paths, list):
        return []  # empty, or the schema reports the type
    if key.startswith(("hooks.post_thaw", "hooks.after_run")):
        return [
            Problem(
                f"{key}.depends_on",
                "only a pre_freeze or session hook quiesces an application",
                "move depends_on to the hook that quiesces it",
            )
        ]
    return [
        Problem(f"{key}.depends_on[{i}]", f"{p!r} is not an absolute path", 'e.g. "/srv/app/data"')
        for i, p in enumerate(paths)
        if isinstance(p, str) and not os.path.isabs(p)
    ]


def _hook_problems(raw: dict[str, Any]) -> tuple[list[Problem], list[Path]]:
    problems: list[Problem] = []
    for section in ("pre_freeze", "post_thaw", "session", "after_run"):
        for i, table in enumerate(_list_of_tables(raw, "hooks", section)):
            key = f"hooks.{section}[{i}].command"
            problems += _command_problems(table.get("command"), key, table.get("env"))
            problems += _env_problems(table.get("env"), f"hooks.{section}[{i}].env")
            problems += _depends_problems(table.get("depends_on"), f"hooks.{section}[{i}]")
    hooks = raw.get("hooks")
    if isinstance(hooks, dict):
        problems += _env_problems(hooks.get("directory_env"), "hooks.directory_env")
    directory = hooks.get("directory") if isinstance(hooks, dict) else None
    scripts: list[Path] = []
    if isinstance(directory, str):
        d = Path(directory)
        if not d.is_dir():
            problems.append(
                Problem(
                    "hooks.directory",
                    f"{d} is not a directory",
                    "create it, or remove hooks.directory",
                )
            )
        else:
            problems += _file_problems(d, "hooks.directory")
            scripts = hook_dir_scripts(d)
            for s in scripts:
                problems += _file_problems(s, "hooks.directory")
    return problems, scripts


def _provider_options(raw: dict[str, Any]) -> dict[str, Any] | None:
    """The options of ``[provider]`` (every key but ``type``), None without a known type."""
    provider = raw.get("provider")
    if not isinstance(provider, dict) or provider.get("type") not in PROVIDERS:
        return None
    return {k: v for k, v in provider.items() if k != "type"}


def _option_problem(kind: str, model: type[ProviderOptions], err: dict[str, Any]) -> Problem:
    """A pydantic error of the provider's option model, at its TOML key."""
    loc = ("provider", *err["loc"])
    path = _key_path(loc)
    if err["type"] == "extra_forbidden":
        allowed = sorted(model.model_fields)
        close = difflib.get_close_matches(str(err["loc"][-1]), allowed, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        listed = ", ".join(allowed) or f"nothing (the {kind} provider takes no options)"
        return Problem(path, "unknown key", hint + "allowed here: " + listed)
    if err["type"] == "missing":
        info = model.model_fields.get(str(err["loc"][-1]))
        example = info.examples[0] if info is not None and info.examples else None
        hint = f"{err['loc'][-1]} = {json.dumps(example)}" if example else "add this key"
        return Problem(path, f"missing: the {kind} provider needs it", hint)
    return _problem_from({**err, "loc": loc})


def _state_dir_problems(raw: dict[str, Any]) -> list[Problem]:
    """The state directory steers what root deletes and runs: refuse one (or a parent)
    that another user could write, before the run would."""
    explicit = raw.get("state_dir")
    if explicit is not None and not isinstance(explicit, str):
        return []  # the schema reports it
    try:
        checked_state_dir(explicit or None)
    except UntrustedState as e:
        return [Problem("state_dir", e.message, e.hint)]
    return []


def _provider_problems(raw: dict[str, Any]) -> list[Problem]:
    """``type`` is a provider, and every other key is one of its options, typed."""
    provider = raw.get("provider")
    if not isinstance(provider, dict) or not isinstance(provider.get("type"), str):
        return []
    kind = provider["type"]
    if kind not in PROVIDERS:
        close = difflib.get_close_matches(kind, PROVIDERS, n=1)
        hint = (f"did you mean {close[0]!r}? " if close else "") + "one of: " + ", ".join(PROVIDERS)
        return [Problem("provider.type", f"unknown provider {kind!r}", hint)]
    model = OPTIONS[kind]
    try:
        model.model_validate(_provider_options(raw), strict=True)
    except ValidationError as e:
        return [_option_problem(kind, model, dict(err)) for err in e.errors()]
    return []


def _writer_problems(raw: dict[str, Any]) -> list[Problem]:
    """What each writer's config model says about this machine (files that must be
    there), for every table the model accepts (the schema reports the others)."""
    problems = []
    for kind, model in WRITER_CONFIGS.items():
        for i, table in enumerate(_list_of_tables(raw, "writers", kind)):
            try:
                config = model.model_validate(table)
            except ValidationError:
                continue
            problems += [
                Problem(f"writers.{kind}[{i}].{f.key}", f.message, f.hint)
                for f in config.findings()
            ]
    return problems


def _backup_problems(raw: dict[str, Any]) -> list[Problem]:
    """What [backup] needs beyond its types (listed even when the table also has type
    errors, which stop pydantic before the model's own check), and what the machine
    must have for it: the target's program and the password file."""
    section = raw.get("backup")
    if not isinstance(section, dict):
        return []
    problems = [Problem("backup", m, "") for m in semantic_problems(section)]
    program = {"restic": ("restic", "restic"), "borg": ("borg", "borgbackup")}
    if section.get("target") in program:
        binary, package = program[section["target"]]
        if shutil.which(binary) is None:
            problems.append(
                Problem(
                    "backup.target",
                    f"{binary} is not installed",
                    f"apt-get install {package} (or scripts/backup-setup.sh)",
                )
            )
    f = section.get("password_file")
    if isinstance(f, str) and f and not Path(f).is_file():
        problems.append(
            Problem(
                "backup.password_file",
                f"{f} does not exist",
                "create it (mode 600, owned by root) or name another file",
            )
        )
    return problems


@contextlib.contextmanager
def _members(vols: list[str], table: MountTable) -> Iterator[list[GroupMember]]:
    """The group as the run sees it (one member per filesystem), its targets closed after."""
    from quiesce.freezing.plan import resolve_group

    members = resolve_group(vols, table)
    try:
        yield members
    finally:
        for m in members:
            for t in m.targets:
                t.close()


def _provider(raw: dict[str, Any]) -> Provider | None:
    """The job's provider, or None when ``[provider]`` has problems of its own."""
    from quiesce.providers.registry import get_provider

    options = _provider_options(raw)
    if options is None or _provider_problems(raw):
        return None
    try:
        return get_provider(raw["provider"]["type"])(options)
    except QuiesceError:  # not installed: the run says so
        return None


def _check_problem(e: QuiesceError) -> Problem:
    """What the provider's own check refused, at the option it names (``provider.dest``)."""
    option = e.option
    return Problem(f"provider.{option}" if option else "provider", e.message, job_hint(e.hint))


def _volume_problems(raw: dict[str, Any]) -> list[Problem]:
    """The volumes resolve, the plan is safe (when the provider freezes), and the
    provider's own check passes: what the run's check phase would refuse, before it runs."""
    from quiesce.freezing.plan import make_plan
    from quiesce.host.mounts import MountTable, resolve
    from quiesce.providers.base import FreezeMode

    vols = raw.get("volumes")
    if not isinstance(vols, list):
        return []
    problems = []
    table = MountTable.read()
    for i, v in enumerate(vols):
        if not isinstance(v, str):
            continue  # the schema reports it
        if not os.path.isabs(v):
            problems.append(
                Problem(
                    f"volumes[{i}]",
                    f"{v!r} is not an absolute path",
                    "give the mount point, e.g. /srv/data",
                )
            )
            continue
        try:
            resolve(v, table).close()
        except QuiesceError as e:
            problems.append(Problem(f"volumes[{i}]", e.message, e.hint))
    if problems or not vols or not all(isinstance(v, str) for v in vols):
        return problems
    prov = _provider(raw)
    with _members(vols, table) as members:
        try:
            freezes = prov is None or prov.freeze_mode(members) is FreezeMode.FIFREEZE
        except QuiesceError:
            freezes = True
        if freezes:  # atomic providers (zfs, btrfs) never freeze: no freeze hazards
            allow_self = raw.get("allow_self") is True
            try:
                with make_plan(vols, allow_self=allow_self, table=table) as plan:
                    plan.check()
            except QuiesceError as e:
                hint = "set allow_self = true only if nothing writes there while frozen"
                problems.append(
                    Problem("volumes", e.message, hint if "allow_self" in e.hint else e.hint)
                )
        if prov is not None and not problems:
            try:
                prov.check(members)
            except QuiesceError as e:
                problems.append(_check_problem(e))
    return problems


def _in_file_order(problems: list[Problem], raw: dict[str, Any]) -> list[Problem]:
    """Sort by where the top-level key stands in the file (the file's own problems first)."""
    keys = {k: i for i, k in enumerate(raw)}

    def pos(p: Problem) -> int:
        if p.path.startswith("("):
            return -1
        return keys.get(re.split(r"[.\[]", p.path, maxsplit=1)[0], len(keys))

    return sorted(problems, key=pos)


# Tables whose model check (a value_error at the table) is listed key by key by
# _backup_problems and _provider_problems, even when pydantic stops before it.
_LISTED_APART = {("backup",), ("provider",)}

# -- loading ---------------------------------------------------------------------------------


def _machine_problems(raw: dict[str, Any], check_volumes: bool) -> tuple[list[Problem], list[Path]]:
    """Every check beyond the schema: names, provider, hooks, writers, backup, volumes."""
    problems: list[Problem] = []
    if isinstance(raw.get("name"), str) and not NAME_RE.match(raw["name"]):
        problems.append(
            Problem(
                "name",
                f"{raw['name']!r} is not a valid job name",
                "use letters, digits, '.', '_' and '-'; it names snapshots",
            )
        )
    problems += _provider_problems(raw)
    problems += _state_dir_problems(raw)
    hook_problems, scripts = _hook_problems(raw)
    problems += hook_problems
    problems += _writer_problems(raw)
    problems += _backup_problems(raw)
    if check_volumes:
        problems += _volume_problems(raw)
    return problems, scripts


def load_job(path: str | Path, *, check_volumes: bool = True) -> Job:
    """Read, validate and safety-check a job file; raise JobConfigError with every problem."""
    p = Path(path)
    shown = str(path)
    try:
        # Read from the fd that was checked (with every directory above it): no window
        # between the check and the read for another user to swap the file.
        checked = open_checked(p, follow=True)
        try:
            text = read_all(checked.fd)
        finally:
            os.close(checked.fd)
    except (OSError, TrustError) as e:
        why = e.strerror if isinstance(e, OSError) else e.message
        raise UsageError(
            f"cannot read job file {shown}: {why}", "give the path of a TOML job file"
        ) from None
    problems = []
    if checked.problem:
        culprit = checked.culprit
        problems.append(Problem("(job file)", checked.problem, CHOWN_HINT.format(p=culprit)))
    try:
        raw = tomllib.loads(text.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise JobConfigError(
            shown,
            [
                *problems,
                Problem("(toml)", f"not valid TOML: {e}", "check the syntax near that line"),
            ],
        ) from None
    config: JobConfig | None = None
    try:
        config = JobConfig.model_validate(raw)
    except ValidationError as e:
        problems += [
            _problem_from(dict(err))
            for err in e.errors()
            if not (err["type"] == "value_error" and tuple(err["loc"]) in _LISTED_APART)
        ]
    more, scripts = _machine_problems(raw, check_volumes)
    problems += more
    if problems or config is None:
        raise JobConfigError(shown, _in_file_order(problems, raw))
    name = config.name or (p.stem if NAME_RE.match(p.stem) else "job")
    return Job(config=config, name=name, path=p, hook_dir_scripts=scripts)


def job_from_config(config: JobConfig, *, check_volumes: bool = True) -> Job:
    """A job built in Python, with the same checks as a job file (hook scripts' owners,
    volumes, the backup target); raise JobConfigError with every problem."""
    raw = config.model_dump(mode="json", exclude_none=True)
    problems, scripts = _machine_problems(raw, check_volumes)
    if problems:
        raise JobConfigError(f"job {config.name or 'job'}", _in_file_order(problems, raw))
    return Job(config=config, name=config.name or "job", hook_dir_scripts=scripts)


__all__ = ["CHOWN_HINT", "job_from_config", "load_job"]
