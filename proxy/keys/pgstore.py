"""Client keys and their counters in PostgreSQL, shared by every worker of every host that
uses the same `tracker.db` URL: one budget, one RPM, one revocation for them all.

The statements are the SQLite store's (`keys/store.py`); what differs is how a transaction
is made alone: the key's own row is locked (`SELECT ... FOR UPDATE`) first by an admission
and by a settlement alike, so two hosts admitting for one key take turns, reads within the
transaction see what the other committed, and, every transaction taking its locks in the
same order (the key, then its holds, spend and rate rows), no two can deadlock.  Keys of
different clients never wait for each other.

The tables live in the usage database, created by its migrations (`store/postgres.py`).
A worker holds a pool of at most POOL_SIZE connections for its keys.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator

from ..store import StoreFault
from ..store.postgres import PostgresStore, connection_settings, translated_errors
from .store import KeyStore


class _Connection:
    """A psycopg connection that takes the SQLite store's statements (`?` placeholders)."""

    def __init__(self, conn) -> None:
        self.conn = conn

    def execute(self, sql: str, params=()):
        return self.conn.execute(sql.replace("?", "%s"), params)

    def executemany(self, sql: str, rows):
        with self.conn.cursor() as cursor:
            cursor.executemany(sql.replace("?", "%s"), rows)


POOL_SIZE = 4  # connections a worker's key store holds at most


class PgKeyStore(KeyStore):
    """KeyStore on the PostgreSQL database at `url`, through a small pool of connections per
    process (psycopg_pool): admissions of different keys run side by side; two of the same
    key take turns on its row lock, waited for `lock_timeout` at most."""

    def __init__(self, url: str, busy_timeout_ms: int = 2000, pool_size: int = POOL_SIZE) -> None:
        super().__init__(url, busy_timeout_ms)
        self.url = url
        self.pool_size = pool_size
        self._pool = None
        self._pool_pid: int | None = None
        self._pool_lock = threading.Lock()

    def lock_key(self, conn, key_id: str) -> None:
        conn.execute("SELECT 1 FROM client_keys WHERE id = ? FOR UPDATE", (key_id,))

    def checkpoint(self) -> None:
        """PostgreSQL checkpoints itself."""

    def close(self) -> None:
        with self._pool_lock:
            if self._pool is not None and self._pool_pid == os.getpid():
                self._pool.close(timeout=self.lock_timeout)
            self._pool = self._pool_pid = None

    @contextlib.contextmanager
    def _writing(self) -> Iterator[_Connection]:
        from psycopg_pool import PoolTimeout

        pool = self._opened_pool()
        with translated_errors(self.url):
            try:
                with pool.connection(timeout=self.lock_timeout) as conn:
                    with conn.transaction():
                        yield _Connection(conn)
            except PoolTimeout:
                raise StoreFault("locked", "every connection of the key store is busy") from None

    def _read(self, sql: str, params: tuple) -> list[tuple]:
        with self._writing() as conn:
            return conn.execute(sql, params).fetchall()

    def _opened_pool(self):
        """This process's pool (a forked worker makes its own), the schema migrated first."""
        if self._pool_pid == os.getpid() and self._pool is not None:
            return self._pool
        with self._pool_lock:
            if self._pool_pid != os.getpid() or self._pool is None:
                from psycopg_pool import ConnectionPool

                schema = PostgresStore(self.url, self.busy_timeout_ms)
                try:
                    schema.open()  # migrates (once, whatever the number of hosts)
                finally:
                    schema.close()
                settings = connection_settings(self.busy_timeout_ms)
                self._pool = ConnectionPool(self.url, min_size=1, max_size=self.pool_size,
                                            kwargs=settings, open=True, name="llm-proxy-keys")
                self._pool_pid = os.getpid()
        return self._pool


def open_key_store(config, busy_timeout_ms: int = 2000, checkpoints_apart: bool = False
                   ) -> KeyStore:
    """Where the keys are: `auth.keys_db` if set; else in the usage database when that is a
    PostgreSQL URL (every host shares them); else `keys.db` beside the SQLite file.
    `checkpoints_apart`: a worker's (SQLite) store, whose ledger thread checkpoints."""
    if not config.keys_db and config.db_is_url:
        return PgKeyStore(config.db_path, busy_timeout_ms)
    return KeyStore(config.keys_db_path, busy_timeout_ms, checkpoints_apart)
