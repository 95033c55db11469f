"""MySQL / MariaDB: a commit lock held by a session across the window.

The lock lives only as long as the connection, so this writer keeps it open from
before the freeze until right after the thaw (a one-shot hook cannot: AWS's sample
script released the lock when its client exited, before the snapshot). While it is
held no transaction commits and non-transactional tables are flushed and closed;
InnoDB recovers the rest from its redo log: a restore runs crash recovery, so the level
is ``atomic``, never ``clean`` (the report says how much redo, at most: the checkpoint
age measured under the lock).

Two locks give that. ``BACKUP STAGE START`` + ``BLOCK_COMMIT`` (MariaDB >= 10.4.1,
the sequence MariaDB documents for storage snapshots) blocks only commits and lets
running write statements go on; ``FLUSH TABLES WITH READ LOCK`` (MySQL, older
MariaDB) must first wait for every running write statement, and every client queues
behind it meanwhile (measured on 10.11: with a 4 s INSERT running, FTWRL gave up after
its 2 s lock_wait_timeout; BLOCK_COMMIT took 2 ms). ``lock = "auto"`` picks the
first where the server has it. ``lock_wait_timeout`` bounds either wait.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import PositiveFloat, field_validator

from quiesce.apps.writers import (
    Finding,
    Writer,
    WriterConfig,
    WriterError,
    check_password_env,
    need_module,
)
from quiesce.host.trust import trust_problem
from quiesce.snapshot.consistency import Claim, Consistency
from quiesce.util.redact import redact, register_secret
from quiesce.util.units import human_bytes

LockMode = Literal["auto", "backup_stage", "flush_tables"]
TAKE = {
    "backup_stage": ("BACKUP STAGE START", "BACKUP STAGE BLOCK_COMMIT"),
    "flush_tables": ("FLUSH TABLES WITH READ LOCK",),
}
RELEASE = {"backup_stage": "BACKUP STAGE END", "flush_tables": "UNLOCK TABLES"}
ER_LOCK_WAIT_TIMEOUT = 1205
# where the server keeps what a restore needs (relative paths are below datadir)
_FILES = (
    ("innodb_data_home_dir", "InnoDB system tablespace"),
    ("innodb_log_group_home_dir", "InnoDB redo log"),
    ("aria_log_dir_path", "Aria log"),
)
# the privileges each lock needs (either one)
_NEEDS = {"backup_stage": ("RELOAD", "BACKUP_ADMIN"), "flush_tables": ("RELOAD",)}


def has_backup_stage(version: str) -> bool:
    """BACKUP STAGE exists on MariaDB from 10.4.1 (``SELECT VERSION()`` names MariaDB)."""
    m = re.match(r"(\d+)\.(\d+)\.(\d+)", version)
    return "mariadb" in version.lower() and m is not None and tuple(map(int, m.groups())) >= (
        10, 4, 1,
    )  # fmt: skip


CHOWN_HINT = "make it root's and writable only by root: chown root:root {p} && chmod go-w {p}"


class MysqlConfig(WriterConfig):
    """``[[writers.mysql]]``: the connection (no password: ``password_env`` or a
    ``defaults_file``), the lock and how long to wait for it."""

    unix_socket: str | None = None
    host: str | None = None
    port: int = 3306
    user: str = "root"
    password_env: str | None = None  # the NAME of an environment variable holding it
    defaults_file: str | None = None  # a root-owned 0600 option file ([client] password=)
    timeout: PositiveFloat = 30.0
    lock: LockMode = "auto"
    name: str | None = None

    _check_password_env = field_validator("password_env")(check_password_env)

    def findings(self) -> list[Finding]:
        f = self.defaults_file
        if f is None:
            return []
        if not Path(f).is_file():
            return [Finding("defaults_file", f"{f} does not exist", "e.g. /etc/mysql/debian.cnf")]
        bad = trust_problem(Path(f), follow=True)  # root's, like a hook (apps/hooks/trust)
        return [Finding("defaults_file", bad, CHOWN_HINT.format(p=f))] if bad else []


class MysqlWriter(Writer):
    kind = "mysql"
    Config = MysqlConfig

    def __init__(
        self, config: MysqlConfig | None = None, /, *, password: str | None = None,
        **options: Any,
    ) -> None:  # fmt: skip
        """``MysqlWriter(MysqlConfig(...))`` or ``MysqlWriter(unix_socket=...)``.
        ``password``: Python callers, or the value of the job's ``password_env``; it goes
        to the client library in memory, never into an argv or a hook's environment."""
        cfg = MysqlConfig.of(config, options)
        super().__init__(cfg.name or "mysql")
        self.config = cfg
        self.lock = cfg.lock
        self.unix_socket, self.host, self.port = cfg.unix_socket, cfg.host, cfg.port
        self.user, self._password, self.defaults_file = cfg.user, password, cfg.defaults_file
        register_secret(password)
        self.timeout = cfg.timeout
        self._checkpoint_lsn: int | None = None

    def _sql(self, query: str) -> Any:
        try:
            with self.conn.cursor() as cur:
                cur.execute(query)
                return cur.fetchall()
        except Exception as e:
            code = e.args[0] if e.args and isinstance(e.args[0], int) else None
            raise WriterError(redact(f"mysql: {query} failed: {e}"), code=code) from None

    def describe(self) -> tuple[str, str | None]:
        take, release = {
            "auto": (
                "BACKUP STAGE BLOCK_COMMIT on MariaDB >= 10.4.1, else FLUSH TABLES WITH READ LOCK",
                "BACKUP STAGE END / UNLOCK TABLES",
            ),
            "backup_stage": ("BACKUP STAGE START, BLOCK_COMMIT", "BACKUP STAGE END"),
            "flush_tables": ("FLUSH TABLES WITH READ LOCK", "UNLOCK TABLES"),
        }[self.lock]
        return f"{take} (session held)", release

    def _ask_files(self) -> list[tuple[str, str]]:
        """datadir, InnoDB's data and redo directories, the Aria log directory."""
        self._connect()
        try:
            datadir = str(self._sql("SELECT @@datadir")[0][0])
            files = [(datadir, "datadir")]
            for var, what in _FILES:
                try:
                    value = self._sql(f"SELECT @@{var}")[0][0]
                except WriterError:
                    continue  # not this server (MySQL has no Aria)
                files.append((os.path.join(datadir, str(value or "")), what))
            return [(os.path.normpath(p), w) for p, w in files]
        finally:
            self._close()

    def readiness(self) -> list[str]:
        """Connects with the job's credentials; the account holds what its lock needs
        (RELOAD, or BACKUP_ADMIN for BACKUP STAGE); changes nothing."""
        problems = super().readiness()
        if problems:
            return problems
        self._connect()
        try:
            mode = self._lock_mode(self._sql("SELECT VERSION()")[0][0])
            grants = " ".join(str(r[0]) for r in self._sql("SHOW GRANTS")).upper()
            global_grants = [g for g in grants.split("GRANT ") if " ON *.* " in g]
            have = " ".join(global_grants)
            if "ALL PRIVILEGES" not in have and not any(p in have for p in _NEEDS[mode]):
                problems.append(
                    f"mysql: the account may not take {TAKE[mode][-1]} (GRANT "
                    f"{' or '.join(_NEEDS[mode])} ON *.* to it)"
                )
        except WriterError as e:
            problems.append(e.message)
        finally:
            self._close()
        return problems

    def claims(self, frozen_ns: int | None) -> list[Claim]:
        """ATOMIC: commits held, but InnoDB still replays its redo log on restore."""
        lock = self.info.get("lock", "flush_tables")
        says = f"{TAKE[lock][-1]} held across the window: no commit torn; InnoDB recovery "
        age = self.info.get("redo_since_checkpoint_bytes")
        says += f"replays ≤ {human_bytes(age)} of redo" if age is not None else "replays its redo"
        return [Claim(f"writer {self.name}", Consistency.ATOMIC, says)]

    def _connect(self) -> None:
        pymysql = need_module("pymysql", "PyMySQL")
        kw: dict[str, Any] = {
            "user": self.user,
            "connect_timeout": max(int(self.timeout), 1),
            "read_timeout": int(self.timeout) + 5,
            "write_timeout": int(self.timeout) + 5,
            "autocommit": True,
        }
        if self.unix_socket:
            kw["unix_socket"] = self.unix_socket
        else:
            kw["host"], kw["port"] = self.host or "localhost", self.port
        if self._password is not None:
            kw["password"] = self._password
        if self.defaults_file:
            kw["read_default_file"] = self.defaults_file
        try:
            self.conn = pymysql.connect(**kw)
        except Exception as e:
            raise WriterError(redact(f"mysql: cannot connect: {e}")) from None

    def before_freeze(self) -> None:
        self._connect()
        try:
            self._sql(f"SET SESSION lock_wait_timeout = {max(int(self.timeout), 1)}")
            version = self.info["server_version"] = self._sql("SELECT VERSION()")[0][0]
            mode = self._lock_mode(version)
            for statement in TAKE[mode]:
                try:
                    self._sql(statement)
                except WriterError as e:
                    if e.code != ER_LOCK_WAIT_TIMEOUT:
                        raise
                    raise WriterError(
                        f"mysql: {statement} waited longer than timeout = "
                        f"{self.timeout:g} s for the lock",
                        "a long write statement or DDL held it; run the job when it is done"
                        + (
                            ', or use lock = "backup_stage" (MariaDB >= 10.4.1), which lets '
                            "running statements go on"
                            if mode == "flush_tables"
                            else ""
                        ),
                    ) from None
            self.info["lock"] = mode
            self.info["locked"] = True
            # recovery replays from the snapshot's checkpoint (no earlier than this one)
            # to its log end (no later than the LSN after the thaw): that bounds it
            self._checkpoint_lsn = self._status("Innodb_lsn_last_checkpoint")
        except BaseException:
            self._close()
            raise

    def _lock_mode(self, version: str) -> str:
        if self.lock == "auto":
            return "backup_stage" if has_backup_stage(version) else "flush_tables"
        if self.lock == "backup_stage" and not has_backup_stage(version):
            raise WriterError(
                f"mysql: the server ({version}) has no BACKUP STAGE",
                'it needs MariaDB 10.4.1 or newer: set lock = "flush_tables" or "auto"',
            )
        return self.lock

    def _status(self, var: str) -> int | None:
        """A numeric global status variable (MariaDB's InnoDB LSNs), None if absent."""
        with contextlib.suppress(WriterError, IndexError, ValueError):
            return int(self._sql(f"SHOW GLOBAL STATUS LIKE '{var}'")[0][1])
        return None

    def after_thaw(self, ok: bool) -> None:
        if self.conn is None:
            return
        try:
            end = self._status("Innodb_lsn_current")
            if end is not None and self._checkpoint_lsn is not None:
                self.info["redo_since_checkpoint_bytes"] = max(end - self._checkpoint_lsn, 0)
            self._sql(RELEASE[self.info.get("lock", "flush_tables")])
            self.info["locked"] = False
        finally:
            self._close()
