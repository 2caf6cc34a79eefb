"""Usage rows in PostgreSQL: what several proxy hosts share (`tracker.db = "postgresql://..."`).

The same rows, reports and answers as the SQLite store, through the same interface; the
driver is psycopg 3 (the optional extra `pip install 'llm-stream-proxy[postgres]'`).

- Inserts are idempotent on the request id (a unique index and `ON CONFLICT DO NOTHING`):
  a batch retried after a lost acknowledgement stores nothing twice, whatever `only_new`
  says.
- Migrations are versioned (table `llm_proxy_schema`) and run under a transaction-scoped
  advisory lock, so hosts starting together on an empty database migrate it once.
- A store owns at most one connection (opened on use, dropped after a fault and opened
  afresh on the next call): the tracker's writer thread owns one, the dedup lookups of a
  worker another, a report a third for as long as it reads.

This is the one module that sees psycopg: its errors become StoreFault (the database, for
now) or RowRejected (the row, for ever) here.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Iterator
from urllib.parse import urlsplit, urlunsplit

from ..text import loggable
from ..usage import DEDUP_REASONS, RECORD_FIELDS
from . import (ANSWER_FIELDS, TOKEN_FIELDS, Counts, RowRejected, StoreFault, TrackerPathError,
               UsageStore, empty_counts, member_of, rollups)

log = logging.getLogger(__name__)

TABLE = "usage_records"
ANSWERS = "dedup_answers"
ROLLUPS = "usage_rollups"
HOUR = 3600.0
MIGRATION_LOCK = 0x6C6C6D70  # "llmp": the advisory lock id migrations take
CONNECT_TIMEOUT = 5  # seconds

_DEDUP = "('" + "', '".join(DEDUP_REASONS) + "')"
_BILLED = " + ".join(f"COALESCE({c}, 0)" for c in TOKEN_FIELDS[:4])
_ROLLUP_COLUMNS = rollups.COLUMNS
PG_HOUR = f"floor(COALESCE(started_at, 0) / {HOUR}) * {HOUR}"
# The first hour whose raw rows are all still there (retention deletes the oldest).
_FIRST_WHOLE_HOUR = (f"(SELECT floor(min(started_at) / {HOUR}) * {HOUR} + {HOUR} "
                     f"FROM {TABLE})")

# Each entry upgrades the schema by one version; never edit a released entry, append a new one.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        f"""CREATE TABLE {TABLE} (
            id BIGSERIAL PRIMARY KEY,
            request_id TEXT NOT NULL, started_at DOUBLE PRECISION, ended_at DOUBLE PRECISION,
            ttfb_ms DOUBLE PRECISION, ttft_ms DOUBLE PRECISION, endpoint TEXT,
            model_requested TEXT, deployment TEXT, upstream_model TEXT, attempts INTEGER,
            fallbacks INTEGER, status INTEGER, end_reason TEXT, stop_reason TEXT,
            input_tokens BIGINT, output_tokens BIGINT, cache_read_tokens BIGINT,
            cache_write_tokens BIGINT, reasoning_tokens BIGINT, cost_usd DOUBLE PRECISION,
            priced SMALLINT, usage_complete SMALLINT, client_key_id TEXT, bytes_in BIGINT,
            bytes_out BIGINT, error TEXT, stream SMALLINT, attempt_log TEXT,
            continuations INTEGER DEFAULT 0, continuation_cost_usd DOUBLE PRECISION,
            paid_by TEXT, saved_cost_usd DOUBLE PRECISION, key_name TEXT
        )""",
        f"CREATE UNIQUE INDEX {TABLE}_request_id ON {TABLE} (request_id)",
        f"CREATE INDEX {TABLE}_started_at ON {TABLE} (started_at)",
        f"CREATE INDEX {TABLE}_model ON {TABLE} (upstream_model, model_requested)",
        f"CREATE INDEX {TABLE}_client_key ON {TABLE} (client_key_id, started_at)",
        f"CREATE INDEX {TABLE}_key_name ON {TABLE} (key_name, started_at)",
        f"CREATE INDEX {TABLE}_end_reason ON {TABLE} (end_reason, started_at)",
        f"""CREATE TABLE {ANSWERS} (
            id BIGSERIAL PRIMARY KEY, shape TEXT NOT NULL, digest TEXT NOT NULL,
            stream SMALLINT, variant TEXT, fmt TEXT, content_type TEXT, status INTEGER,
            body BYTEA, hidden BYTEA, paid_by TEXT, usage TEXT, ended_at DOUBLE PRECISION,
            expires_at DOUBLE PRECISION
        )""",
        f"CREATE INDEX {ANSWERS}_shape ON {ANSWERS} (shape, expires_at)",
        f"CREATE INDEX {ANSWERS}_expires ON {ANSWERS} (expires_at)",
        # Client keys and their counters, shared by every host (proxy/keys/pgstore.py).
        """CREATE TABLE client_keys (
            id TEXT PRIMARY KEY, name TEXT NOT NULL, digest TEXT NOT NULL UNIQUE, hint TEXT,
            models TEXT, budget_usd DOUBLE PRECISION, period TEXT, rpm BIGINT, tpm BIGINT,
            max_parallel BIGINT, expires_at DOUBLE PRECISION, revoked_at DOUBLE PRECISION,
            created_at DOUBLE PRECISION)""",
        "CREATE UNIQUE INDEX client_keys_live_name ON client_keys (name) WHERE revoked_at IS NULL",
        "CREATE TABLE key_meta (name TEXT PRIMARY KEY, value BIGINT)",
        """CREATE TABLE key_holds (
            request_id TEXT PRIMARY KEY, key_id TEXT NOT NULL, amount DOUBLE PRECISION NOT NULL,
            period_start DOUBLE PRECISION NOT NULL, holder TEXT NOT NULL,
            at DOUBLE PRECISION NOT NULL)""",
        "CREATE INDEX key_holds_key ON key_holds (key_id, period_start)",
        """CREATE TABLE key_spend (
            key_id TEXT NOT NULL, period_start DOUBLE PRECISION NOT NULL,
            spent_usd DOUBLE PRECISION NOT NULL DEFAULT 0, requests BIGINT NOT NULL DEFAULT 0,
            tokens BIGINT NOT NULL DEFAULT 0, PRIMARY KEY (key_id, period_start))""",
        """CREATE TABLE key_rate (
            key_id TEXT NOT NULL, second BIGINT NOT NULL, requests BIGINT NOT NULL DEFAULT 0,
            tokens BIGINT NOT NULL DEFAULT 0, PRIMARY KEY (key_id, second))""",
        "CREATE TABLE key_holders (holder TEXT PRIMARY KEY, seen_at DOUBLE PRECISION NOT NULL)",
        # Hourly rollups, kept in the transaction that stores the rows, so that reports read
        # a few rows an hour whatever the raw table holds ('' stands for no value: a key).
        f"""CREATE TABLE {ROLLUPS} (
            hour DOUBLE PRECISION NOT NULL, model TEXT NOT NULL, client_key_id TEXT NOT NULL,
            key_name TEXT NOT NULL, end_reason TEXT NOT NULL,
            requests NUMERIC NOT NULL, input_tokens NUMERIC NOT NULL,
            output_tokens NUMERIC NOT NULL, cache_read_tokens NUMERIC NOT NULL,
            cache_write_tokens NUMERIC NOT NULL, reasoning_tokens NUMERIC NOT NULL,
            cost_usd DOUBLE PRECISION NOT NULL, unpriced NUMERIC NOT NULL,
            continued NUMERIC NOT NULL, continuation_cost_usd DOUBLE PRECISION NOT NULL,
            dedup_requests NUMERIC NOT NULL, dedup_tokens NUMERIC NOT NULL,
            dedup_saved_usd DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (hour, model, client_key_id, key_name, end_reason))""",
        f"CREATE INDEX {ROLLUPS}_client_key ON {ROLLUPS} (client_key_id, hour)",
    ),
    # v2: the client's session; rollups per endpoint and deployment too, with retries,
    # fallbacks and a histogram of time to first token (proxy/store/rollups.py).  The
    # hours whose raw rows are all still there are rebuilt from them; older ones keep
    # what they had (no endpoint, deployment or TTFT).
    (
        f"ALTER TABLE {TABLE} ADD COLUMN session_id TEXT",
        f"CREATE INDEX {TABLE}_session ON {TABLE} (session_id, started_at)",
        f"ALTER TABLE {ROLLUPS} "
        + ", ".join([f"ADD COLUMN {c} TEXT NOT NULL DEFAULT ''" for c in ("endpoint", "deployment")]
                    + [f"ADD COLUMN {c} "
                       f"{'DOUBLE PRECISION' if c in rollups.FLOAT_SUMS else 'NUMERIC'} "
                       "NOT NULL DEFAULT 0" for c in rollups.EXTRA_SUMS]),
        f"ALTER TABLE {ROLLUPS} DROP CONSTRAINT {ROLLUPS}_pkey",
        f"ALTER TABLE {ROLLUPS} ADD PRIMARY KEY ({', '.join(rollups.KEY_COLUMNS)})",
        f"DELETE FROM {ROLLUPS} WHERE hour >= {_FIRST_WHOLE_HOUR}",
        f"INSERT INTO {ROLLUPS} ({', '.join(rollups.COLUMNS)}) "
        + rollups.raw_as_rollup(PG_HOUR, f" WHERE started_at >= {_FIRST_WHOLE_HOUR}"),
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)

_COLUMNS = ", ".join(RECORD_FIELDS)
_INSERT = (f"INSERT INTO {TABLE} ({_COLUMNS}) VALUES "
           f"({', '.join(f'%({name})s' for name in RECORD_FIELDS)}) "
           "ON CONFLICT (request_id) DO NOTHING")
_INSERT_ANSWER = (f"INSERT INTO {ANSWERS} ({', '.join(ANSWER_FIELDS)}) VALUES "
                  f"({', '.join(f'%({name})s' for name in ANSWER_FIELDS)})")

_ROLLUP_UPSERT = rollups.upsert_sql("%s")
_SUMS = ", ".join(f"SUM({c})" for c in rollups.COUNT_SUMS)
_SPEND_FIRST = "ORDER BY SUM(cost_usd) DESC, SUM(requests) DESC"
# What a report groups the rollups by ('' back to no value).
_GROUP_EXPRESSIONS = {
    "day": "to_char(to_timestamp(hour) AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
    "model": "NULLIF(model, '')",
    "client_key": "NULLIF(client_key_id, '')",
    "key": "NULLIF(key_name, '')",
}


def is_postgres_url(db: str) -> bool:
    return db.startswith(("postgresql://", "postgres://"))


def redacted_url(url: str) -> str:
    """The URL without its password (in the user part or as a `password=` parameter), for
    logs and messages; one that cannot be parsed is not shown at all."""
    if not is_postgres_url(url):
        return url
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if parts.password is not None:
            user, _, host = netloc.rpartition("@")
            netloc = f"{user.split(':', 1)[0]}:***@{host}"
        query = "&".join("password=***" if pair.lower().startswith("password=") else pair
                         for pair in parts.query.split("&")) if parts.query else ""
        return urlunsplit(parts._replace(netloc=netloc, query=query))
    except ValueError:
        return "postgresql://(a URL that cannot be parsed)"


class PostgresStore(rollups.RollupQueries, UsageStore):
    """Usage rows in the PostgreSQL database at `url`."""

    MARK = "%s"
    RAW_HOUR = PG_HOUR

    def __init__(self, url: str, busy_timeout_ms: int = 5000) -> None:
        self.url = url
        self.busy_timeout_ms = busy_timeout_ms
        self._conn = None

    def check(self) -> str | None:
        """A URL that can never work (no driver, a bad scheme) stops start-up; a server
        that cannot be reached or refuses us for now is a warning: rows wait and spill."""
        try:
            import psycopg
        except ImportError:
            raise TrackerPathError("tracker.db is a PostgreSQL URL, but psycopg is not installed:"
                                   " pip install 'llm-stream-proxy[postgres]'") from None
        try:
            psycopg.conninfo.conninfo_to_dict(self.url)
        except psycopg.ProgrammingError as exc:
            raise TrackerPathError(f"tracker.db is not a valid PostgreSQL URL: "
                                   f"{_safe(exc, self.url)}") from None
        try:
            self.open()
        except StoreFault as fault:
            return f"usage database {redacted_url(self.url)} is not usable yet ({fault.kind}): " \
                   f"{fault.detail}"
        finally:
            self.close()
        return None

    def open(self) -> None:
        if self._conn is None:
            with self._faults():
                self._conn = self._connect()
                self._migrate()

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # noqa: BLE001 - closing a broken connection
                pass
        self._conn = None

    def insert_rows(self, rows: list[dict], only_new: bool = False) -> int:
        """The rows not stored yet, and their hourly rollups, in one transaction.  The
        rollup rows are updated in the order of their keys, so writers of several hosts
        that touch the same hours never deadlock."""
        self.open()
        with self._faults(rows_may_be_wrong=True):
            with self._conn.transaction():
                with self._conn.cursor() as cursor:
                    cursor.executemany(_INSERT + " RETURNING request_id", rows, returning=True)
                    stored = set()
                    while True:
                        stored.update(found for (found,) in cursor.fetchall())
                        if not cursor.nextset():
                            break
                    # A request id twice in one batch (a replayed spill file) is one row.
                    new = list({r["request_id"]: r for r in reversed(rows)
                                if r["request_id"] in stored}.values())
                    if new:
                        cursor.executemany(_ROLLUP_UPSERT, rollup_deltas(new))
                    return len(new)

    def prune(self, before: float, limit: int) -> int:
        """A bounded batch of old raw rows (their rollups stay): rows other hosts are
        deleting meanwhile are skipped, not waited for."""
        self.open()
        with self._faults():
            return self._conn.execute(
                f"DELETE FROM {TABLE} WHERE id IN (SELECT id FROM {TABLE} WHERE started_at < %s "
                "ORDER BY started_at LIMIT %s FOR UPDATE SKIP LOCKED)", (before, limit)).rowcount

    # -- answers kept for replay --------------------------------------------------------------

    def put_answers(self, answers: list[dict], now: float) -> None:
        self.open()
        with self._faults(rows_may_be_wrong=False):
            with self._conn.transaction():
                with self._conn.cursor() as cursor:
                    cursor.executemany(_INSERT_ANSWER, answers)
                    cursor.execute(f"DELETE FROM {ANSWERS} WHERE expires_at < %s", (now,))

    def find_answers(self, shape: str, now: float) -> list[dict]:
        found = self._query(
            f"SELECT id, digest, stream, variant FROM {ANSWERS} WHERE shape = %s AND "
            "expires_at > %s ORDER BY ended_at DESC LIMIT 64", (shape, now))
        return [dict(zip(("id", "digest", "stream", "variant"), values)) for values in found]

    def answer(self, answer_id: Any) -> dict | None:
        found = self._query(f"SELECT {', '.join(ANSWER_FIELDS)} FROM {ANSWERS} WHERE id = %s",
                            (answer_id,))
        return dict(zip(ANSWER_FIELDS, found[0])) if found else None

    # -- the report's queries ---------------------------------------------------------------

    def totals(self, since: float | None, until: float | None,
               client_key: str | None = None) -> Counts:
        return self._grouped("NULL::text", since, until, client_key=client_key).get(None) \
            or empty_counts()

    def breakdown(self, grouping: str, since: float | None, until: float | None,
                  top: int | None = None, client_key: str | None = None) -> dict[Any, Counts]:
        return self._grouped(_GROUP_EXPRESSIONS[grouping], since, until, top, client_key)

    def group_count(self, grouping: str, since: float | None, until: float | None,
                    client_key: str | None = None) -> int:
        source, params = _source(since, until, client_key)
        rows = self._query(f"SELECT COUNT(*) FROM (SELECT {_GROUP_EXPRESSIONS[grouping]} FROM "
                           f"({source}) AS src GROUP BY 1) AS groups", params)
        return rows[0][0] if rows else 0

    def rows(self, request_id: str | None = None, limit: int | None = None) -> list[dict]:
        where, params = ("", []) if request_id is None else (" WHERE request_id = %s",
                                                             [request_id])
        found = self._query(f"SELECT {_COLUMNS} FROM {TABLE}{where} ORDER BY id LIMIT %s",
                            [*params, limit])
        return [dict(zip(RECORD_FIELDS, values)) for values in found]

    def _grouped(self, expression: str, since: float | None, until: float | None,
                 top: int | None = None, client_key: str | None = None) -> dict[Any, Counts]:
        """Counts per value of `expression` over the rollups of the period's whole hours
        and the raw rows of its partial ones; with `top`, only the groups with the most
        spend, then requests."""
        source, params = _source(since, until, client_key)
        limit = f" {_SPEND_FIRST} LIMIT {int(top)}" if top is not None else ""
        groups = {row[0]: _counts(row[1:]) for row in self._query(
            f"SELECT {expression} AS k, {_SUMS} FROM ({source}) AS src GROUP BY k{limit}",
            params)}
        failed = [f"end_reason NOT IN ('complete', {_DEDUP[1:]}"]
        failed_params = list(params)
        if top is not None:
            failed.append(member_of(expression, list(groups), failed_params, "%s"))
        for key, reason, count in self._query(
                f"SELECT {expression} AS k, end_reason, SUM(requests) FROM ({source}) AS src "
                f"WHERE {' AND '.join(failed)} GROUP BY k, end_reason ORDER BY k, end_reason",
                failed_params):
            groups[key]["failures"][reason] = int(count)
        return groups

    def _has_rollups(self) -> bool:
        """The rollups of this schema (v2); a database no proxy of this version has opened
        yet is read from its raw rows."""
        found = self._query("SELECT max(version) FROM llm_proxy_schema", [])
        return bool(found) and (found[0][0] or 0) >= 2

    # -- connection, schema and faults ---------------------------------------------------------

    def _connect(self):
        import psycopg

        return psycopg.connect(self.url, **connection_settings(self.busy_timeout_ms))

    def _migrate(self) -> int:
        """Bring the schema to SCHEMA_VERSION, once whatever the number of hosts: under a
        transaction-scoped advisory lock, the version is read again before migrating."""
        with self._conn.transaction():
            # A migration may take long (a big table): no statement limit for it, and the
            # lock of a host migrating now is waited for.
            self._conn.execute("SET LOCAL statement_timeout = 0")
            self._conn.execute("SET LOCAL lock_timeout = 0")
            self._conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            self._conn.execute("CREATE TABLE IF NOT EXISTS llm_proxy_schema (version INTEGER)")
            row = self._conn.execute("SELECT max(version) FROM llm_proxy_schema").fetchone()
            found = row[0] or 0
            for statements in MIGRATIONS[found:]:
                for statement in statements:
                    self._conn.execute(statement)
            if found < SCHEMA_VERSION:
                self._conn.execute("INSERT INTO llm_proxy_schema (version) VALUES (%s)",
                                   (SCHEMA_VERSION,))
        if found > SCHEMA_VERSION:
            # Writing would skip what the newer schema keeps (rollups, say): rows wait and
            # spill until this host runs the newer proxy too.
            raise StoreFault("schema_newer", f"the usage database has schema v{found}, newer "
                             f"than this proxy's v{SCHEMA_VERSION}: upgrade this host")
        return found

    def _query(self, sql: str, params) -> list[tuple]:
        """All rows of a read; none while the tables do not exist yet (nothing recorded)."""
        import psycopg

        try:
            if self._conn is None:
                with self._faults():
                    self._conn = self._connect()
            with self._faults():
                return self._conn.execute(sql, params).fetchall()
        except StoreFault:
            raise
        except psycopg.errors.UndefinedTable:
            return []

    @contextlib.contextmanager
    def _faults(self, rows_may_be_wrong: bool = False) -> Iterator[None]:
        """Errors translated (`translated_errors`); after a fault of the database the
        connection is dropped, and made afresh by the next call."""
        try:
            with translated_errors(self.url, rows_may_be_wrong):
                yield
        except StoreFault:
            self.close()
            raise


def connection_settings(busy_timeout_ms: int) -> dict:
    """How every connection is made, so that none can hang: TCP keepalives and a user
    timeout notice a server that vanished without a reset (a failed-over primary) in
    seconds, not the kernel's fifteen minutes; a statement, a wait for a row lock and an
    idle open transaction have limits."""
    wait_ms = max(int(busy_timeout_ms), 100)
    return {"connect_timeout": CONNECT_TIMEOUT, "autocommit": True,
            "application_name": "llm-proxy", "keepalives": 1, "keepalives_idle": 5,
            "keepalives_interval": 2, "keepalives_count": 3, "tcp_user_timeout": 15000,
            "options": f"-c statement_timeout={wait_ms * 6} -c lock_timeout={wait_ms} "
                       f"-c idle_in_transaction_session_timeout={wait_ms * 12}"}


@contextlib.contextmanager
def translated_errors(url: str, rows_may_be_wrong: bool = False) -> Iterator[None]:
    """psycopg's errors, translated once: a row the database will never take (SQLSTATE
    classes 22 and 23, where rows are written) is RowRejected; anything else is a
    StoreFault of a fixed kind, its text without the URL's password."""
    import psycopg

    try:
        yield
    except psycopg.errors.UndefinedTable:
        raise
    except (psycopg.DataError, psycopg.IntegrityError) as exc:
        if rows_may_be_wrong:
            raise RowRejected(_safe(exc, url)) from None
        raise StoreFault("error", _safe(exc, url)) from None
    except (psycopg.Error, OSError) as exc:  # the database's (42: a grant, a column...)
        raise StoreFault(fault_kind(exc), _safe(exc, url)) from None


def _safe(exc: BaseException, url: str) -> str:
    """An error's text for a log line: the URL's password masked, capped, escaped."""
    return loggable(_without_password(str(exc), url), 300)


def fault_kind(exc: BaseException) -> str:
    """A fixed name for what a psycopg error says of the database."""
    import psycopg

    if isinstance(exc, psycopg.errors.DiskFull):
        return "disk_full"
    if isinstance(exc, psycopg.errors.ReadOnlySqlTransaction):
        return "read_only"
    if isinstance(exc, (psycopg.errors.LockNotAvailable, psycopg.errors.DeadlockDetected,
                        psycopg.errors.QueryCanceled)):
        return "locked"
    if isinstance(exc, psycopg.errors.InvalidPassword) or "authentication" in str(exc).lower():
        return "refused"
    if isinstance(exc, (psycopg.OperationalError, OSError)):
        return "unreachable"
    return "error"


def _without_password(text: str, url: str) -> str:
    """`text` with every form of the URL's password masked (as written, and decoded)."""
    from urllib.parse import parse_qs, unquote

    try:
        parts = urlsplit(url)
        found = [parts.password] + parse_qs(parts.query).get("password", [])
        raw = parts.netloc.rpartition("@")[0].partition(":")[2]
    except ValueError:
        return "(an error about a URL that cannot be parsed)"
    for secret in {p for p in [*found, raw, unquote(raw)] if p}:
        text = text.replace(secret, "***")
    return text


# ---------------------------------------------------------------------------------------------
# The report's SQL.


def _source(since: float | None, until: float | None,
            client_key: str | None) -> tuple[str, list]:
    """SQL for the period's rows in the rollups' shape: the rollups of its whole hours, and
    the raw rows of the partial hours at its edges (an hour at most at each)."""
    low = since if since is not None else -1e18
    high = until if until is not None else 1e18
    first = math.ceil(low / HOUR) * HOUR if since is not None else low
    last = math.floor(high / HOUR) * HOUR if until is not None else high
    if last < first:  # within one hour: raw rows only
        first = last = low
    key_rollups = " AND client_key_id = %s" if client_key is not None else ""
    key_raw = " AND client_key_id = %s" if client_key is not None else ""
    raw = rollups.raw_as_rollup(PG_HOUR, " WHERE started_at >= %s AND started_at < %s AND NOT "
                                f"(started_at >= %s AND started_at < %s){key_raw}")
    sql = (f"SELECT {', '.join(_ROLLUP_COLUMNS)} FROM {ROLLUPS} WHERE hour >= %s AND hour < %s"
           f"{key_rollups} UNION ALL {raw}")
    params = [first, last, *([client_key] if client_key is not None else []),
              low, high, first, last, *([client_key] if client_key is not None else [])]
    return sql, params


rollup_deltas = rollups.deltas  # what stored rows add to the rollups, in key order


def _counts(values: tuple) -> Counts:
    requests, *tokens, cost, unpriced, continued, continuation_cost = values[:-3]
    deduped, dedup_tokens, saved = values[-3:]
    return Counts(requests=int(requests), **{k: int(v) for k, v in zip(TOKEN_FIELDS, tokens)},
                  cost_usd=float(cost), unpriced_requests=int(unpriced),
                  continued_requests=int(continued),
                  continuation_cost_usd=float(continuation_cost), dedup_requests=int(deduped),
                  dedup_tokens=int(dedup_tokens), dedup_saved_usd=float(saved), failures={})
