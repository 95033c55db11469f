"""PostgreSQL: CHECKPOINT before the freeze; optionally pg_backup_start/stop in a session.

A snapshot of every volume of the cluster (data directory, WAL, tablespaces: asked from
the server, proven on the group) taken at one instant is ``atomic``: PostgreSQL recovers
it like after a power cut, replaying the WAL written since the CHECKPOINT just before the
freeze (measured: the report says how much, at most). It is never ``clean``: nothing
holds the cluster still. ``backup = true`` additionally brackets
the window with ``pg_backup_start``/``pg_backup_stop`` (non-exclusive, so the session is
held across the window) and returns the backup_label (and tablespace_map) with the data
directory they belong in: the job keeps them in the manifest, and ``quiesce restore``
writes them into the restored data directory. The way to go when the volumes cannot be
captured at one instant, or for archive-based PITR.
"""

from __future__ import annotations

import os
import time
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
from quiesce.snapshot.consistency import Claim, Consistency
from quiesce.util.redact import has_credentials, redact, register_secret, register_url_secrets
from quiesce.util.units import human_bytes, human_duration

_SETTINGS_HINT = (
    "grant pg_read_all_settings to the job's role (or connect as a superuser): quiesce "
    "proves the cluster's files lie on the group"
)

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
        self._checkpoint_ns: int | None = None  # CLOCK_MONOTONIC when CHECKPOINT returned
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

    def _connect(self) -> None:
        psycopg = need_module("psycopg", "psycopg[binary]")
        kw: dict[str, Any] = {"autocommit": True, "connect_timeout": max(int(self.timeout), 1)}
        if self._password is not None:
            kw["password"] = self._password
        try:
            self.conn = psycopg.connect(self.dsn, **kw)
        except Exception as e:
            raise WriterError(redact(f"postgresql: cannot connect: {e}".strip())) from None

    def _ask_files(self) -> list[tuple[str, str]]:
        """data_directory, the WAL directory (pg_wal's target), every tablespace."""
        self._connect()
        try:
            try:
                row = self.conn.execute("SELECT current_setting('data_directory')").fetchone()
            except Exception as e:
                raise WriterError(
                    redact(f"postgresql: cannot read data_directory: {e}".strip()),
                    _SETTINGS_HINT,
                ) from None
            data = str(row[0])
            files = [(data, "data_directory")]
            files.append((os.path.realpath(os.path.join(data, "pg_wal")), "WAL directory"))
            rows = self._sql(
                "SELECT spcname, pg_tablespace_location(oid) FROM pg_tablespace"
            ).fetchall()
            files += [(str(loc), f"tablespace {name}") for name, loc in rows if loc]
            return files
        finally:
            self._close()

    def readiness(self) -> list[str]:
        """Connects with the job's credentials; the role may CHECKPOINT (superuser or
        pg_checkpoint) and run pg_backup_start when the writer does; changes nothing."""
        problems = super().readiness()
        if problems:
            return problems
        self._connect()
        try:
            version = self.conn.info.server_version
            if self.checkpoint:
                role = "pg_checkpoint" if version >= 150000 else None
                q = "SELECT rolsuper" + (
                    " OR pg_has_role(current_user, 'pg_checkpoint', 'MEMBER')" if role else ""
                )
                ok = self._sql(q + " FROM pg_roles WHERE rolname = current_user").fetchone()
                if not (ok and ok[0]):
                    problems.append(
                        "postgresql: the role may not run CHECKPOINT (grant it "
                        + ("pg_checkpoint, or " if role else "")
                        + "connect as a superuser; or set checkpoint = false)"
                    )
            if self.backup:
                fn = (
                    "pg_backup_start(text, boolean)"
                    if version >= 150000
                    else "pg_start_backup(text, boolean, boolean)"
                )
                ok = self._sql("SELECT has_function_privilege(%s, 'EXECUTE')", (fn,)).fetchone()
                if not (ok and ok[0]):
                    problems.append(
                        f"postgresql: the role may not execute {fn.split('(')[0]} "
                        f"(GRANT EXECUTE ON FUNCTION {fn} TO the role)"
                    )
        finally:
            self._close()
        return problems

    def claims(self, frozen_ns: int | None) -> list[Claim]:
        """Always ATOMIC: a restore runs crash recovery; says how much WAL, at most."""
        done = self._checkpoint_ns
        wal = self.info.get("wal_since_checkpoint_bytes")
        if done is not None:
            when = (
                f"{human_duration((frozen_ns - done) / 1e9)} before the freeze"
                if frozen_ns is not None
                else "before the snapshot"
            )
            says = f"CHECKPOINT {when}: recovery replays "
            says += f"≤ {human_bytes(wal)} of WAL" if wal is not None else "the WAL since then"
        else:
            says = "no CHECKPOINT: recovery replays the WAL since the server's last checkpoint"
        if self.backup:
            says += "; pg_backup_start/stop around the window (backup_label kept for restore)"
        return [Claim(f"writer {self.name}", Consistency.ATOMIC, says)]

    def before_freeze(self) -> None:
        self._connect()
        try:
            self._sql(f"SET statement_timeout = {int(self.timeout * 1000)}")
            version = self.conn.info.server_version
            self.info["server_version"] = version
            self._note_data_directory()
            if self.checkpoint:
                # recovery starts at the redo point of the last checkpoint, which is no
                # earlier than this: the WAL written from here bounds what it replays
                self.info["lsn_before_checkpoint"] = str(
                    self._sql("SELECT pg_current_wal_lsn()").fetchone()[0]
                )
                self._sql("CHECKPOINT")
                self._checkpoint_ns = time.monotonic_ns()
            if self.backup:
                start = (
                    "pg_backup_start(%s, true)"
                    if version >= 150000
                    else ("pg_start_backup(%s, true, false)")
                )
                row = self._sql(f"SELECT {start}", (self.label,)).fetchone()
                self.info["backup_start_lsn"] = str(row[0])
            # else the idle session (no lock, no transaction) stays open across the window
            # only to measure the WAL after the thaw
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
            start = self.info.get("lsn_before_checkpoint")
            if start is not None:
                row = self._sql(
                    "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s::pg_lsn)", (start,)
                ).fetchone()
                self.info["wal_since_checkpoint_bytes"] = int(row[0])
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
