"""Usage rows in one SQLite file: the embedded default store.

Several processes (gunicorn workers) share one file safely: WAL mode lets readers and one
writer work together, ``BEGIN IMMEDIATE`` takes the write lock up front, and
``busy_timeout`` makes writers queue for each other.  The schema is versioned with
``PRAGMA user_version`` and migrated when the store is opened for writing, under a write
lock.  Reading (the report) never creates, migrates or writes the file.

This is the one module that sees ``sqlite3``: its errors become StoreFault (the database,
for now) or RowRejected (the row, for ever) here.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sqlite3
import time
from typing import Any, Iterator

from ..text import loggable
from ..usage import DEDUP_REASONS, RECORD_FIELDS
from . import ANSWER_FIELDS, TOKEN_FIELDS, Counts, RowRejected, StoreFault, TrackerPathError, UsageStore, \
    empty_counts, member_of
from . import rollups

log = logging.getLogger(__name__)

TABLE = "usage_records"
ANSWERS = "dedup_answers"

# Each entry upgrades the schema by one version; never edit a released entry, append a new one.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        f"""CREATE TABLE {TABLE} (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            request_id TEXT, started_at REAL, ended_at REAL, ttfb_ms REAL, ttft_ms REAL,
            endpoint TEXT, model_requested TEXT, deployment TEXT, upstream_model TEXT,
            attempts INTEGER, fallbacks INTEGER, status INTEGER, end_reason TEXT,
            stop_reason TEXT, input_tokens INTEGER, output_tokens INTEGER,
            cache_read_tokens INTEGER, cache_write_tokens INTEGER, reasoning_tokens INTEGER,
            cost_usd REAL, priced INTEGER, usage_complete INTEGER, client_key_id TEXT,
            bytes_in INTEGER, bytes_out INTEGER, error TEXT, stream INTEGER
        )""",
        f"CREATE INDEX {TABLE}_started_at ON {TABLE} (started_at)",
        f"CREATE INDEX {TABLE}_model ON {TABLE} (upstream_model, model_requested)",
        f"CREATE INDEX {TABLE}_client_key ON {TABLE} (client_key_id, started_at)",
        f"CREATE INDEX {TABLE}_end_reason ON {TABLE} (end_reason, started_at)",
        f"CREATE INDEX {TABLE}_request_id ON {TABLE} (request_id)",
    ),
    # v2: failed tries (deployment, why, input tokens seen) before the one that answered.
    (f"ALTER TABLE {TABLE} ADD COLUMN attempt_log TEXT",),
    # v3: continuations of an answer whose stream broke, and what they cost on top.
    (f"ALTER TABLE {TABLE} ADD COLUMN continuations INTEGER DEFAULT 0",
     f"ALTER TABLE {TABLE} ADD COLUMN continuation_cost_usd REAL"),
    # v4: dedup: who paid for a replayed or joined answer and what it saved; the finished
    # answers kept for replay, shared by the workers (a cache: rows expire).
    (f"ALTER TABLE {TABLE} ADD COLUMN paid_by TEXT",
     f"ALTER TABLE {TABLE} ADD COLUMN saved_cost_usd REAL",
     f"""CREATE TABLE {ANSWERS} (
            shape TEXT NOT NULL, digest TEXT NOT NULL, stream INTEGER, variant TEXT, fmt TEXT,
            content_type TEXT, status INTEGER, body BLOB, hidden BLOB, paid_by TEXT,
            usage TEXT, ended_at REAL, expires_at REAL
        )""",
     f"CREATE INDEX {ANSWERS}_shape ON {ANSWERS} (shape, expires_at)",
     f"CREATE INDEX {ANSWERS}_expires ON {ANSWERS} (expires_at)"),
    # v5: the proxy key (keys mode) a request was made with, by name.
    (f"ALTER TABLE {TABLE} ADD COLUMN key_name TEXT",
     f"CREATE INDEX {TABLE}_key_name ON {TABLE} (key_name, started_at)"),
    # v6: the client's session; hourly rollups (proxy/store/rollups.py) for the report's
    # views and the dashboard, filled from the rows stored so far.
    (f"ALTER TABLE {TABLE} ADD COLUMN session_id TEXT",
     f"CREATE INDEX {TABLE}_session ON {TABLE} (session_id, started_at)",
     f"CREATE TABLE {rollups.ROLLUPS} ("
     + ", ".join([f"{c} {'REAL' if c == 'hour' else 'TEXT'} NOT NULL"
                  for c in rollups.KEY_COLUMNS]
                 + [f"{c} {'REAL' if c in rollups.FLOAT_SUMS else 'INTEGER'} NOT NULL"
                    for c in rollups.SUM_COLUMNS])
     + f", PRIMARY KEY ({', '.join(rollups.KEY_COLUMNS)})) WITHOUT ROWID",
     f"CREATE INDEX {rollups.ROLLUPS}_client_key ON {rollups.ROLLUPS} (client_key_id, hour)",
     f"INSERT INTO {rollups.ROLLUPS} ({', '.join(rollups.COLUMNS)}) "
     + rollups.raw_as_rollup("CAST(COALESCE(started_at, 0) / 3600 AS INTEGER) * 3600.0")),
)
SCHEMA_VERSION = len(MIGRATIONS)

_COLUMNS = ", ".join(RECORD_FIELDS)
_PARAMS = ", ".join(f":{name}" for name in RECORD_FIELDS)
_INSERT = f"INSERT INTO {TABLE} ({_COLUMNS}) VALUES ({_PARAMS})"
# Replayed rows may already be stored (a replay cut short, a batch spilled by close() while
# a stuck writer committed it after all): the request id decides.
_ROLLUP_UPSERT = rollups.upsert_sql("?")
_INSERT_ANSWER = (f"INSERT INTO {ANSWERS} ({', '.join(ANSWER_FIELDS)}) VALUES "
                  f"({', '.join(':' + name for name in ANSWER_FIELDS)})")
# Errors that belong to one row (a constraint, a value SQLite cannot bind), not to the
# database; anything else from SQLite is a fault of the store, and rows wait.
_ROW_ERRORS = (sqlite3.IntegrityError, sqlite3.InterfaceError, sqlite3.ProgrammingError,
               sqlite3.DataError, OverflowError, ValueError, TypeError)

# The report's sums; the order is the order of Counts (see _counts).  A replayed or joined
# request paid nothing: its tokens are counted as saved, never as used.
_DEDUP = "('" + "', '".join(DEDUP_REASONS) + "')"
_HAS_TOKENS = " + ".join(f"COALESCE({c}, 0)" for c in TOKEN_FIELDS[:4]) + " > 0"
_AGGREGATES = ", ".join(
    ["COUNT(*)"]
    + [f"COALESCE(SUM(CASE WHEN {{paid_by}} IS NULL THEN {c} END), 0)" for c in TOKEN_FIELDS]
    + ["TOTAL(CASE WHEN priced THEN cost_usd END)",
       f"COALESCE(SUM(CASE WHEN NOT priced AND {_HAS_TOKENS} THEN 1 ELSE 0 END), 0)",
       "COALESCE(SUM(CASE WHEN {continuations} > 0 THEN 1 ELSE 0 END), 0)",
       "TOTAL({continuation_cost_usd})",
       f"COALESCE(SUM(CASE WHEN end_reason IN {_DEDUP} THEN 1 ELSE 0 END), 0)",
       f"COALESCE(SUM(CASE WHEN end_reason IN {_DEDUP} THEN "
       + " + ".join(f"COALESCE({c}, 0)" for c in TOKEN_FIELDS[:4]) + " END), 0)",
       f"TOTAL(CASE WHEN end_reason IN {_DEDUP} THEN {{saved_cost_usd}} END)"]
)
# Columns later schema versions added: a database not migrated yet (the report reads, never
# migrates; the server migrates on its first write) reads as if they held nothing.
_ADDED_COLUMNS = {"attempt_log": "NULL", "continuations": "0", "continuation_cost_usd": "NULL",
                  "paid_by": "NULL", "saved_cost_usd": "NULL", "key_name": "NULL",
                  "session_id": "NULL"}
_SPEND_FIRST = "ORDER BY TOTAL(CASE WHEN priced THEN cost_usd END) DESC, COUNT(*) DESC"
_GROUP_EXPRESSIONS = {
    "day": "date(started_at, 'unixepoch')",
    "model": "COALESCE(upstream_model, model_requested)",
    "client_key": "client_key_id",
    "key": "key_name",
}
_ALL_ROWS = "NULL"  # the "group" of the totals: every row has the same key, None


class SqliteStore(rollups.RollupQueries, UsageStore):
    """Usage rows in the SQLite file at ``path``: one connection for writing (opened,
    created and migrated by ``open``) and one for reading (the file as it is)."""

    MARK = "?"
    RAW_HOUR = "CAST(COALESCE(started_at, 0) / 3600 AS INTEGER) * 3600.0"

    def __init__(self, path: str, busy_timeout_ms: int = 5000) -> None:
        self.path = path
        self.busy_timeout_ms = busy_timeout_ms
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None

    def check(self) -> str | None:
        """The path itself is wrong (a parent that is a file, a directory that cannot be
        created or written, a file that is not a database): TrackerPathError.  A fault that
        may clear (locked, disk full, I/O error) only returns a warning: the proxy serves
        anyway, and its writers keep rows until the database takes them."""
        try:
            open_database(self.path, self.busy_timeout_ms).close()
        except (FileExistsError, NotADirectoryError) as exc:
            raise TrackerPathError(f"usage database {self.path}: {exc.filename or 'a parent'} "
                                   "is not a directory") from None
        except OSError as exc:
            raise TrackerPathError(f"usage database {self.path}: {exc.strerror or exc}"
                                   + (f" ({exc.filename})" if exc.filename else "")) from None
        except sqlite3.DatabaseError as exc:
            kind = fault_kind(exc)
            if kind in ("cannot_open", "read_only", "not_a_database"):
                raise TrackerPathError(f"usage database {self.path}: {exc}") from None
            return f"usage database {self.path} is not usable yet ({kind}): {exc}"
        return None

    def open(self) -> None:
        if self._writer is None:
            try:
                self._writer = open_database(self.path, self.busy_timeout_ms)
            except (sqlite3.Error, OSError) as exc:
                raise _fault(exc) from None

    def close(self) -> None:
        for conn in (self._writer, self._reader):
            if conn is not None:
                try:
                    conn.close()
                except sqlite3.Error:
                    pass
        self._writer = self._reader = None

    def insert_rows(self, rows: list[dict], only_new: bool = False) -> int:
        self.open()
        try:
            return _insert(self._writer, rows, only_new)
        except _ROW_ERRORS as exc:  # this row, not the database: the connection is fine
            raise RowRejected(loggable(exc, 300)) from None
        except (sqlite3.Error, OSError) as exc:  # locked, full, read-only, corrupt, replaced
            self.close()  # a remounted or replaced file needs a fresh connection
            raise _fault(exc) from None

    # -- answers kept for replay --------------------------------------------------------------

    def put_answers(self, answers: list[dict], now: float) -> None:
        self.open()
        try:
            with _write_transaction(self._writer):
                self._writer.executemany(_INSERT_ANSWER, answers)
                self._writer.execute(f"DELETE FROM {ANSWERS} WHERE expires_at < ?", (now,))
        except (sqlite3.Error, OSError, ValueError, TypeError, OverflowError) as exc:
            self.close()
            raise _fault(exc) from None

    def find_answers(self, shape: str, now: float) -> list[dict]:
        found = self._answer_query(
            f"SELECT rowid, digest, stream, variant FROM {ANSWERS} WHERE shape = ? "
            "AND expires_at > ? ORDER BY ended_at DESC LIMIT 64", (shape, now))
        return [dict(zip(("id", "digest", "stream", "variant"), values)) for values in found]

    def answer(self, answer_id: Any) -> dict | None:
        found = self._answer_query(f"SELECT {', '.join(ANSWER_FIELDS)} FROM {ANSWERS} "
                                   "WHERE rowid = ?", (answer_id,))
        return dict(zip(ANSWER_FIELDS, found[0])) if found else None

    def _answer_query(self, sql: str, params: tuple) -> list[tuple]:
        try:
            conn = self._reading()
            return conn.execute(sql, params).fetchall() if conn is not None else []
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):  # a database from before dedup: nothing kept
                return []
            raise _fault(exc) from None
        except (sqlite3.Error, OSError) as exc:
            raise _fault(exc) from None

    # -- the report's queries ---------------------------------------------------------------

    def totals(self, since: float | None, until: float | None,
               client_key: str | None = None) -> Counts:
        return self._grouped(_ALL_ROWS, since, until, client_key=client_key).get(None) \
            or empty_counts()

    def breakdown(self, grouping: str, since: float | None, until: float | None,
                  top: int | None = None, client_key: str | None = None) -> dict[Any, Counts]:
        return self._grouped(self._grouping(grouping), since, until, top, client_key)

    def group_count(self, grouping: str, since: float | None, until: float | None,
                    client_key: str | None = None) -> int:
        where, params = _window(since, until, client_key)
        rows = self._query(f"SELECT COUNT(*) FROM (SELECT 1 FROM {TABLE}{_where(where)} "
                           f"GROUP BY {self._grouping(grouping)})", params)
        return rows[0][0] if rows else 0

    def _grouping(self, grouping: str) -> str:
        expression = _GROUP_EXPRESSIONS[grouping]
        return self._column(expression, alias=False) if expression in _ADDED_COLUMNS \
            else expression

    def rows(self, request_id: str | None = None, limit: int | None = None) -> list[dict]:
        where, params = ([], []) if request_id is None else (["request_id = ?"], [request_id])
        columns = ", ".join(self._column(name) for name in RECORD_FIELDS)
        found = self._query(f"SELECT {columns} FROM {TABLE}{_where(where)} ORDER BY id "
                            f"LIMIT ?", [*params, -1 if limit is None else int(limit)])
        return [dict(zip(RECORD_FIELDS, values)) for values in found]

    def _grouped(self, expression: str, since: float | None, until: float | None,
                 top: int | None = None, client_key: str | None = None) -> dict[Any, Counts]:
        """Counts per value of ``expression``, failures included; with `top`, only the
        groups with the most spend, then requests (their failures only)."""
        where, params = _window(since, until, client_key)
        limit = f" {_SPEND_FIRST} LIMIT {int(top)}" if top is not None else ""
        aggregates = _AGGREGATES.format(**{name: self._column(name, alias=False) for name in (
            "continuations", "continuation_cost_usd", "paid_by", "saved_cost_usd")})
        groups = {row[0]: _counts(row[1:]) for row in self._query(
            f"SELECT {expression} AS k, {aggregates} FROM {TABLE}{_where(where)} "
            f"GROUP BY k{limit}", params)}
        failed, failed_params = [*where, f"end_reason NOT IN ('complete', {_DEDUP[1:]}"], list(params)
        if top is not None:
            failed.append(member_of(expression, list(groups), failed_params, "?"))
        for key, reason, count in self._query(
                f"SELECT {expression} AS k, end_reason, COUNT(*) FROM {TABLE}{_where(failed)} "
                "GROUP BY k, end_reason ORDER BY k, end_reason", failed_params):
            groups[key]["failures"][reason] = count
        return groups

    def _has_rollups(self) -> bool:
        """A database the proxy has not migrated yet (it migrates on its first write) is
        read from its raw rows instead."""
        return bool(self._query("SELECT 1 FROM sqlite_master WHERE type = 'table' AND "
                                "name = ?", [rollups.ROLLUPS]))

    def _column(self, name: str, alias: bool = True) -> str:
        """`name`, or what it reads as in a database from before it was added."""
        if name not in _ADDED_COLUMNS:
            return name
        try:
            conn = self._reading()
            present = conn is None or any(
                row[1] == name for row in conn.execute(f"PRAGMA table_info({TABLE})"))
        except (sqlite3.Error, OSError) as exc:
            raise _fault(exc) from None
        if present:
            return name
        return f"{_ADDED_COLUMNS[name]} AS {name}" if alias else _ADDED_COLUMNS[name]

    def _query(self, sql: str, params: list) -> list[tuple]:
        """All rows of a read; none while the database does not exist or is empty."""
        try:
            conn = self._reading()
            return conn.execute(sql, params).fetchall() if conn is not None else []
        except (sqlite3.Error, OSError) as exc:
            raise _fault(exc) from None

    def _reading(self) -> sqlite3.Connection | None:
        """The read connection; None for a file that does not exist or has no tables yet
        (connecting would create it).  ValueError for a database of something else."""
        if self._reader is None and os.path.exists(self.path):
            # The answers lookup reads from request threads, one at a time (under its lock).
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout_ms / 1000.0,
                                   check_same_thread=False)
            try:
                tables = {name for (name,) in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table'")}
            except BaseException:
                conn.close()
                raise
            if TABLE in tables:
                self._reader = conn
                return conn
            conn.close()
            if tables:
                raise ValueError(f"{self.path} is not a usage database (no {TABLE} table)")
        return self._reader


def _fault(exc: BaseException) -> StoreFault:
    return StoreFault(fault_kind(exc), loggable(exc, 300))


def fault_kind(exc: BaseException) -> str:
    """A fixed name for what an OSError or sqlite3 error says of the database."""
    if isinstance(exc, OSError):
        if exc.errno == errno.ENOSPC:
            return "disk_full"
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            return "read_only"
        return "cannot_open"
    text = str(exc).lower()
    for marker, kind in (("locked", "locked"), ("busy", "locked"), ("full", "disk_full"),
                         ("readonly", "read_only"), ("read-only", "read_only"),
                         ("unable to open", "cannot_open"), ("not a database", "not_a_database"),
                         ("malformed", "corrupt"), ("disk i/o", "io_error")):
        if marker in text:
            return kind
    return "error"


# ---------------------------------------------------------------------------------------------
# Connections and the schema.


def open_database(db_path: str, busy_timeout_ms: int = 5000) -> sqlite3.Connection:
    """Create the directory, open, migrate: a connection ready for inserts."""
    os.makedirs(os.path.dirname(os.path.abspath(db_path)), exist_ok=True)
    conn = connect(db_path, busy_timeout_ms)
    try:
        migrate(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def connect(db_path: str, busy_timeout_ms: int = 5000) -> sqlite3.Connection:
    """Open ``db_path`` in WAL mode with a busy timeout, in autocommit (explicit BEGIN) mode."""
    conn = sqlite3.connect(
        db_path,
        timeout=busy_timeout_ms / 1000.0,
        isolation_level=None,
        check_same_thread=False,  # opened by Tracker.start(), then owned by its writer thread
    )
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        _retry_locked(lambda: conn.execute("PRAGMA journal_mode = WAL").fetchone())
        conn.execute("PRAGMA synchronous = NORMAL")
    except BaseException:
        conn.close()
        raise
    return conn


def _retry_locked(action, tries: int = 20):
    """Switching to WAL needs a moment of exclusive access; workers starting together wait."""
    for attempt in range(tries):
        try:
            return action()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc) or attempt == tries - 1:
                raise
            time.sleep(0.01 * (attempt + 1))
    return None


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema to ``SCHEMA_VERSION`` under a write lock; returns the version found."""
    found = _user_version(conn)
    if found >= SCHEMA_VERSION:
        _warn_if_newer(found)
        return found
    with _write_transaction(conn):
        found = _user_version(conn)  # another worker may have migrated while we waited
        for statements in MIGRATIONS[found:]:
            for statement in statements:
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    return found


def _user_version(conn: sqlite3.Connection) -> int:
    return conn.execute("PRAGMA user_version").fetchone()[0]


def _warn_if_newer(found: int) -> None:
    if found > SCHEMA_VERSION:
        log.warning("usage database schema v%d is newer than this proxy's v%d",
                    found, SCHEMA_VERSION)


def _insert(conn: sqlite3.Connection, rows: list[dict], only_new: bool) -> int:
    """Insert ``rows`` and their rollups in one transaction (all of them are stored, or
    none); how many were.  With ``only_new``, a request id stored already, or met earlier
    in the batch, is skipped."""
    with _write_transaction(conn):
        if only_new:
            rows = _not_stored(conn, rows)
        if rows:
            conn.executemany(_INSERT, rows)
            conn.executemany(_ROLLUP_UPSERT, rollups.deltas(rows))
        return len(rows)


def _not_stored(conn: sqlite3.Connection, rows: list[dict]) -> list[dict]:
    first = list({r["request_id"]: r for r in reversed(rows)}.values())[::-1]
    ids = [r["request_id"] for r in first]
    stored = set()
    for start in range(0, len(ids), 500):
        part = ids[start:start + 500]
        stored.update(found for (found,) in conn.execute(
            f"SELECT request_id FROM {TABLE} WHERE request_id IN "
            f"({', '.join('?' * len(part))})", part))
    return [r for r in first if r["request_id"] not in stored]


@contextlib.contextmanager
def _write_transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """All or nothing.  ``BEGIN IMMEDIATE`` takes the write lock up front: a deferred
    transaction that upgrades from reading to writing can fail with "locked" at once,
    where busy_timeout would have let it wait its turn."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # nothing was open, or the connection is gone: either way nothing was written
        raise


# ---------------------------------------------------------------------------------------------
# The report's SQL.


def _window(since: float | None, until: float | None,
            client_key: str | None = None) -> tuple[list[str], list]:
    clauses, params = [], []
    if client_key is not None:  # one key's own rows (a client asking for its usage)
        clauses.append("client_key_id = ?")
        params.append(client_key)
    if since is not None:
        clauses.append("started_at >= ?")
        params.append(since)
    if until is not None:
        clauses.append("started_at < ?")
        params.append(until)
    return clauses, params


def _where(clauses: list[str]) -> str:
    return " WHERE " + " AND ".join(clauses) if clauses else ""


def _counts(values: tuple) -> Counts:
    requests, *tokens, cost, unpriced, continued, continuation_cost = values[:-3]
    deduped, dedup_tokens, saved = values[-3:]
    return Counts(requests=requests, **dict(zip(TOKEN_FIELDS, tokens)), cost_usd=cost,
                  unpriced_requests=unpriced, continued_requests=continued,
                  continuation_cost_usd=continuation_cost, dedup_requests=deduped,
                  dedup_tokens=dedup_tokens, dedup_saved_usd=saved, failures={})
