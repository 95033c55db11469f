"""Redaction: the one place that decides what a secret looks like and masks it.

Everything quiesce shows (reports, errors, ``quiesce check --json``, metrics, the report
an ``after_run`` hook reads on stdin) goes through :func:`redact` or :func:`redact_data`:

- the password of a URL (``rest:https://user:pass@host/``, ``s3:https://key:secret@...``,
  ``sftp:user:pass@host:/srv``, ``ssh://user:pass@host/``) becomes ``***``; a URL
  without a password is left exactly as it was;
- ``password=...`` (libpq DSNs, option strings) becomes ``password=***``;
- every secret value quiesce has read (:func:`register_secret`: a password from a file
  or an environment variable, the password of a repository URL), and the values of
  secret-named variables in quiesce's own environment, become ``***`` wherever they
  appear (a target that echoes its password on stderr, a hook that prints it).

It sits in the lowest layer so that every layer above can use it.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import unquote

MASK = "***"

# scheme://user:password@host — RFC 3986 userinfo: no '/', '?', '#' (or whitespace);
# the password runs to the last '@' before the host, so a raw '@' in it is covered too.
_URL_PASSWORD = re.compile(
    r"(?P<head>(?<![A-Za-z0-9+.\-])[A-Za-z][A-Za-z0-9+.\-]*://[^\s/?#@:]*:)"
    r"(?P<pw>[^\s/?#]+)(?=@)"
)
# restic's scp-like sftp form: sftp:user:password@host:/path
_SFTP_PASSWORD = re.compile(
    r"(?P<head>(?<![A-Za-z0-9+.\-])sftp:(?!//)[^\s/?#@:]+:)(?P<pw>[^\s/?#]+)(?=@)"
)
# password=... in a libpq DSN, a query string or an option list
_KV_PASSWORD = re.compile(
    r"(?P<head>(?<![A-Za-z0-9])(?:password|passwd|passphrase)\s*=\s*)"
    r"(?P<pw>'(?:[^'\\]|\\.)*'|\"[^\"]*\"|[^\s&;,]+)",
    re.IGNORECASE,
)
_SECRET_NAME = re.compile(r"PASSWORD|PASSWD|PASSPHRASE|SECRET|TOKEN|KEY|CREDENTIAL")
_SECRET_PREFIXES = ("RESTIC_", "BORG_", "AWS_")
_SECRET_NAMES = frozenset({"PGPASSWORD", "MYSQL_PWD"})
_PATH_SUFFIXES = ("_FILE", "_PATH", "_DIR", "_COMMAND", "_CMD")
AMBIENT_MIN = 8  # shorter values of secret-named variables are not scrubbed (too common)

_lock = threading.Lock()
_secrets: set[str] = set()


def is_secret_name(name: str) -> bool:
    """Whether an environment variable of this name may hold a secret (or point a tool
    at one: RESTIC_*, BORG_*, AWS_*): such variables never reach a hook."""
    up = name.upper()
    return (
        up in _SECRET_NAMES
        or up.endswith("_PWD")
        or up.startswith(_SECRET_PREFIXES)
        or _SECRET_NAME.search(up) is not None
    )


def holds_secret_value(name: str) -> bool:
    """Whether a variable of this name holds a secret's value itself (``PGPASSWORD``),
    not the path of a file or command that yields one (``RESTIC_PASSWORD_FILE``)."""
    up = name.upper()
    if up.endswith(_PATH_SUFFIXES) or up == "BORG_PASSCOMMAND":
        return False
    return up in _SECRET_NAMES or up.endswith("_PWD") or _SECRET_NAME.search(up) is not None


def url_passwords(text: str) -> list[str]:
    """The passwords of the URLs (and ``password=`` entries) in ``text``."""
    found = [m.group("pw") for rx in (_URL_PASSWORD, _SFTP_PASSWORD) for m in rx.finditer(text)]
    found += [m.group("pw").strip("'\"") for m in _KV_PASSWORD.finditer(text)]
    return [p for p in found if p]


def has_credentials(text: str) -> bool:
    """Whether ``text`` carries a password (a URL's ``user:pass@`` or ``password=``)."""
    return bool(url_passwords(text))


def redact_url(text: str) -> str:
    """``text`` with the password of every URL and ``password=`` entry replaced by
    ``***``; text without credentials is returned unchanged."""
    if ":" not in text and "=" not in text:
        return text
    for rx in (_URL_PASSWORD, _SFTP_PASSWORD, _KV_PASSWORD):
        text = rx.sub(lambda m: m.group("head") + MASK, text)
    return text


def register_secret(value: str | None) -> None:
    """Remember a secret quiesce has read, so that it is scrubbed from all output."""
    if not value:
        return
    with _lock:
        for v in {value, value.strip(), unquote(value)}:
            if v.strip() and v != MASK:
                _secrets.add(v)


_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:")


def _job_url_password(text: str) -> str | None:
    """The password of one URL as a job names it (a repository): ``backend:`` or
    ``scheme:``, then ``//`` or ``scheme://`` (or neither: ``sftp:user:pw@host:/x``),
    then ``user:password@host``, the password running to the last '@' even with a '/'
    in it (AWS secret keys have them; RFC 3986 wants them percent-encoded)."""
    m = _SCHEME.match(text)
    if m is None:
        return None
    rest = text[m.end() :]
    m = re.match(r"(?:[A-Za-z][A-Za-z0-9+.\-]*:)?//", rest)
    rest = rest[m.end() :] if m else rest
    userinfo, at, host = rest.rpartition("@")
    user, colon, password = userinfo.partition(":")
    if not at or not colon or not password or any(c in user for c in "/@ \t\n"):
        return None
    return password if not any(c.isspace() for c in password + host) else None


def register_url_secrets(text: str | None) -> None:
    """Remember the passwords of a URL (a repository, a DSN) that the job names: from
    then on they are scrubbed wherever they appear, even where :func:`redact_url`, which
    must not guess in free text, would not recognise them."""
    text = (text or "").strip()
    found = url_passwords(text)
    whole = _job_url_password(text)
    if whole:
        found.append(whole)
    for pw in found:
        register_secret(pw)


def register_secret_file(path: str | os.PathLike[str]) -> None:
    """Remember the password a file holds (what restic, borg and libpq read from it:
    the whole file and its first line, without the trailing newline)."""
    try:
        with open(path, "rb") as f:
            data = f.read(65536).decode(errors="replace")
    except OSError:
        return  # the tool reading it will say what is wrong
    register_secret(data.rstrip("\r\n"))
    lines = data.splitlines()
    if lines:
        register_secret(lines[0])


def known_secrets(environ: Mapping[str, str] | None = None) -> list[str]:
    """Every value to scrub, longest first: the registered secrets and the values of
    secret-named variables of quiesce's environment."""
    env = os.environ if environ is None else environ
    with _lock:
        values = set(_secrets)
    values |= {
        v for k, v in env.items() if len(v) >= AMBIENT_MIN and holds_secret_value(k) and v != MASK
    }
    return sorted(values, key=len, reverse=True)


def scrub(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every one of ``secrets`` replaced by ``***``."""
    for s in secrets:
        if s in text:
            text = text.replace(s, MASK)
    return text


def redact(text: str, *, secrets: Iterable[str] | None = None) -> str:
    """``text`` as quiesce may show it: URL credentials and known secrets masked."""
    if not text:
        return text
    return scrub(redact_url(text), known_secrets() if secrets is None else secrets)


def redact_data(obj: Any, *, secrets: Iterable[str] | None = None) -> Any:
    """A copy of JSON-like data (dicts, lists, strings) with every string redacted."""
    found = list(known_secrets() if secrets is None else secrets)

    def walk(x: Any) -> Any:
        if isinstance(x, str):
            return redact(x, secrets=found)
        if isinstance(x, Mapping):
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [walk(v) for v in x]
        return x

    return walk(obj)


__all__ = [
    "MASK",
    "has_credentials",
    "holds_secret_value",
    "is_secret_name",
    "known_secrets",
    "redact",
    "redact_data",
    "redact_url",
    "register_secret",
    "register_secret_file",
    "register_url_secrets",
    "scrub",
    "url_passwords",
]
