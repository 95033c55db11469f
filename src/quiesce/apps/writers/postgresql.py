"""PostgreSQL: CHECKPOINT before the freeze; optionally pg_backup_start/stop in a session.

A snapshot of every volume of the cluster (data directory and WAL) taken at one instant
is crash-consistent, and PostgreSQL recovers it like after a power cut; the CHECKPOINT
just before the freeze keeps that recovery short. ``backup = true`` additionally brackets
the window with ``pg_backup_start``/``pg_backup_stop`` (non-exclusive, so the session is
held across the window) and returns the backup_label (and tablespace_map) with the data
directory they belong in: the job keeps them in the manifest, and ``quiesce restore``
writes them into the restored data directory. The way to go when the volumes cannot be
captured at one instant, or for archive-based PITR.
"""

from __future__ import annotations

from typing import Any

from pydantic import PositiveFloat, field_validator

from quiesce.apps.writers import (
    Writer,
    WriterConfig,
    WriterError,
    check_password_env,
    need_module,
    problem,
)
from quiesce.sys.redact import has_credentials, redact, register_secret, register_url_secrets

# Passwords never go in a job file: a writer names an environment variable that holds
# one (password_env), or uses the client's own file (~/.pgpass).


class PostgresConfig(WriterConfig):
    """``[[writers.postgresql]]``: the connection (a libpq dsn without a password) and
    what to do around the window."""

    dsn: str = ""  # without password= or user:pass@ (refused below)
    password_env: str | None = None  # the NAME of an environment variable holding it
    checkpoint: bool = True
    backup: bool = False
    label: str = "quiesce"
    timeout: PositiveFloat = 60.0
    name: str | None = None

    _check_password_env = field_validator("password_env")(check_password_env)

    @field_validator("dsn")
    @classmethod
    def _no_password(cls, dsn: str) -> str:
        if has_credentials(dsn):
            raise problem(
                f"the dsn carries a password: {redact(dsn)}",
                "remove it; use ~/.pgpass or PGPASSFILE (a root-owned 0600 file), or "
                'password_env = "NAME" (an environment variable quiesce reads)',
            )
        return dsn


class PostgresWriter(Writer):
    kind = "postgresql"
    Config = PostgresConfig

    def __init__(
        self,
        config: PostgresConfig | str = "",
        /,
        *,
        password: str | None = None,
        **options: Any,
    ) -> None:
        """``PostgresWriter(PostgresConfig(...))``, or the dsn and the config's keys.
        ``password`` (Python callers, or the value of the job's ``password_env``) goes to
        libpq in memory only."""
        if isinstance(config, str):
            cfg = PostgresConfig.of(None, {"dsn": config, **options})
        else:
            cfg = PostgresConfig.of(config, options)
        super().__init__(cfg.name or "postgresql")
        self.config = cfg
        self.dsn, self.checkpoint, self.backup = cfg.dsn, cfg.checkpoint, cfg.backup
        self.label, self.timeout = cfg.label, cfg.timeout
        self._password = password
        register_secret(password)
        register_url_secrets(cfg.dsn)

    def _sql(self, query: str, params: tuple[Any, ...] = ()) -> Any:
        try:
            return self.conn.execute(query, params)
        except Exception as e:
            raise WriterError(
                redact(f"postgresql: {query.split('(')[0]} failed: {e}".strip())
            ) from None

    def describe(self) -> tuple[str, str | None]:
        what = "CHECKPOINT" if self.checkpoint else "connect"
        if not self.backup:
            return what, None
        return (
            what + ", pg_backup_start (session held across the window)",
            "pg_backup_stop (backup_label in the report)",
        )

    def before_freeze(self) -> None:
        psycopg = need_module("psycopg", "psycopg[binary]")
        kw: dict[str, Any] = {"autocommit": True, "connect_timeout": max(int(self.timeout), 1)}
        if self._password is not None:
            kw["password"] = self._password
        try:
            self.conn = psycopg.connect(self.dsn, **kw)
        except Exception as e:
            raise WriterError(redact(f"postgresql: cannot connect: {e}".strip())) from None
        try:
            self._sql(f"SET statement_timeout = {int(self.timeout * 1000)}")
            version = self.conn.info.server_version
            self.info["server_version"] = version
            self._note_data_directory()
            if self.checkpoint:
                self._sql("CHECKPOINT")
            if self.backup:
                start = (
                    "pg_backup_start(%s, true)"
                    if version >= 150000
                    else ("pg_start_backup(%s, true, false)")
                )
                row = self._sql(f"SELECT {start}", (self.label,)).fetchone()
                self.info["backup_start_lsn"] = str(row[0])
            else:
                self._close()  # nothing is held across the window
        except BaseException:
            self._close()
            raise

    def _note_data_directory(self) -> None:
        """Where the cluster lives: a restore writes backup_label there and removes the
        origin's postmaster.pid (a role without pg_read_all_settings cannot tell: the
        label then stays in the manifest only)."""
        try:
            row = self.conn.execute("SELECT current_setting('data_directory')").fetchone()
        except Exception:
            return
        if row and row[0]:
            self.info["data_directory"] = str(row[0])

    def after_thaw(self, ok: bool) -> None:
        if self.conn is None:
            return
        try:
            if self.backup and ok:
                version = self.info.get("server_version", 150000)
                stop = (
                    "pg_backup_stop(false)"
                    if version >= 150000
                    else ("pg_stop_backup(false, false)")
                )
                row = self._sql(f"SELECT lsn, labelfile, spcmapfile FROM {stop}").fetchone()
                self.info["backup_stop_lsn"] = str(row[0])
                self.info["backup_label"] = row[1]
                if row[2]:
                    self.info["tablespace_map"] = row[2]
            # not ok: closing the session aborts the backup on the server
        finally:
            self._close()
