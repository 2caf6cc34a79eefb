"""Client keys and their counters in PostgreSQL, shared by every worker of every host that
uses the same `tracker.db` URL: one budget, one RPM, one revocation for them all.

The statements are the SQLite store's (`keys/store.py`); what differs is how a transaction
is made alone: the key's own row is locked (`SELECT ... FOR UPDATE`) first by an admission
and by a settlement alike, so two hosts admitting for one key take turns, reads within the
transaction see what the other committed, and, every transaction taking its locks in the
same order (the key, then its holds, spend and rate rows), no two can deadlock.  Keys of
different clients never wait for each other.

The tables live in the usage database, created by its migrations (`store/postgres.py`).
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator

from ..store import StoreFault
from ..store.postgres import PostgresStore
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


class PgKeyStore(KeyStore):
    """KeyStore on the PostgreSQL database at `url` (one connection per process)."""

    def __init__(self, url: str, busy_timeout_ms: int = 2000) -> None:
        super().__init__(url, busy_timeout_ms)
        self.url = url
        self._usage = PostgresStore(url, busy_timeout_ms)  # its connection and migrations
        self._pg_lock = threading.Lock()
        self._pg_pid: int | None = None

    def lock_key(self, conn, key_id: str) -> None:
        conn.execute("SELECT 1 FROM client_keys WHERE id = ? FOR UPDATE", (key_id,))

    def checkpoint(self) -> None:
        """PostgreSQL checkpoints itself."""

    def close(self) -> None:
        if self._pg_lock.acquire(timeout=self.lock_timeout):
            try:
                if self._pg_pid == os.getpid():
                    self._usage.close()
                self._pg_pid = None
            finally:
                self._pg_lock.release()

    @contextlib.contextmanager
    def _writing(self) -> Iterator[_Connection]:
        if not self._pg_lock.acquire(timeout=self.lock_timeout):
            raise StoreFault("locked", "the keys database is busy in this process")
        try:
            conn = self._connection()
            with self._usage._faults():
                with conn.transaction():
                    yield _Connection(conn)
        finally:
            self._pg_lock.release()

    def _read(self, sql: str, params: tuple) -> list[tuple]:
        with self._writing() as conn:  # one connection per process: reads take their turn
            return conn.execute(sql, params).fetchall()

    def _connection(self):
        """This process's connection, migrated (a forked worker opens its own)."""
        if self._pg_pid != os.getpid():
            self._usage._conn = None  # the parent's belongs to the parent
            self._pg_pid = os.getpid()
        if self._usage._conn is None:
            self._usage.open()
        return self._usage._conn


def open_key_store(config, busy_timeout_ms: int = 2000, checkpoints_apart: bool = False
                   ) -> KeyStore:
    """Where the keys are: `auth.keys_db` if set; else in the usage database when that is a
    PostgreSQL URL (every host shares them); else `keys.db` beside the SQLite file.
    `checkpoints_apart`: a worker's (SQLite) store, whose ledger thread checkpoints."""
    if not config.keys_db and config.db_is_url:
        return PgKeyStore(config.db_path, busy_timeout_ms)
    return KeyStore(config.keys_db_path, busy_timeout_ms, checkpoints_apart)
