"""MySQL / MariaDB: FLUSH TABLES WITH READ LOCK, held by a session across the window.

The lock lives only as long as the connection, so this writer keeps it open from
before the freeze until right after the thaw (a one-shot hook cannot: AWS's sample
script released the lock when its client exited, before the snapshot). While it is
held no transaction commits and non-transactional tables are flushed and closed;
InnoDB recovers the rest from its redo log. ``lock_wait_timeout`` bounds the wait for
long-running queries, which would otherwise stall every client behind the lock.
"""

from __future__ import annotations

import contextlib
from typing import Any

from . import Writer, WriterError, need_module


class MysqlWriter(Writer):
    kind = "mysql"

    def __init__(
        self,
        *,
        unix_socket: str | None = None,
        host: str | None = None,
        port: int = 3306,
        user: str = "root",
        password: str | None = None,
        defaults_file: str | None = None,
        timeout: float = 30.0,
        name: str | None = None,
    ) -> None:
        super().__init__(name or "mysql")
        self.unix_socket, self.host, self.port = unix_socket, host, port
        self.user, self.password, self.defaults_file = user, password, defaults_file
        self.timeout = timeout
        self.conn: Any = None

    def _sql(self, query: str) -> Any:
        try:
            with self.conn.cursor() as cur:
                cur.execute(query)
                return cur.fetchall()
        except Exception as e:
            raise WriterError(f"mysql: {query} failed: {e}") from None

    def before_freeze(self) -> None:
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
        if self.password is not None:
            kw["password"] = self.password
        if self.defaults_file:
            kw["read_default_file"] = self.defaults_file
        try:
            self.conn = pymysql.connect(**kw)
        except Exception as e:
            raise WriterError(f"mysql: cannot connect: {e}") from None
        try:
            self._sql(f"SET SESSION lock_wait_timeout = {max(int(self.timeout), 1)}")
            self.info["server_version"] = self._sql("SELECT VERSION()")[0][0]
            self._sql("FLUSH TABLES WITH READ LOCK")
            self.info["locked"] = True
        except BaseException:
            self._close()
            raise

    def after_thaw(self, ok: bool) -> None:
        if self.conn is None:
            return
        try:
            self._sql("UNLOCK TABLES")
            self.info["locked"] = False
        finally:
            self._close()

    def _close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()
