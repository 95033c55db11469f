"""Job files: the schema, the safety checks and `quiesce check`/`--dry-run`.

Every bad input is reported with its TOML key path, message and hint, all at once,
with exit code 2 (ExitCode.USAGE), and nothing runs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import is_writable
from helpers.jobtools import PY, write_job

from quiesce.errors import ExitCode
from quiesce.job.schema import JobConfigError
from quiesce.job.validate import load_job

pytestmark = pytest.mark.timeout(60)

GOOD = """
volumes = ["{vol}"]
[provider]
type = "command"
create = ["true"]
"""


def problems(path: Path, check_volumes: bool = False) -> list[tuple[str, str, str]]:
    with pytest.raises(JobConfigError) as e:
        load_job(path, check_volumes=check_volumes)
    assert e.value.exit_code == ExitCode.USAGE == 2
    return [(p.path, p.message, p.hint) for p in e.value.problems]


BAD = [
    (  # unknown key, with a suggestion
        'volumes = ["/v"]\non_hook_falure = "abort"\n[provider]\ntype = "reflink"\n',
        ("on_hook_falure", "unknown key",
         "did you mean 'on_hook_failure'? allowed here: allow_self, backup, expedite, hooks, "
         "metrics_file, name, on_hook_failure, provider, retention, state_dir, syncfs, "
         "timeouts, volumes, writers"),
    ),
    (  # wrong type
        'volumes = ["/v"]\n[provider]\ntype = "reflink"\n[timeouts]\nfreeze = "30"\n',
        ("timeouts.freeze", "wrong type: expected a number, got string '30'",
         "write it without quotes: freeze = 30"),
    ),
    (
        'volumes = "/v"\n[provider]\ntype = "reflink"\n',
        ("volumes", "wrong type: expected an array, got string '/v'",
         "see docs/jobs.md for this key's type"),
    ),
    (  # missing provider option
        'volumes = ["/v"]\n[provider]\ntype = "command"\n',
        ("provider.create", "missing: the command provider needs it",
         'create = ["/usr/local/bin/array-snapshot", "create", "{name}"]'),
    ),
    (  # a provider option of the wrong type (TOML types are strict)
        'volumes = ["/v"]\n[provider]\ntype = "zfs"\ntimeout = "30"\n',
        ("provider.timeout", "wrong type: expected a number, got string '30'",
         "write it without quotes: timeout = 30"),
    ),
    (  # a provider option with a bad value
        'volumes = ["/v"]\n[provider]\ntype = "lvm"\nsize = "huge"\n',
        ("provider.size", "bad LVM snapshot size 'huge': give an absolute size (512M, 2G) "
         "or extents (20%ORIGIN, 10%VG, 50%FREE)", ""),
    ),
    (
        'volumes = ["/v"]\n[provider]\ntype = "reflinc"\n',
        ("provider.type", "unknown provider 'reflinc'",
         "did you mean 'reflink'? one of: btrfs, command, ebs, lvm, qemu, reflink, zfs"),
    ),
    (
        '[provider]\ntype = "reflink"\n',
        ("volumes", "missing (required)",
         'volumes = ["/srv/data"] (the mount points to snapshot together)'),
    ),
    (  # nonexistent hook
        'volumes = ["/v"]\n[provider]\ntype = "reflink"\n'
        '[[hooks.pre_freeze]]\ncommand = ["/usr/local/bin/no-such-hook"]\n',
        ("hooks.pre_freeze[0].command", "/usr/local/bin/no-such-hook does not exist",
         "give the absolute path of an executable (no shell is used)"),
    ),
    (
        'volumes = ["/v"]\n[provider]\ntype = "reflink"\n'
        '[[hooks.session]]\ncommand = ["no-such-hook-anywhere"]\n',
        ("hooks.session[0].command", "no-such-hook-anywhere does not exist on PATH",
         "give the absolute path of an executable (no shell is used)"),
    ),
    (  # a string command would need a shell
        'volumes = ["/v"]\n[provider]\ntype = "reflink"\n'
        '[[hooks.post_thaw]]\ncommand = "systemctl start app"\n',
        ("hooks.post_thaw[0].command",
         "a command is a list of arguments, not a string: quiesce runs no shell",
         'write ["systemctl", "start", "app"]; for a shell write ["/bin/sh", "-c", "..."]'),
    ),
    (
        'volumes = ["/v"]\non_hook_failure = "ignore"\n[provider]\ntype = "reflink"\n',
        ("on_hook_failure", "must be 'abort' or 'crash-consistent'", ""),
    ),
    (
        'volumes = ["/v"]\n[provider]\ntype = "reflink"\n[[writers.sqlite]]\nbusy_timeout = 5\n',
        ("writers.sqlite[0].databases", "missing (required)",
         'databases = ["/srv/db/app.sqlite"]'),
    ),
    (
        'volumes = ["/v"]\n[provider]\ntype = "reflink"\n'
        '[[writers.mysql]]\nunix_socket = "/run/mysqld/mysqld.sock"\nlock = "ftwrl"\n',
        ("writers.mysql[0].lock", "must be 'auto', 'backup_stage' or 'flush_tables'", ""),
    ),
    (
        'volumes = ["/v"]\n[provider]\ntype = "reflink"\n[backup]\ntarget = "restic"\n'
        'repository = "/srv/restic"\npassword_file = "/no/such/restic-password"\n',
        ("backup.password_file", "/no/such/restic-password does not exist",
         "create it (mode 600, owned by root) or name another file"),
    ),
    (
        'volumes = ["/v"]\n[provider]\ntype = "reflink"\n[backup]\ntarget = "tar"\n',
        ("backup", "the tar target needs exactly one of `directory` or `command`", ""),
    ),
    (
        'volumes = ["/v"]\n[provider\ntype = "reflink"\n',
        ("(toml)", "not valid TOML: Expected ']' at the end of a table declaration "
         "(at line 2, column 10)", "check the syntax near that line"),
    ),
]  # fmt: skip


@pytest.mark.parametrize(("text", "expected"), BAD, ids=[e[0] for _, e in BAD])
def test_bad_input_is_reported_with_key_path_message_and_hint(tmp_path, text, expected):
    assert problems(write_job(tmp_path, text)) == [expected]


def test_every_problem_is_reported_at_once(tmp_path):
    job = write_job(
        tmp_path,
        """
volumes = ["relative/path"]
colour = "blue"
[provider]
type = "command"
[timeouts]
hook = -1
[[hooks.pre_freeze]]
command = ["/no/such/hook"]
""",
    )
    found = problems(job, check_volumes=True)
    assert [p[0] for p in found] == [
        "volumes[0]", "colour", "provider.create", "timeouts.hook",
        "hooks.pre_freeze[0].command",
    ]  # fmt: skip
    assert found[0][1] == "'relative/path' is not an absolute path"
    assert found[3][1] == "must be greater than 0"


def test_backup_needs_are_listed_with_its_type_errors(tmp_path, monkeypatch):
    """pydantic stops before [backup]'s own check when the table has a type error;
    `quiesce check` still lists both, and a target program that is not installed."""
    monkeypatch.setenv("PATH", str(tmp_path))  # no restic on it
    job = write_job(
        tmp_path,
        'volumes = ["/v"]\n[provider]\ntype = "reflink"\n'
        '[backup]\ntarget = "restic"\nsample_files = "5"\n',
    )
    assert problems(job) == [
        ("backup.sample_files", "wrong type: expected an integer, got string '5'",
         "write it without quotes: sample_files = 5"),
        ("backup", "the restic target needs `repository`", ""),
        ("backup.target", "restic is not installed",
         "apt-get install restic (or scripts/backup-setup.sh)"),
    ]  # fmt: skip


def test_job_file_writable_by_others_is_refused(tmp_path):
    job = write_job(tmp_path, GOOD.format(vol="/v"), mode=0o666)
    assert problems(job) == [(
        "(job file)", f"{job} is writable by others (mode 0666)",
        f"make it root's and writable only by root: chown root:root {job} && chmod go-w {job}",
    )]  # fmt: skip


def test_job_file_owned_by_another_user_is_refused(tmp_path):
    job = write_job(tmp_path, GOOD.format(vol="/v"))
    os.chown(job, 65534, 65534)
    assert problems(job)[0][:2] == ("(job file)", f"{job} is owned by uid 65534, not root")


def test_hook_script_writable_by_its_group_is_refused(tmp_path):
    script = tmp_path / "pre.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o775)
    job = write_job(tmp_path, GOOD.format(vol="/v") + (
        f'[[hooks.pre_freeze]]\ncommand = ["{script}"]\n'
        f'[[hooks.post_thaw]]\ncommand = ["/bin/sh", "{script}"]\n'
    ))  # fmt: skip
    message = f"{script} is writable by its group (mode 0775)"
    assert [p[:2] for p in problems(job)] == [
        ("hooks.pre_freeze[0].command", message),
        ("hooks.post_thaw[0].command", message),  # the script an interpreter runs, too
    ]


def test_hook_directory_script_owned_by_another_user_is_refused(tmp_path):
    hookdir = tmp_path / "hooks.d"
    hookdir.mkdir()
    script = hookdir / "10-app"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    os.chown(script, 65534, 0)
    job = write_job(tmp_path, GOOD.format(vol="/v") + f'[hooks]\ndirectory = "{hookdir}"\n')
    assert [p[:2] for p in problems(job)] == [
        ("hooks.directory", f"{script} is owned by uid 65534, not root")
    ]


def test_good_job_loads_with_defaults(loopfs, tmp_path):
    fs = loopfs("ext4")
    job = load_job(write_job(tmp_path, GOOD.format(vol=fs.path), name="db-nightly.toml"))
    assert job.name == "db-nightly"
    c = job.config
    assert (c.on_hook_failure, c.timeouts.freeze, c.timeouts.hook) == ("abort", 30.0, 60.0)
    assert c.provider.options == {"create": ["true"]}


def quiesce(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "quiesce", *args], capture_output=True,
                          text=True, timeout=60)  # fmt: skip


def test_check_cli_prints_every_problem_and_exits_2(tmp_path):
    job = write_job(tmp_path, 'volumes = ["/v"]\n[provider]\ntype = "command"\nextra = 1\n'
                    '[[hooks.pre_freeze]]\ncommand = ["/no/hook"]\n')  # fmt: skip
    p = quiesce("check", str(job))
    assert p.returncode == 2
    assert p.stdout == ""
    lines = p.stderr.splitlines()
    assert lines[0] == f"quiesce: {job}: 4 problems; nothing was run"
    assert "  provider.create: missing: the command provider needs it" in lines
    assert "  provider.extra: unknown key" in lines
    assert "  hooks.pre_freeze[0].command: /no/hook does not exist" in lines
    assert "  volumes[0]: /v: no such file or directory" in lines
    assert lines[-1].startswith("hint: fix the job file")
    j = json.loads(quiesce("check", str(job), "--json").stdout)
    assert j["exit_code"] == 2 and len(j["problems"]) == 4


def test_run_refuses_an_invalid_job_and_runs_nothing(loopfs, tmp_path):
    fs = loopfs("ext4")
    ran = tmp_path / "ran"
    job = write_job(
        tmp_path,
        f"""
volumes = ["{fs.path}"]
[provider]
type = "command"
create = ["true"]
[[hooks.pre_freeze]]
command = ["touch", "{ran}"]
[timeouts]
freeze = 0
""",
    )
    p = quiesce("run", str(job))
    assert p.returncode == 2
    assert "  timeouts.freeze: must be greater than 0" in p.stderr.splitlines()
    assert not ran.exists()


def test_dry_run_prints_the_plan_and_changes_nothing(loopfs, tmp_path):
    outer = loopfs("xfs")
    inner = loopfs("ext4", image_dir=outer.mountpoint)
    ran = tmp_path / "ran"
    job = write_job(
        tmp_path,
        f"""
name = "pair"
volumes = ["{outer.path}", "{inner.path}"]
state_dir = "{tmp_path / "state"}"
[provider]
type = "command"
create = ["touch", "{ran}"]
[[hooks.pre_freeze]]
name = "pause-app"
command = ["touch", "{ran}"]
[[hooks.post_thaw]]
name = "resume-app"
command = ["{PY}", "-c", "pass"]
""",
    )
    p = quiesce("run", str(job), "--dry-run", "--json")
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)
    assert report["dry_run"] is True
    order = [m["mount_point"] for m in report["plan"]["order"]]
    assert order == [inner.path, outer.path]  # the loop image's fs freezes first
    steps = report["steps"]
    assert f"FIFREEZE in order: {inner.path}, {outer.path}" in steps
    assert f"FITHAW in reverse order: {outer.path}, {inner.path}" in steps
    assert any(s.startswith("pre-freeze hook 'pause-app': touch ") for s in steps)
    assert steps.index(f"FITHAW in reverse order: {outer.path}, {inner.path}") < next(
        i for i, s in enumerate(steps) if s.startswith("post-thaw hook 'resume-app'")
    )
    human = quiesce("run", str(job), "--dry-run")
    assert human.returncode == 0
    assert "freeze order" in human.stdout and "FIFREEZE in order" in human.stdout
    assert not ran.exists() and not (tmp_path / "state").exists()
    assert is_writable(inner.path) and is_writable(outer.path)


def test_dry_run_shows_refused_hazards(tmp_path):
    """/ holds quiesce itself: the plan is refused, and the dry run says so."""
    job = write_job(tmp_path, GOOD.format(vol="/"))
    p = quiesce("check", str(job))
    assert p.returncode == 2
    assert "  volumes: / is the root filesystem" in p.stderr


def test_unfreezable_volume_is_refused_only_when_the_provider_freezes(loopfs, tmp_path):
    tmpfs = loopfs.tmpfs()
    job = write_job(tmp_path, f'volumes = ["{tmpfs}"]\n[provider]\ntype = "reflink"\n')
    assert [p[:2] for p in problems(job, check_volumes=True)] == [
        ("volumes", f"{tmpfs} is tmpfs, which cannot be frozen")
    ]
    atomic = write_job(tmp_path, f'volumes = ["{tmpfs}"]\n[provider]\ntype = "zfs"\n', "z.toml")
    # zfs never freezes: no freeze problem; its own check refuses a volume that is no dataset
    assert [p[:2] for p in problems(atomic, check_volumes=True)] == [
        ("provider", f"{tmpfs} is tmpfs, not a ZFS dataset")
    ]


# -- provider options: the provider's typed model, at their TOML keys -------------------------

PROVIDER_TYPOS = {  # provider: (typo, meant, value, allowed keys)
    "reflink": ("dset", "dest", '"/x"', "base, dest, mode"),
    "btrfs": ("dst", "dest", '"/x"', "dest"),
    "lvm": ("lvcreate_timout", "lvcreate_timeout", "30", "kernel, lvcreate_timeout, size"),
    "zfs": ("timout", "timeout", "30", "timeout"),
    "ebs": ("wait_dealy", "wait_delay", "5",
            "copy_tags, description, instance_id, profile, region, sysfs_root, tags, wait, "
            "wait_attempts, wait_delay"),
    "command": ("timout", "timeout", "30", "create, delete, list, timeout"),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(PROVIDER_TYPOS))
def test_a_typo_in_provider_is_refused_at_its_key(tmp_path, name):
    typo, meant, value, allowed = PROVIDER_TYPOS[name]
    create = 'create = ["true"]\n' if name == "command" else ""
    job = write_job(
        tmp_path, f'volumes = ["/v"]\n[provider]\ntype = "{name}"\n{create}{typo} = {value}\n'
    )
    assert problems(job) == [
        (f"provider.{typo}", "unknown key", f"did you mean '{meant}'? allowed here: {allowed}")
    ]


def test_a_job_built_in_python_refuses_a_provider_typo():
    from pydantic import ValidationError

    from quiesce.job.schema import JobConfig

    with pytest.raises(ValidationError, match=r"provider\.dset: Extra inputs are not permitted"):
        JobConfig(volumes=["/v"], provider={"type": "reflink", "dset": "/x"})
    c = JobConfig(volumes=["/v"], provider={"type": "reflink", "dest": "/x"})
    assert str(c.provider.settings.dest) == "/x" and c.provider.options == {"dest": "/x"}


def test_check_runs_the_provider_check_dest_on_another_filesystem(loopfs, tmp_path):
    """A reflink clone directory on another filesystem than the image failed only the run
    (exit 2, after the plan); `quiesce check` now refuses it at provider.dest."""
    from helpers.snaptools import image_on_reflink_host

    pair = image_on_reflink_host(loopfs)
    elsewhere = tmp_path / "clones"
    elsewhere.mkdir()
    state = tmp_path / "state"
    job = write_job(
        tmp_path,
        f'volumes = ["{pair.inner.path}"]\nstate_dir = "{state}"\n'
        f'[provider]\ntype = "reflink"\ndest = "{elsewhere}"\n',
    )
    p = quiesce("check", str(job))
    assert p.returncode == 2, p.stderr
    lines = p.stderr.splitlines()
    assert lines[0] == f"quiesce: {job}: 1 problem; nothing was run"
    assert lines[1].startswith(f"  provider.dest: cannot clone {pair.inner.image} into {elsewhere}")
    assert 'dest = "DIR"' in p.stderr and "--option" not in p.stderr  # the job's syntax
    assert list(elsewhere.iterdir()) == [] and not state.exists()
    assert is_writable(pair.inner.path)
    ok = write_job(
        tmp_path, f'volumes = ["{pair.inner.path}"]\n[provider]\ntype = "reflink"\n', "ok.toml"
    )
    assert load_job(ok).config.provider.type == "reflink"


# -- every directory above a job file or hook script is checked too -----------------------


def _nobody_dir(tmp_path: Path, name: str = "nobody") -> Path:
    """A directory uid 65534 owns: it could swap anything in it after a check."""
    d = tmp_path / name
    d.mkdir()
    os.chown(d, 65534, 65534)
    return d


def test_hook_script_in_a_directory_another_user_owns_is_refused(tmp_path):
    """A root-owned 0755 script passes by itself, but its directory's owner can replace it
    between `quiesce check` and the run: `quiesce check` exits 2 and names the TOML key."""
    d = _nobody_dir(tmp_path)
    script = d / "pre.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o755)  # root's, 0755
    job = write_job(tmp_path, GOOD.format(vol="/v") + (
        f'[[hooks.pre_freeze]]\ncommand = ["{script}"]\n'
        f'[[hooks.post_thaw]]\ncommand = ["/bin/sh", "{script}"]\n'
    ))  # fmt: skip
    message = f"{d} is owned by uid 65534, not root (it holds {script})"
    hint = f"make it root's and writable only by root: chown root:root {d} && chmod go-w {d}"
    assert problems(job) == [
        ("hooks.pre_freeze[0].command", message, hint),
        ("hooks.post_thaw[0].command", message, hint),
    ]
    p = quiesce("check", str(job))
    assert p.returncode == 2
    assert f"  hooks.pre_freeze[0].command: {message}" in p.stderr.splitlines()


def test_hook_directory_inside_a_directory_another_user_owns_is_refused(tmp_path):
    hookdir = _nobody_dir(tmp_path) / "hooks.d"
    hookdir.mkdir()
    job = write_job(tmp_path, GOOD.format(vol="/v") + f'[hooks]\ndirectory = "{hookdir}"\n')
    assert [p[:2] for p in problems(job)] == [
        ("hooks.directory", f"{hookdir.parent} is owned by uid 65534, not root (it holds "
         f"{hookdir})"),
    ]  # fmt: skip


def test_job_file_in_a_directory_another_user_owns_is_refused(tmp_path):
    d = _nobody_dir(tmp_path)
    job = write_job(d, GOOD.format(vol="/v"))
    assert problems(job) == [(
        "(job file)", f"{d} is owned by uid 65534, not root (it holds {job})",
        f"make it root's and writable only by root: chown root:root {d} && chmod go-w {d}",
    )]  # fmt: skip
    p = quiesce("check", str(job))
    assert p.returncode == 2 and "(job file)" in p.stderr


def test_a_link_to_a_job_file_is_checked_where_it_leads(tmp_path):
    """A root-owned symlink in a good directory, leading into another user's directory:
    the directory the link leads to is checked, not only the link's."""
    d = _nobody_dir(tmp_path)
    real = write_job(d, GOOD.format(vol="/v"))
    link = tmp_path / "job.toml"
    link.symlink_to(real)
    assert [p[:2] for p in problems(link)] == [
        ("(job file)", f"{d} is owned by uid 65534, not root (it holds {real})"),
    ]


def test_state_dir_another_user_can_write_is_a_problem_of_the_job(tmp_path):
    """`quiesce check` names the TOML key; `quiesce run` refuses it before any hook runs."""
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o1777)
    ran = tmp_path / "ran"
    hook = f'[[hooks.pre_freeze]]\ncommand = ["/usr/bin/touch", "{ran}"]\n'
    job = write_job(tmp_path, f'state_dir = "{state}"\n' + GOOD.format(vol="/v") + hook)
    found = problems(job)
    assert [p[:2] for p in found] == [
        ("state_dir", f"refusing the state directory {state}: {state} is writable by others "
         "(mode 1777)"),
    ]  # fmt: skip
    assert "--state-dir" in found[0][2]
    p = quiesce("run", str(job))
    assert p.returncode == 2 and "  state_dir: refusing the state directory" in p.stderr
    assert not ran.exists()


# -- secrets never in a job file ------------------------------------------------------------

MYSQL_PASSWORD_HINT = (
    'use defaults_file = "/etc/mysql/debian.cnf" (a root-owned 0600 option file with the '
    'password) or password_env = "NAME" (an environment variable quiesce reads)'
)
IN_THE_FILE = (
    "a password does not belong in the job file (anyone who can read it, a backup of /etc, "
    "a config repository would have it)"
)
SECRET_HINT = (
    "put it in a root-owned 0600 file and pass the file's path (e.g. PGPASSFILE, "
    "RESTIC_PASSWORD_FILE), or let the hook read it itself"
)
PG_HINT = (
    "remove it; use ~/.pgpass or PGPASSFILE (a root-owned 0600 file), or "
    'password_env = "NAME" (an environment variable quiesce reads)'
)
SECRET_BAD = [
    (
        '[[writers.mysql]]\nunix_socket = "/run/mysqld/mysqld.sock"\npassword = "x"\n',
        [("writers.mysql[0].password", IN_THE_FILE, MYSQL_PASSWORD_HINT)],
    ),
    (
        '[[writers.mysql]]\npassword_env = "not a name"\n',
        [("writers.mysql[0].password_env", "'not a name' is not an environment variable's name",
          'the NAME of the variable that holds the password: password_env = "DB_PW"')],
    ),
    (
        '[[writers.postgresql]]\ndsn = "host=/run/postgresql user=app password=pgsecret"\n'
        '[[writers.postgresql]]\ndsn = "postgresql://app:pgsecret@db.example/app"\n',
        [("writers.postgresql[0].dsn",
          "the dsn carries a password: host=/run/postgresql user=app password=***", PG_HINT),
         ("writers.postgresql[1].dsn",
          "the dsn carries a password: postgresql://app:***@db.example/app", PG_HINT)],
    ),
    (
        '[backup]\ntarget = "tar"\ndirectory = "/srv/tars"\npassphrase = "x"\n',
        [("backup.passphrase", IN_THE_FILE,
          'use password_file = "/etc/quiesce/restic.pass" (root-owned, mode 600) or '
          'password_env = "NAME" (an environment variable quiesce reads)')],
    ),
    (
        '[[hooks.pre_freeze]]\ncommand = ["/bin/true"]\n'
        'env = { PGHOST = "/run/postgresql", PGPASSWORD = "pgsecret", QUIESCE_JOB = "x", '
        '"1BAD" = "y", RESTIC_PASSWORD_FILE = "/etc/quiesce/pw", '
        'RESTIC_REPOSITORY = "rest:https://u:pgsecret@h/" }\n'
        "[hooks]\n",
        [("hooks.pre_freeze[0].env.PGPASSWORD", "a secret does not belong in the job file",
          SECRET_HINT),
         ("hooks.pre_freeze[0].env.QUIESCE_JOB", "quiesce sets the QUIESCE_* variables itself",
          "use another name"),
         ("hooks.pre_freeze[0].env.1BAD", "'1BAD' is not a valid variable name",
          "use letters, digits, '_'"),
         ("hooks.pre_freeze[0].env.RESTIC_REPOSITORY",
          "the value carries a password (user:pass@ or password=)",
          "put the password in a root-owned 0600 file the hook reads")],
    ),
    (
        '[[hooks.session]]\ncommand = ["/bin/true"]\nenv = { PORT = 5432 }\n',
        [("hooks.session[0].env.PORT", "wrong type: expected a string, got integer 5432",
          "see docs/jobs.md for this key's type")],
    ),
    (
        '[hooks]\ndirectory_env = { API_TOKEN = "tok" }\n',
        [("hooks.directory_env.API_TOKEN", "a secret does not belong in the job file",
          SECRET_HINT)],
    ),
]  # fmt: skip


@pytest.mark.parametrize(("text", "expected"), SECRET_BAD)
def test_secrets_in_the_job_file_are_refused(tmp_path, text, expected):
    job = write_job(tmp_path, GOOD.format(vol="/v") + text)
    assert problems(job) == expected
    with pytest.raises(JobConfigError) as e:
        load_job(job, check_volumes=False)
    shown = json.dumps(e.value.to_dict())
    assert "pgsecret" not in shown


def test_check_refuses_a_mysql_password_with_exit_2_naming_the_key(tmp_path):
    job = write_job(tmp_path, GOOD.format(vol="/v") + (
        '[[writers.mysql]]\nunix_socket = "/run/mysqld/mysqld.sock"\npassword = "s3cret-pw"\n'
    ))  # fmt: skip
    p = quiesce("check", str(job))
    assert p.returncode == ExitCode.USAGE == 2
    assert f"  writers.mysql[0].password: {IN_THE_FILE}" in p.stderr.splitlines()
    assert f"    hint: {MYSQL_PASSWORD_HINT}" in p.stderr.splitlines()
    assert "s3cret-pw" not in p.stderr + p.stdout


def test_an_unset_writer_password_env_stops_the_run_before_anything_runs(loopfs, tmp_path):
    fs = loopfs("ext4")
    ran = tmp_path / "ran"
    job = write_job(tmp_path, f"""
name = "pw"
volumes = ["{fs.path}"]
state_dir = "{tmp_path / "state"}"
[provider]
type = "command"
create = ["touch", "{ran}"]
[[hooks.pre_freeze]]
command = ["touch", "{ran}"]
[[writers.mysql]]
unix_socket = "/run/mysqld/mysqld.sock"
password_env = "QUIESCE_TEST_UNSET_DB_PW"
""")  # fmt: skip
    p = quiesce("run", str(job))
    assert p.returncode == ExitCode.USAGE, p.stderr
    assert (
        "quiesce: writers.mysql[0].password_env: the environment variable "
        "QUIESCE_TEST_UNSET_DB_PW is not set"
    ) in p.stderr
    dry = quiesce("run", str(job), "--dry-run")
    assert dry.returncode == ExitCode.USAGE, dry.stderr
    assert "quiesce: writers.mysql[0].password_env: the environment variable" in dry.stderr
    assert not ran.exists()
    assert is_writable(fs.path)


def test_check_json_shows_the_repository_without_its_password(loopfs, tmp_path):
    fs = loopfs("ext4")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "restic").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "restic").chmod(0o755)
    job = write_job(tmp_path, GOOD.format(vol=fs.path) + (
        '[backup]\ntarget = "restic"\nrepository = "rest:https://bk:r3po-pass@backup.example/"\n'
        'password_env = "RESTIC_PW"\n'
    ))  # fmt: skip
    env = os.environ | {"PATH": f"{bin_dir}:{os.environ['PATH']}", "RESTIC_PW": "x" * 12}
    p = subprocess.run([sys.executable, "-m", "quiesce", "check", "--json", str(job)],
                       capture_output=True, text=True, timeout=60, env=env)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["backup"] == {
        "target": "restic", "repository": "rest:https://bk:***@backup.example/",
    }  # fmt: skip
    assert "r3po-pass" not in p.stdout + p.stderr


def test_a_bare_hook_name_must_be_on_the_hooks_path(tmp_path, monkeypatch):
    """Hooks run with the hooks' PATH (or their env table's), not quiesce's."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "my-hook").write_text("#!/bin/sh\n")
    (bin_dir / "my-hook").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    job = write_job(
        tmp_path, GOOD.format(vol="/v") + '[[hooks.pre_freeze]]\ncommand = ["my-hook"]\n'
    )
    assert problems(job) == [(
        "hooks.pre_freeze[0].command",
        "my-hook is not on a hook's PATH (/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:"
        "/sbin:/bin)",
        "give its absolute path, or set PATH in the hook's env table",
    )]  # fmt: skip
    ok = write_job(tmp_path, GOOD.format(vol="/v") + (
        f'[[hooks.pre_freeze]]\ncommand = ["my-hook"]\nenv = {{ PATH = "{bin_dir}:/usr/bin" }}\n'
    ), name="ok.toml")  # fmt: skip
    assert load_job(ok, check_volumes=False).config.hooks.pre_freeze[0].env["PATH"]


def _backup_job(tmp_path: Path, vol: str, backup: str, extra: str = "") -> Path:
    return write_job(tmp_path, f"""
name = "nightly"
volumes = ["{vol}"]
state_dir = "{tmp_path / "state"}"
{extra}
[provider]
type = "command"
create = ["true"]

[backup]
{backup}
""")  # fmt: skip


def test_dry_run_prints_every_step_of_the_run_in_order(loopfs, tmp_path):
    """The backup, its verification, retention, the metrics file and the after-run hooks
    are steps of a run too (docs/jobs.md: "prints every step")."""
    fs = loopfs("ext4")
    job = _backup_job(
        tmp_path, fs.path,
        f'target = "tar"\ndirectory = "{tmp_path / "tars"}"\nverify = "full"\n'
        f'mount_root = "{tmp_path / "run"}"\nverify_dir = "{tmp_path}"\n',
        f'metrics_file = "{tmp_path / "m" / "q.prom"}"\n'
        '[retention]\nkeep_last = 2\n[[hooks.after_run]]\nname = "tell"\ncommand = ["true"]\n',
    )  # fmt: skip
    p = quiesce("run", str(job), "--dry-run", "--json")
    assert p.returncode == 0, p.stderr
    steps = json.loads(p.stdout)["steps"]
    wanted = [
        "FIFREEZE in order", "write the manifest", "backup: mount the snapshot read-only at "
        f"{tmp_path / 'run'}/nightly/", f"backup: tar backup to {tmp_path / 'tars'}",
        "verify (full)", "backup: unmount", "retention of the job's snapshots (keep_last = 2)",
        "prune the tar backups (keep_last = 2", f"metrics: write {tmp_path / 'm' / 'q.prom'}",
        "after-run hook 'tell'", "write the report",
    ]  # fmt: skip
    at = [next((i for i, s in enumerate(steps) if s.startswith(w)), None) for w in wanted]
    assert None not in at, list(zip(wanted, at, strict=True))
    assert at == sorted(at), steps
    assert not (tmp_path / "state").exists() and not (tmp_path / "tars").exists()


def test_check_makes_every_check_a_run_would_make(loopfs, tmp_path):
    """A missing restic repository, a password file others can read, an unusable mount
    root and metrics directory: each at its TOML key, before anything runs."""
    fs = loopfs("ext4")
    pw = tmp_path / "pw"
    pw.write_text("correct horse battery staple")
    pw.chmod(0o644)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    repo = tmp_path / "repo"
    backup = (
        f'target = "restic"\nrepository = "{repo}"\npassword_file = "{pw}"\n'
        f'verify = "none"\nmount_root = "{blocker}"\n'
    )
    job = _backup_job(tmp_path, fs.path, backup, f'metrics_file = "{blocker / "q.prom"}"\n')
    p = quiesce("check", str(job), "--json")
    assert p.returncode == ExitCode.USAGE, p.stderr
    got = {(x["path"], x["message"]) for x in json.loads(p.stdout)["problems"]}
    assert got == {
        ("backup.password_file", f"{pw} can be read by others (mode 644)"),
        ("backup.mount_root", f"{blocker} is not a directory"),
        ("metrics_file", f"{blocker} is not a directory"),
    }, got
    pw.chmod(0o600)
    p = quiesce("check", str(job), "--json")
    got = {(x["path"], x["message"]) for x in json.loads(p.stdout)["problems"]}
    assert ("backup.repository", f"no restic repository at {repo} that this password opens") in got
    job = _backup_job(
        tmp_path, fs.path, backup.replace(str(blocker), str(tmp_path / "run")) + "init = true\n",
        f'metrics_file = "{tmp_path / "m" / "q.prom"}"\n',
    )  # fmt: skip
    p = quiesce("check", str(job))
    assert p.returncode == 0, p.stderr
    # a check changes nothing: no repository, state, cache, mount root or metrics dir
    for made in (repo, tmp_path / "state", tmp_path / "run", tmp_path / "m"):
        assert not made.exists(), made


# -- every TOML example of the docs loads ----------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# What an example cannot have on this machine (its scripts, files and directories): the
# only problems an example may have. Anything else (a key, a type, a value) is drift.
MACHINE_ONLY = re.compile(r"(does not exist|is not a directory|is not installed)$")


def _toml_examples() -> list[tuple[str, int, str]]:
    return [
        (doc.name, i, m.group(1))
        for doc in DOCS
        for i, m in enumerate(re.finditer(r"```toml\n(.*?)```", doc.read_text(), re.S))
    ]


def _doc_problems(text: str, tmp_path: Path) -> list[str]:
    """Load ``text`` as a job with the real loader (a fragment gets the keys a job must
    have), returning every problem that is not about this machine."""
    raw = tomllib.loads(text)
    head = "" if "volumes" in raw else 'volumes = ["/srv/data"]\n'
    tail = "" if "provider" in raw else '\n[provider]\ntype = "command"\ncreate = ["true"]\n'
    path = tmp_path / "example.toml"
    path.write_text(head + text + tail)
    path.chmod(0o600)
    try:
        load_job(path, check_volumes=False)
    except JobConfigError as e:
        return [str(p) for p in e.problems if not MACHINE_ONLY.search(p.message)]
    return []


def test_the_docs_have_toml_examples():
    found = {(doc, i) for doc, i, _ in _toml_examples()}
    assert {("README.md", 0), ("jobs.md", 0), ("jobs.md", 1), ("jobs.md", 2)} <= found


@pytest.mark.parametrize(("doc", "i", "text"), _toml_examples(), ids=lambda v: str(v)[:20])
def test_every_toml_example_in_the_docs_loads(doc: str, i: int, text: str, tmp_path):
    assert _doc_problems(text, tmp_path) == [], f"{doc} TOML example {i}"


def test_a_drifted_toml_example_is_caught(tmp_path):
    """The negative control: a renamed key or a wrong default type in an example fails."""
    [text] = [t for doc, i, t in _toml_examples() if (doc, i) == ("jobs.md", 0)]
    assert _doc_problems(text.replace("freeze = 30", "freez = 30"), tmp_path)
    assert _doc_problems(text.replace("lease = 5", 'lease = "5"'), tmp_path)
