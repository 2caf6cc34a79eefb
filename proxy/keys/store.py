"""Client keys and their counters in one SQLite file, shared by every worker of a host.

Why a file of its own (`keys.db`, beside the usage database): admission writes to it on
every request of a key with limits, and must never queue behind the usage writer's
batches.  Why `flock` around each write transaction: SQLite's busy handler sleeps in
steps of a millisecond and more, while a worker waiting on `flock` is woken the moment
the lock is free; within a worker a thread lock orders its threads (they share the
descriptor, which `flock` does not tell apart).

What makes the limits hold across workers: the admission of a request is one write
transaction that re-reads the key (a revocation counts at once), reads its counters,
decides (`policy.refusal`) and writes the reservation; settling a finished request is one
transaction keyed on its request id (done twice, it counts once).  A worker that dies
with reservations open stops touching its holder row; once the row is `STALE_HOLDER`
seconds old its reservations are charged as spent (the worst case: those requests may well
have been billed), never dropped.

This is the one module of `keys/` that sees `sqlite3`; its errors become `StoreFault`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import threading
import time
from typing import Iterator

from ..store import StoreFault
from ..store.sqlite import fault_kind
from ..text import loggable
from .policy import WINDOW, ClientKey, Standing, period_start, refusal

STALE_HOLDER = 30.0  # seconds without a heartbeat after which a holder's reservations go

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS client_keys (
        id TEXT PRIMARY KEY, name TEXT NOT NULL, digest TEXT NOT NULL UNIQUE, hint TEXT,
        models TEXT, budget_usd REAL, period TEXT, rpm INTEGER, tpm INTEGER,
        max_parallel INTEGER, expires_at REAL, revoked_at REAL, created_at REAL)""",
    # A name belongs to one live key; a revoked key's name can be given again.
    """CREATE UNIQUE INDEX IF NOT EXISTS client_keys_live_name ON client_keys (name)
        WHERE revoked_at IS NULL""",
    "CREATE TABLE IF NOT EXISTS key_meta (name TEXT PRIMARY KEY, value INTEGER)",
    # WITHOUT ROWID and few indexes: each admission and settlement writes as few pages as
    # can be (the sweep that looks holds up by holder is rare, and the table small).
    """CREATE TABLE IF NOT EXISTS key_holds (
        request_id TEXT PRIMARY KEY, key_id TEXT NOT NULL, amount REAL NOT NULL,
        period_start REAL NOT NULL, holder TEXT NOT NULL, at REAL NOT NULL) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS key_holds_key ON key_holds (key_id, period_start)",
    """CREATE TABLE IF NOT EXISTS key_spend (
        key_id TEXT NOT NULL, period_start REAL NOT NULL, spent_usd REAL NOT NULL DEFAULT 0,
        requests INTEGER NOT NULL DEFAULT 0, tokens INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (key_id, period_start)) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS key_rate (
        key_id TEXT NOT NULL, second INTEGER NOT NULL, requests INTEGER NOT NULL DEFAULT 0,
        tokens INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (key_id, second)) WITHOUT ROWID""",
    "CREATE TABLE IF NOT EXISTS key_holders (holder TEXT PRIMARY KEY, seen_at REAL NOT NULL)",
)
_KEY_COLUMNS = ("id", "name", "digest", "hint", "models", "budget_usd", "period", "rpm", "tpm",
                "max_parallel", "expires_at", "revoked_at", "created_at")
_SELECT_KEY = f"SELECT {', '.join(_KEY_COLUMNS)} FROM client_keys"
_EDITABLE = frozenset({"name", "models", "budget_usd", "period", "rpm", "tpm", "max_parallel",
                       "expires_at"})


class KeyStore:
    """The keys file at `path`: opened on first use in each process (gunicorn forks)."""

    def __init__(self, path: str, busy_timeout_ms: int = 2000,
                 checkpoints_apart: bool = False) -> None:
        self.path = path
        self.busy_timeout_ms = busy_timeout_ms
        self.lock_timeout = busy_timeout_ms / 1000.0
        # A worker's ledger thread checkpoints the WAL; its requests then never pay for a
        # checkpoint inside their commit (measured: p99 of a settlement 3 ms -> 0.15 ms).
        self.checkpoints_apart = checkpoints_apart
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._conn: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._read_lock = threading.Lock()
        self._reader: sqlite3.Connection | None = None
        self._reader_pid: int | None = None

    # -- keys ------------------------------------------------------------------------------

    def add(self, key: ClientKey) -> None:
        """Store a new key; ValueError when a live key has its name already."""
        with self._writing() as conn:
            if conn.execute("SELECT 1 FROM client_keys WHERE name = ? AND revoked_at IS NULL",
                            (key.name,)).fetchone():
                raise ValueError(f"a key named {key.name!r} exists already")
            conn.execute(f"INSERT INTO client_keys ({', '.join(_KEY_COLUMNS)}) VALUES "
                         f"({', '.join('?' * len(_KEY_COLUMNS))})", _key_values(key))
            _bump_version(conn)

    def update(self, key_id: str, **fields) -> None:
        unknown = set(fields) - _EDITABLE
        if unknown:
            raise ValueError(f"cannot change {', '.join(sorted(unknown))}")
        if not fields:
            return
        if "models" in fields:
            fields["models"] = json.dumps(list(fields["models"]))
        with self._writing() as conn:
            conn.execute(f"UPDATE client_keys SET {', '.join(f'{k} = ?' for k in fields)} "
                         "WHERE id = ?", (*fields.values(), key_id))
            _bump_version(conn)

    def revoke(self, key_id: str, now: float) -> None:
        with self._writing() as conn:
            conn.execute("UPDATE client_keys SET revoked_at = ? WHERE id = ? AND revoked_at "
                         "IS NULL", (now, key_id))
            _bump_version(conn)

    def rotate(self, key_id: str, digest: str, hint: str) -> None:
        """A new secret for the same key (name, limits and spend stay); the old one stops
        working at once."""
        with self._writing() as conn:
            conn.execute("UPDATE client_keys SET digest = ?, hint = ? WHERE id = ?",
                         (digest, hint, key_id))
            _bump_version(conn)

    def find(self, id_or_name: str) -> ClientKey | None:
        """A key by id, else the live key of that name, else the latest revoked one."""
        rows = self._read(f"{_SELECT_KEY} WHERE id = ? OR name = ? ORDER BY id = ? DESC, "
                          "revoked_at IS NOT NULL, revoked_at DESC LIMIT 1",
                          (id_or_name, id_or_name, id_or_name))
        return _key(rows[0]) if rows else None

    def all_keys(self) -> list[ClientKey]:
        return [_key(row) for row in self._read(f"{_SELECT_KEY} ORDER BY created_at, id", ())]

    def version(self) -> int:
        """Changes whenever a key is added, changed, revoked or rotated (by any process)."""
        rows = self._read("SELECT value FROM key_meta WHERE name = 'version'", ())
        return rows[0][0] if rows else 0

    # -- admission and settlement --------------------------------------------------------------

    def lock_key(self, conn, key_id: str) -> None:
        """Make this transaction the key's only one (here: the whole file already is, under
        the flock; a database server locks the key's row)."""

    def admit(self, key_id: str, request_id: str, amount: float, holder: str,
              now: float) -> tuple[ClientKey | None, Exception | None]:
        """Reserve `amount` USD and one request slot for `request_id`, if the key's limits
        allow it, atomically for every worker: (the key as it is now, None) when admitted,
        (key, the refusal) otherwise; (None, None) when the key is gone."""
        with self._writing() as conn:
            self.lock_key(conn, key_id)
            rows = conn.execute(f"{_SELECT_KEY} WHERE id = ?", (key_id,)).fetchall()
            if not rows:
                return None, None
            key = _key(rows[0])
            start = period_start(key.period, now)
            refused = refusal(key, _standing(conn, key_id, start, now), amount, now)
            if refused is not None:
                return key, refused
            conn.execute("INSERT INTO key_holds (request_id, key_id, amount, period_start, "
                         "holder, at) VALUES (?, ?, ?, ?, ?, ?)",
                         (request_id, key_id, amount, start, holder, now))
            _count(conn, key_id, int(now), requests=1, tokens=0)
            return key, None

    def settle(self, request_id: str, cost_usd: float, tokens: int, now: float) -> bool:
        """The request is finished: its reservation goes, its real cost is spent in the
        period it was admitted in, its tokens count in the rate window.  False when there
        was nothing to settle (settled already, or dropped with a dead worker)."""
        with self._writing() as conn:
            found = conn.execute("SELECT key_id, period_start FROM key_holds WHERE "
                                 "request_id = ?", (request_id,)).fetchone()
            if found is None:
                return False
            key_id, start = found
            self.lock_key(conn, key_id)
            if conn.execute("DELETE FROM key_holds WHERE request_id = ?",
                            (request_id,)).rowcount == 0:
                return False  # settled by another process meanwhile
            _spend(conn, key_id, start, cost_usd, tokens)
            if tokens:
                _count(conn, key_id, int(now), requests=0, tokens=tokens)
            return True

    def standing(self, key: ClientKey, now: float) -> Standing:
        """The key's counters for `keys show` (as admission would read them now)."""
        with self._writing() as conn:  # one consistent snapshot of the counters
            return _standing(conn, key.id, period_start(key.period, now), now)

    # -- holders: reservations of a worker that died -----------------------------------------

    def touch(self, holder: str, now: float) -> None:
        with self._writing() as conn:
            conn.execute("INSERT INTO key_holders (holder, seen_at) VALUES (?, ?) ON CONFLICT "
                         "(holder) DO UPDATE SET seen_at = excluded.seen_at", (holder, now))

    def forget_holder(self, holder: str) -> None:
        """A worker that stops cleanly (its requests are settled) leaves no trace."""
        with self._writing() as conn:
            conn.execute("DELETE FROM key_holders WHERE holder = ?", (holder,))

    def sweep(self, now: float) -> int:
        """Charge the reservations of holders silent for STALE_HOLDER seconds (a worker
        killed mid-request: its requests will never settle, and the provider may well
        have billed them: each is spent at its worst case, the safe side) and drop rate
        buckets out of the window; how many reservations were charged."""
        with self._writing() as conn:
            stale = [h for (h,) in conn.execute(
                "SELECT holder FROM key_holders WHERE seen_at < ?", (now - STALE_HOLDER,))]
            # A hold whose holder never registered is as good as stale once it is old.
            orphans = conn.execute(
                "SELECT request_id, key_id, amount, period_start FROM key_holds WHERE holder "
                "NOT IN (SELECT holder FROM key_holders WHERE seen_at >= ?) AND at < ? "
                "ORDER BY key_id",  # keys locked in one order: two sweeps never deadlock
                (now - STALE_HOLDER, now - STALE_HOLDER)).fetchall()
            for request_id, key_id, amount, start in orphans:
                self.lock_key(conn, key_id)
                if conn.execute("DELETE FROM key_holds WHERE request_id = ?",
                                (request_id,)).rowcount:
                    _spend(conn, key_id, start, amount, 0)
            conn.executemany("DELETE FROM key_holders WHERE holder = ?", [(h,) for h in stale])
            conn.execute("DELETE FROM key_rate WHERE second < ?", (int(now) - 2 * WINDOW,))
            return len(orphans)

    def checkpoint(self) -> None:
        """Copy the WAL into the database (PASSIVE: it waits for no writer and no reader),
        on a connection of its own so that admissions go on meanwhile."""
        try:
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout_ms / 1000.0,
                                   isolation_level=None)
            try:
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise StoreFault(fault_kind(exc), loggable(exc, 300)) from None

    # -- connection and locks ----------------------------------------------------------------

    def close(self) -> None:
        if not self._lock.acquire(timeout=self.lock_timeout):
            return  # a thread is stuck inside: the process is ending anyway
        try:
            if self._conn is not None and self._pid == os.getpid():
                try:
                    self._conn.close()
                except sqlite3.Error:
                    pass
            if self._lock_fd is not None and self._pid == os.getpid():
                os.close(self._lock_fd)
            if self._reader is not None and self._reader_pid == os.getpid():
                try:
                    self._reader.close()
                except sqlite3.Error:
                    pass
            self._conn = self._lock_fd = self._pid = self._reader = self._reader_pid = None
        finally:
            self._lock.release()

    @contextlib.contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, alone on the host: thread lock, then flock, then BEGIN
        IMMEDIATE (which then never waits on another worker).  flock blocks, so a waiting
        worker is woken the moment the lock is free (polling it cost a third of the
        admissions per second); the thread lock is waited for `lock_timeout` seconds at
        most, so a process stuck while it holds the flock (stopped, on a dead disk) stalls
        one thread per worker, and the others get a StoreFault; reads go on."""
        if not self._lock.acquire(timeout=self.lock_timeout):
            raise StoreFault("locked", "the keys database is busy in this process")
        try:
            try:
                conn, fd = self._opened()
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    try:
                        yield conn
                        conn.execute("COMMIT")
                    except BaseException:
                        _rollback(conn)
                        raise
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)
            except (sqlite3.Error, OSError) as exc:
                self._drop_connection()
                raise StoreFault(fault_kind(exc), loggable(exc, 300)) from None
        finally:
            self._lock.release()

    def _read(self, sql: str, params: tuple) -> list[tuple]:
        """A read on a connection of its own (WAL: readers never wait for the writer), so
        keys are looked up while a write waits for its lock."""
        if not self._read_lock.acquire(timeout=self.lock_timeout):
            raise StoreFault("locked", "the keys database is busy in this process")
        try:
            if self._reader is None or self._reader_pid != os.getpid():
                self._opened_for_writes_once()
                self._reader = sqlite3.connect(self.path, timeout=self.lock_timeout,
                                               isolation_level=None, check_same_thread=False)
                self._reader_pid = os.getpid()
            return self._reader.execute(sql, params).fetchall()
        except (sqlite3.Error, OSError) as exc:
            self._reader = None
            raise StoreFault(fault_kind(exc), loggable(exc, 300)) from None
        finally:
            self._read_lock.release()

    def _opened_for_writes_once(self) -> None:
        """The schema exists before the first read (the writer's connection creates it)."""
        if self._pid != os.getpid() or self._conn is None:
            if not self._lock.acquire(timeout=self.lock_timeout):
                raise StoreFault("locked", "the keys database is busy in this process")
            try:
                self._opened()
            finally:
                self._lock.release()

    def _opened(self) -> tuple[sqlite3.Connection, int]:
        """This process's connection and lock descriptor (a forked worker opens its own)."""
        if self._pid != os.getpid() or self._conn is None:
            self._conn = self._lock_fd = None
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                conn = _connect(self.path, self.busy_timeout_ms, fd)
                if self.checkpoints_apart:
                    conn.execute("PRAGMA wal_autocheckpoint = 0")
            except BaseException:
                os.close(fd)
                raise
            self._conn, self._lock_fd, self._pid = conn, fd, os.getpid()
        return self._conn, self._lock_fd

    def _drop_connection(self) -> None:
        """After a fault: the next use opens afresh (a replaced or remounted file)."""
        if self._pid == os.getpid():
            for close in (lambda: self._conn and self._conn.close(),
                          lambda: self._lock_fd is not None and os.close(self._lock_fd)):
                try:
                    close()
                except (sqlite3.Error, OSError):
                    pass
        self._conn = self._lock_fd = self._pid = None


def _flock_within(fd: int, timeout: float) -> None:
    """flock(LOCK_EX), given up after `timeout` seconds (a StoreFault): for opening, where
    no thread lock bounds the wait."""
    deadline = time.monotonic() + timeout
    pause = 0.00002
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise StoreFault("locked", "another process holds the keys database") from None
            time.sleep(pause)
            pause = min(pause * 2, 0.002)


def _connect(path: str, busy_timeout_ms: int, lock_fd: int) -> sqlite3.Connection:
    for name in (path, path + "-wal", path + "-shm"):  # digests and spend: nobody else's
        if os.path.exists(name):
            os.chmod(name, 0o600)
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))  # SQLite gives its WAL this mode
    conn = sqlite3.connect(path, timeout=busy_timeout_ms / 1000.0, isolation_level=None,
                           check_same_thread=False)
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        _flock_within(lock_fd, busy_timeout_ms / 1000.0)  # WAL and schema: one process at once
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            if conn.execute("PRAGMA user_version").fetchone()[0] < 1:
                conn.execute("BEGIN IMMEDIATE")
                for statement in SCHEMA:
                    conn.execute(statement)
                conn.execute("PRAGMA user_version = 1")
                conn.execute("COMMIT")
        finally:
            fcntl.flock(lock_fd, fcntl.LOCK_UN)
    except BaseException:
        conn.close()
        raise
    return conn


def _rollback(conn: sqlite3.Connection) -> None:
    try:
        conn.execute("ROLLBACK")
    except sqlite3.Error:
        pass


def _bump_version(conn: sqlite3.Connection) -> None:
    conn.execute("INSERT INTO key_meta (name, value) VALUES ('version', 1) ON CONFLICT (name) "
                 "DO UPDATE SET value = key_meta.value + 1")


def _spend(conn: sqlite3.Connection, key_id: str, start: float, cost_usd: float,
           tokens: int) -> None:
    conn.execute(
        "INSERT INTO key_spend (key_id, period_start, spent_usd, requests, tokens) "
        "VALUES (?, ?, ?, 1, ?) ON CONFLICT (key_id, period_start) DO UPDATE SET "
        "spent_usd = key_spend.spent_usd + excluded.spent_usd, "
        "requests = key_spend.requests + 1, tokens = key_spend.tokens + excluded.tokens",
        (key_id, start, cost_usd, tokens))


def _count(conn: sqlite3.Connection, key_id: str, second: int, requests: int, tokens: int) -> None:
    conn.execute("INSERT INTO key_rate (key_id, second, requests, tokens) VALUES (?, ?, ?, ?) "
                 "ON CONFLICT (key_id, second) DO UPDATE SET requests = key_rate.requests + "
                 "excluded.requests, tokens = key_rate.tokens + excluded.tokens",
                 (key_id, second, requests, tokens))


def _standing(conn: sqlite3.Connection, key_id: str, start: float, now: float) -> Standing:
    spent = conn.execute("SELECT spent_usd FROM key_spend WHERE key_id = ? AND period_start = ?",
                         (key_id, start)).fetchone()
    held, holds = conn.execute(
        "SELECT COALESCE(SUM(CASE WHEN period_start = ? THEN amount END), 0), COUNT(*) "
        "FROM key_holds WHERE key_id = ?", (start, key_id)).fetchone()
    window = conn.execute("SELECT second, requests, tokens FROM key_rate WHERE key_id = ? AND "
                          "second > ?", (key_id, now - WINDOW)).fetchall()
    return Standing(spent[0] if spent else 0.0, held, holds, [tuple(row) for row in window])


def _key_values(key: ClientKey) -> tuple:
    return (key.id, key.name, key.digest, key.hint, json.dumps(list(key.models)), key.budget_usd,
            key.period, key.rpm, key.tpm, key.max_parallel, key.expires_at, key.revoked_at,
            key.created_at)


def _key(row: tuple) -> ClientKey:
    values = dict(zip(_KEY_COLUMNS, row))
    values["models"] = tuple(json.loads(values["models"] or "[]"))
    return ClientKey(**values)
