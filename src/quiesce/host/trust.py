"""Whether root may believe a file: one check for the state directory, job files, hook
scripts and the hook directory.

Like sudo and cron, a file that steers root must be root's and writable by nobody else,
and so must every directory above it, or another user could swap the file under it (a
root-owned sticky directory such as /tmp is fine as a parent: others cannot replace
root's entries in it). The path is walked from ``/`` one component at a time with
``openat(O_NOFOLLOW)``, and each step is checked through its own fd (fstat), so what
was checked is what was opened: no window between the check and the use. Symbolic links
are followed only where the caller allows it (``follow=True``), and only out of
directories that passed the check (nobody else can change such a link).
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from quiesce.errors import TrustError

_MAX_LINKS = 40
_WRITABLE = stat.S_IWGRP | stat.S_IWOTH


def _who(mode: int) -> str:
    return "others" if mode & stat.S_IWOTH else "its group"


def object_problem(st: os.stat_result, shown: str) -> str | None:
    """Why the object itself (``st`` of ``shown``) is not root's alone, or None."""
    if st.st_uid != 0:
        return f"{shown} is owned by uid {st.st_uid}, not root"
    if st.st_mode & _WRITABLE:
        return f"{shown} is writable by {_who(st.st_mode)} (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def parent_problem(st: os.stat_result, shown: str, target: str) -> str | None:
    """Why the directory ``shown`` above ``target`` lets others swap what it holds."""
    if st.st_uid != 0:
        return f"{shown} is owned by uid {st.st_uid}, not root (it holds {target})"
    if st.st_mode & _WRITABLE and not st.st_mode & stat.S_ISVTX:
        mode = stat.S_IMODE(st.st_mode)
        return f"{shown} is writable by {_who(st.st_mode)} (mode {mode:04o}; it holds {target})"
    return None


@dataclass
class Checked:
    """An fd opened by :func:`open_checked`, the path it was reached by (links resolved),
    and the first problem found on the way (``None``: trusted)."""

    fd: int
    path: str
    problem: str | None = None
    culprit: str = ""


def open_checked(
    path: str | Path,
    flags: int = os.O_RDONLY,
    mode: int = 0o600,
    *,
    follow: bool = False,
    as_parent: bool = False,
) -> Checked:
    """Open ``path`` walking from ``/`` with O_NOFOLLOW and check every step by its fd.

    Returns the fd even when a check failed (``problem`` says why), so that a caller may
    still report what else is wrong with a job file; raises OSError when the path cannot
    be opened, and TrustError for a symbolic link at the end when ``follow`` is False.
    ``flags`` may hold O_CREAT (then the new file gets ``mode``) and O_DIRECTORY.
    ``as_parent`` checks the last component as a directory that will hold what the
    caller makes in it (a root-owned sticky directory passes).
    """
    target = os.path.abspath(os.fspath(path))
    parts = [p for p in target.split("/") if p and p != "."]
    cur = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    where = "/"
    found: tuple[str, str] | None = None

    def note(problem: str | None, culprit: str) -> None:
        nonlocal found
        if problem and found is None:
            found = (problem, culprit)

    links = 0
    try:
        note(parent_problem(os.fstat(cur), "/", os.path.join("/", *parts)), "/")
        while parts:
            name = parts.pop(0)
            last = not parts
            shown = os.path.normpath(os.path.join(where, name))
            creating = last and flags & os.O_CREAT
            try:
                if creating:
                    fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=cur)
                else:
                    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=cur)
            except OSError as e:
                if creating and e.errno == errno.ELOOP:
                    raise _link_error(shown) from None
                raise
            st = os.fstat(fd)
            if stat.S_ISLNK(st.st_mode):
                os.close(fd)
                if last and not follow:
                    raise _link_error(shown)
                links += 1
                if links > _MAX_LINKS:
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), target)
                link = os.readlink(name, dir_fd=cur)
                parts = [p for p in link.split("/") if p and p != "."] + parts
                if link.startswith("/"):
                    os.close(cur)
                    cur = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
                    where = "/"
                continue
            if last:
                if not flags & os.O_CREAT:
                    os.close(fd)
                    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                        raise TrustError(
                            f"{shown} is not a regular file or directory",
                            "name a file that root owns",
                            culprit=shown,
                        )
                    fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=cur)
                    st = os.fstat(fd)
                last_problem = (
                    parent_problem(st, shown, shown) if as_parent else object_problem(st, shown)
                )
                note(last_problem, shown)
                os.close(cur)
                cur = -1
                problem, culprit = found or (None, "")
                return Checked(fd, shown, problem, culprit)
            if not stat.S_ISDIR(st.st_mode):
                os.close(fd)
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), shown)
            note(parent_problem(st, shown, os.path.join(shown, *parts)), shown)
            os.close(cur)
            cur, where = fd, shown
        # the path was "/" itself
        fd = os.open("/", flags | os.O_CLOEXEC)
        note(object_problem(os.fstat(fd), "/"), "/")
        problem, culprit = found or (None, "")
        return Checked(fd, "/", problem, culprit)
    finally:
        if cur >= 0:
            os.close(cur)


def _link_error(shown: str) -> TrustError:
    return TrustError(
        f"{shown} is a symbolic link",
        f"root does not follow links here: remove {shown} if root did not make it",
        culprit=shown,
    )


def open_trusted(
    path: str | Path,
    flags: int = os.O_RDONLY,
    mode: int = 0o600,
    *,
    follow: bool = False,
    hint: str | None = None,
) -> int:
    """:func:`open_checked`, but a file or directory that is not root's alone raises
    TrustError (with ``hint``) instead of being returned."""
    checked = open_checked(path, flags, mode, follow=follow)
    if checked.problem:
        os.close(checked.fd)
        raise TrustError(checked.problem, hint, culprit=checked.culprit)
    return checked.fd


def trust_problem(path: str | Path, *, follow: bool = True, directory: bool = False) -> str | None:
    """Why root must not trust ``path`` (or a directory above it), or None if it may."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if directory else 0)
    try:
        checked = open_checked(path, flags, follow=follow)
    except TrustError as e:
        return e.message
    except OSError as e:
        return f"cannot open {path}: {e.strerror}"
    os.close(checked.fd)
    return checked.problem


def make_private_dirs(path: str | Path) -> list[Path]:
    """mkdir the missing components of ``path``, each 0700 whatever the umask (what
    quiesce creates is private); returns the directories made, outermost first."""
    missing: list[Path] = []
    probe = Path(os.path.abspath(path))
    while not os.path.lexists(probe) and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    made = []
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            continue  # made meanwhile by someone else: not ours
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fchmod(fd, 0o700)  # a umask such as 0277 would have taken root's own bits
        finally:
            os.close(fd)
        made.append(d)
    return made


def open_trusted_dir(
    path: str | Path, *, create: bool = False, what: str = "", as_parent: bool = False
) -> int:
    """An fd (O_RDONLY|O_DIRECTORY, reached without following a link) of a directory
    that root may trust, every directory above it included; with ``create``, the missing
    components are made 0700 once the directory they go into passed the check (a refusal
    makes nothing). TrustError names the first culprit; ``what`` says what it is for
    (the TOML key), so the one-line message tells the user what to change. ``as_parent``:
    the directory only holds what root makes in it (a root-owned sticky one passes)."""
    where = f"{what} {path}" if what else str(path)
    target = os.path.abspath(os.fspath(path))
    if create and not os.path.lexists(target):
        base = target
        while not os.path.lexists(base) and base != "/":
            base = os.path.dirname(base)
        checked = open_checked(base, os.O_RDONLY | os.O_DIRECTORY, as_parent=True)
        os.close(checked.fd)
        if checked.problem:
            raise TrustError(f"refusing {where}: {checked.problem}", culprit=checked.culprit)
        make_private_dirs(target)
    try:
        checked = open_checked(target, os.O_RDONLY | os.O_DIRECTORY, as_parent=as_parent)
    except TrustError as e:
        raise TrustError(f"refusing {where}: {e.message}", e.hint, culprit=e.culprit) from None
    if checked.problem:
        os.close(checked.fd)
        raise TrustError(
            f"refusing {where}: {checked.problem}",
            f"make {checked.culprit} root's and not writable by group or others, or name a "
            "directory that is",
            culprit=checked.culprit,
        )
    st = os.fstat(checked.fd)
    if not stat.S_ISDIR(st.st_mode):
        os.close(checked.fd)
        raise TrustError(f"refusing {where}: it is not a directory", culprit=target)
    return checked.fd


def read_all(fd: int) -> bytes:
    """Everything from ``fd``'s current offset to its end."""
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


__all__ = [
    "Checked",
    "TrustError",
    "make_private_dirs",
    "object_problem",
    "open_checked",
    "open_trusted",
    "open_trusted_dir",
    "parent_problem",
    "read_all",
    "trust_problem",
]
