"""quiesce.util.redact: URL credentials and known secrets never reach what quiesce shows.

Property tests (hypothesis) for the URL forms restic and borg take, and worked examples."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from quiesce.util.redact import (
    MASK,
    has_credentials,
    is_secret_name,
    redact,
    redact_data,
    redact_url,
    register_secret,
    register_url_secrets,
)

# RFC 3986 userinfo characters (a raw '@' too: users write it; ':' only in the password)
_UNRESERVED = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~"
_SUB_DELIMS = "!$&'()*+,;="
users = st.text(_UNRESERVED + "!$&'()*+,;%", min_size=1, max_size=12)
passwords = st.text(_UNRESERVED + _SUB_DELIMS + "%:@", min_size=1, max_size=24)
hosts = st.from_regex(r"[a-z][a-z0-9-]{0,10}(\.[a-z][a-z0-9-]{0,8}){0,2}(:[0-9]{2,5})?",
                      fullmatch=True)  # fmt: skip
paths = st.from_regex(r"(/[A-Za-z0-9._~-]{1,8}){0,3}/?", fullmatch=True)
schemes = st.sampled_from(
    ["rest:https://", "rest:http://", "s3:https://", "ssh://", "sftp://", "https://",
     "postgresql://", "swift+https://"]
)  # fmt: skip


def _url_with_password(scheme: str, user: str, pw: str, host: str, path: str) -> str:
    return f"{scheme}{user}:{pw}@{host}{path}"


@settings(max_examples=300)
@given(schemes, users, passwords, hosts, paths, st.sampled_from(["", "repo: ", "Fatal: "]),
       st.sampled_from(["", " does not exist", "\nnext line"]))  # fmt: skip
def test_a_url_password_never_survives(scheme, user, pw, host, path, before, after):
    url = _url_with_password(scheme, user, pw, host, path)
    shown = redact_url(before + url + after)
    assert shown == before + f"{scheme}{user}:{MASK}@{host}{path}" + after
    assert has_credentials(url)


@settings(max_examples=300)
@given(users, passwords, hosts, paths)
def test_restic_sftp_form_password_never_survives(user, pw, host, path):
    url = f"sftp:{user}:{pw}@{host}:{path or '/srv'}"
    assert redact_url(url) == f"sftp:{user}:{MASK}@{host}:{path or '/srv'}"


@settings(max_examples=300)
@given(schemes, st.one_of(st.just(""), users.map(lambda u: u + "@")), hosts, paths)
def test_urls_without_a_password_are_unchanged(scheme, user, host, path):
    url = f"{scheme}{user}{host}{path}"
    assert redact_url(url) == url
    assert not has_credentials(url)
    assert redact_url(f"sftp:{user}{host}:/srv/restic") == f"sftp:{user}{host}:/srv/restic"


@settings(max_examples=200)
@given(st.text(min_size=0, max_size=80))
def test_redaction_is_idempotent(text):
    once = redact_url(text)
    assert redact_url(once) == once


def test_worked_examples():
    assert redact_url("rest:https://user:pass@host/") == "rest:https://user:***@host/"
    aws = "s3:https://AKIA:wJal/rXUtn@s3.example.com/b"  # a '/' in the secret key
    assert redact_url(aws) == aws  # in free text, '/' ends RFC 3986's userinfo: no guess
    register_url_secrets(aws)  # but a repository the job names is parsed to its last '@'
    assert redact(f"repo {aws}: denied") == "repo s3:https://AKIA:***@s3.example.com/b: denied"
    assert redact_url("s3:https://AKIA:wJalr@s3.example.com/b") == (
        "s3:https://AKIA:***@s3.example.com/b"
    )
    assert redact_url("ssh://borg:p@ss@backup.example:22/./repo") == (
        "ssh://borg:***@backup.example:22/./repo"
    )
    assert redact_url("host=/run/postgresql user=app password='se cret' dbname=x") == (
        "host=/run/postgresql user=app password=*** dbname=x"
    )
    plain = ["ssh://borg@host:22/./repo", "/srv/backup/restic", "borg@host:repo",
             "s3:s3.amazonaws.com/bucket", "rest:https://host:8000/",
             "sftp:user@host:/srv/restic", "RESTIC_PASSWORD_FILE=/etc/quiesce/pw"]  # fmt: skip
    for url in plain:
        assert redact_url(url) == url
        register_url_secrets(url)  # nothing to remember
        assert redact(url) == url


def test_registered_secrets_and_secret_environment_values_are_scrubbed(monkeypatch):
    register_secret("Tr0ub4dor&3-registered")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    monkeypatch.setenv("RESTIC_PASSWORD_FILE", "/etc/quiesce/restic.pass")  # a path: shown
    text = (
        "got Tr0ub4dor&3-registered and wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY "
        "from /etc/quiesce/restic.pass"
    )
    assert redact(text) == "got *** and *** from /etc/quiesce/restic.pass"
    data = {"hooks": [{"output": text, "returncode": 0}], "n": 1.5}
    assert redact_data(data) == {
        "hooks": [{"output": "got *** and *** from /etc/quiesce/restic.pass", "returncode": 0}],
        "n": 1.5,
    }


def test_secret_names():
    secret = ("RESTIC_PASSWORD", "BORG_PASSPHRASE", "AWS_SECRET_ACCESS_KEY", "PGPASSWORD",
              "MYSQL_PWD", "GITHUB_TOKEN", "API_KEY", "AWS_REGION", "client_secret")  # fmt: skip
    for name in secret:
        assert is_secret_name(name), name
    for name in ("PATH", "LANG", "LC_ALL", "TZ", "HOME", "PGHOST", "QUIESCE_JOB", "PWD"):
        assert not is_secret_name(name), name


@settings(max_examples=300)
@given(schemes, users, st.text(_UNRESERVED + "!$&'()+,;=%:@/", min_size=1, max_size=24),
       hosts, paths)  # fmt: skip
def test_a_repository_password_with_a_slash_never_survives_once_registered(
    scheme, user, pw, host, path
):
    """AWS secret keys have '/': a repository the job names is parsed to its last '@'."""
    import quiesce.util.redact as r

    saved = set(r._secrets)
    try:
        url = f"{scheme}{user}:{pw}@{host}{path}"
        register_url_secrets(url)
        shown = redact(f"Fatal: {url} is unreachable")
        assert pw not in shown
    finally:
        r._secrets.clear()
        r._secrets.update(saved)
