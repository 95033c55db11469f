"""What `quiesce check` adds to loading a job: every check a run would make on the
machine before it touches anything, each problem at its TOML key.

Loading (job/validate.py) checks the file and what is cheap to check; this also asks the
backup target (is the repository there, can it be opened with the job's password, even
with ``init = true``), reads the password file's owner and mode, connects each writer
with the job's credentials (privileges, the lock, the files it depends on: on the group),
and looks at the directories a run writes to: the mount root, the verification
directory, the metrics file's directory. It changes nothing: the target is only asked
to open its repository, a writer's lock is dropped at once.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from quiesce.backup.config import BackupConfig
from quiesce.errors import QuiesceError
from quiesce.host import images
from quiesce.host.trust import TrustError, open_checked
from quiesce.job.schema import Job, Problem
from quiesce.util.redact import redact

_PROGRAMS = {"restic": ("restic", "restic"), "borg": ("borg", "borgbackup")}


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _directory_problem(key: str, value: str, what: str, *, create: bool) -> Problem | None:
    """``value`` is (or, with ``create``, can be made below) a writable directory."""
    p = Path(value)
    if not p.is_absolute():
        return Problem(key, f"{value!r} is not an absolute path", f'{key.split(".")[-1]} = "/…"')
    if p.exists() and not p.is_dir():
        return Problem(key, f"{value} is not a directory", f"name a directory for {what}")
    base = p if p.exists() else _nearest_existing(p)
    if not p.exists() and not create:
        return Problem(key, f"{value} does not exist", f"create it (mkdir -p {value})")
    if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
        return Problem(
            key,
            f"{base} is not writable" + (f" (where {value} would be made)" if base != p else ""),
            f"make it writable by root, or name another directory for {what}",
        )
    if key in _TRUSTED_DIRS:
        return _trust_problem(key, base, what)
    return None


# Directories a run mounts into or writes root's files in: the same trust check as the
# state directory (host/trust.py), which the run itself makes too.
_TRUSTED_DIRS = frozenset({"backup.mount_root", "metrics_file"})


def _trust_problem(key: str, base: Path, what: str) -> Problem | None:
    try:
        checked = open_checked(base, os.O_RDONLY | os.O_DIRECTORY, as_parent=True)
    except (TrustError, OSError) as e:
        return Problem(key, f"refusing {base}: {e}", f"name a directory root alone owns for {what}")
    os.close(checked.fd)
    if checked.problem is None:
        return None
    return Problem(
        key,
        f"refusing {base}: {checked.problem}",
        f"make {checked.culprit} root's and not writable by group or others, or name another "
        f"directory for {what}",
    )


def _password_problems(b: BackupConfig) -> list[Problem]:
    problems = []
    if b.password_file:
        f = Path(b.password_file)
        try:
            st = f.stat()
        except OSError:
            return []  # loading said it does not exist
        if st.st_mode & 0o077:
            problems.append(
                Problem(
                    "backup.password_file",
                    f"{f} can be read by others (mode {st.st_mode & 0o777:o})",
                    f"chmod 600 {f}",
                )
            )
        if os.geteuid() == 0 and st.st_uid != 0:
            problems.append(
                Problem(
                    "backup.password_file",
                    f"{f} is owned by uid {st.st_uid}, not root",
                    f"chown root:root {f}",
                )
            )
    if b.password_env and b.password_env not in os.environ:
        problems.append(
            Problem(
                "backup.password_env",
                f"the environment variable {b.password_env} is not set",
                "export it for quiesce (systemd: EnvironmentFile= or LoadCredential=)",
            )
        )
    return problems


@contextlib.contextmanager
def _borg_base(job: Job) -> Iterator[Path]:
    """The run's BORG_BASE_DIR when the state directory exists, else a throwaway one
    (a check must not create the state directory)."""
    from quiesce.state.statedir import state_dir

    state = state_dir(job.config.state_dir)
    if (state / "borg").is_dir():
        yield state
        return
    with tempfile.TemporaryDirectory(prefix="quiesce-check-") as tmp:
        yield Path(tmp)


def _repository_problems(job: Job, b: BackupConfig) -> list[Problem]:
    """The repository can be opened with the job's password, or ``init = true``."""
    from quiesce.backup.phase import make_target

    if b.target not in _PROGRAMS or shutil.which(_PROGRAMS[b.target][0]) is None:
        return []  # tar, or not installed (loading says so)
    try:
        with _borg_base(job) as state:
            target = make_target(b, job.name, state)
            if target.exists():
                return []
            said = target.locked_out()  # init = true or not: init must not be tried here
            if said:
                return [
                    Problem(
                        "backup.password_file" if b.password_file else "backup.password_env",
                        said,
                        "fix the password (init = true never touches an existing repository)",
                    )
                ]
    except QuiesceError as e:
        return [Problem("backup.repository", e.message, e.hint)]
    if b.init:
        return []  # the first backup creates it
    repo = redact(b.repository or "")
    return [
        Problem(
            "backup.repository",
            f"no {b.target} repository at {repo} that this password opens",
            "set init = true (the first backup creates it), or fix repository/password_file",
        )
    ]


def _backup_problems(job: Job, b: BackupConfig) -> list[Problem]:
    problems = _password_problems(b)
    if not problems:
        problems += _repository_problems(job, b)
    for key, value, what, create in (
        ("backup.mount_root", b.mount_root, "the snapshot mounts", True),
        ("backup.verify_dir", b.verify_dir if b.check in ("sample", "full") or b.drill else None,
         "verification restores", False),
        ("backup.directory", b.directory, "the tar files", True),
        ("backup.sha256_dir", b.sha256_dir, "the .sha256 files", True),
    ):  # fmt: skip
        if value:
            problem = _directory_problem(key, value, what, create=create)
            if problem is not None:
                problems.append(problem)
    return problems


def _guest_disk_problems(job: Job) -> list[Problem]:
    """``qemu`` with ``[backup]``: each guest disk must hold one bare filesystem, which
    the backup mounts read-only (providers/qemu.py ``mount_view``); found here from the
    live image's superblock (read only), not first at night after the snapshot."""
    opts = job.config.provider.settings
    out = []
    for i, guest in enumerate(getattr(opts, "guests", [])):
        for j, image in enumerate(guest.images):
            if not Path(image).is_file():
                continue  # the provider's own check says so
            try:
                found = images.contents(str(image))
            except (OSError, QuiesceError) as e:
                out.append(
                    Problem(f"provider.guests[{i}].images[{j}]", f"cannot read {image}: {e}")
                )
                continue
            if found.fstype is None:
                out.append(
                    Problem(
                        f"provider.guests[{i}].images[{j}]",
                        f"guest {guest.name}: {image} holds {found.what}: the backup mounts "
                        "each disk clone read-only as one filesystem",
                        "back up disks that hold one filesystem each (mkfs on the whole raw "
                        "disk), or this disk from inside the guest (docs/vm.md)",
                    )
                )
    return out


def _writer_keys(job: Job) -> list[str]:
    """Each writer's TOML key, in build_writers' order."""
    w = job.config.writers
    return [f"writers.{kind}[{i}]" for kind in ("sqlite", "postgresql", "mysql")
            for i in range(len(getattr(w, kind)))]  # fmt: skip


def _writer_problems(job: Job) -> list[Problem]:
    """Each writer connects with the job's credentials, may do what its steps need, and
    every file it (or a hook's ``depends_on``) depends on lies on the group: what the
    run's check phase refuses. Nothing is changed (a lock taken is dropped at once)."""
    from quiesce.errors import UsageError
    from quiesce.freezing.plan import resolve_group
    from quiesce.host.mounts import MountTable
    from quiesce.job.build import build_writers, hook_files
    from quiesce.snapshot.consistency import prove_on_group

    try:
        writers = build_writers(job.config)
    except UsageError as e:
        key, _, msg = e.message.partition(": ")
        return [Problem(key, msg, e.hint)]
    problems: list[Problem] = []
    declared = hook_files(job)
    keys: dict[str, str] = {}
    for key, w in zip(_writer_keys(job), writers, strict=True):
        said = [" ".join(p.split()) for p in w.readiness()]  # a client's message: one line
        problems += [Problem(key, p) for p in said]
        if not said:
            declared[f"writer {w.name}"] = w.depends_on()
            keys[f"writer {w.name}"] = key
    if problems or not any(declared.values()):
        return problems
    table = MountTable.read()
    try:
        members = resolve_group(list(job.config.volumes), table)
    except QuiesceError:
        return problems  # the volumes' own problems are reported by loading
    try:
        prove_on_group(declared, members, table)
    except QuiesceError as e:
        who = e.message.split(" depends on ", 1)[0]
        problems.append(Problem(keys.get(who, "hooks"), e.message, e.hint))
    finally:
        for m in members:
            for t in m.targets:
                t.close()
    return problems


def trust_problems(job: Job) -> list[Problem]:
    """The trust checks of backup.mount_root and the metrics directory (who may write
    there): TODO(truth): wire state/ and backup/'s checks in here when merging."""
    return []


def readiness_problems(job: Job) -> list[Problem]:
    """Every problem a run would meet on this machine, beyond the job file's own."""
    c = job.config
    problems = _writer_problems(job)
    problems += trust_problems(job)
    problems += _backup_problems(job, c.backup) if c.backup is not None else []
    if c.backup is not None and c.provider.type == "qemu":
        problems += _guest_disk_problems(job)
    if c.metrics_file:
        parent = str(Path(c.metrics_file).parent)
        problem = _directory_problem("metrics_file", parent, "the metrics file", create=True)
        if problem is not None:
            problems.append(problem)
    return problems


__all__ = ["readiness_problems"]
