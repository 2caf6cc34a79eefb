"""Where usage rows are kept: the ``UsageStore`` interface, its errors and the factory.

The tracker (queue, batching, retries, spill and replay) and the report (time bounds,
rendering) sit above this seam and know nothing of the database behind it: SQLite now,
PostgreSQL (``tracker.db = "postgresql://..."``).  So the interface speaks
only in plain values (row dicts, epoch seconds, counts) and in the exceptions below: each
implementation translates its driver's errors into them, once, the way ``requests``
translates urllib3's, and nothing above ever catches a driver's exception.
"""

from __future__ import annotations

import abc
import hashlib
import os
from typing import Any, TypedDict

# The token counts a report sums, in the order it shows them.
TOKEN_FIELDS = (
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
)
# What a breakdown can group rows by: the UTC day they started, the model (the upstream's,
# else the one asked for), the client key's id and the proxy key's name (keys mode).
GROUPINGS = ("day", "model", "client_key", "key")


class Counts(TypedDict):
    """Sums over a set of rows, as a store answers them (the report derives the rest)."""

    requests: int
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    reasoning_tokens: int
    cost_usd: float  # of the priced rows only
    unpriced_requests: int  # rows that used tokens but had no price: spend the cost misses
    continued_requests: int  # answers continued after their stream broke
    continuation_cost_usd: float  # what those continuations cost on top (the prompt again)
    dedup_requests: int  # duplicates answered by replay or by joining, without paying
    dedup_tokens: int  # the tokens those answers would have cost (not in the sums above)
    dedup_saved_usd: float  # what they would have cost
    failures: dict[str, int]  # rows per end_reason, every reason except "complete"


def empty_counts() -> Counts:
    """The counts of no rows at all."""
    return Counts(requests=0, **dict.fromkeys(TOKEN_FIELDS, 0), cost_usd=0.0,
                  unpriced_requests=0, continued_requests=0, continuation_cost_usd=0.0,
                  dedup_requests=0, dedup_tokens=0, dedup_saved_usd=0.0, failures={})


class TrackerPathError(Exception):
    """The usage database cannot be used at this setting at all (a start-up error)."""


class StoreFault(Exception):
    """The store refuses work for a reason that may clear (locked, full, read-only, gone).

    ``kind`` is a fixed name (/health shows it, never the raw text, which can quote paths
    or data); ``detail`` is the driver's message, made safe for a log line."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


class RowRejected(Exception):
    """The store will never take these rows as they are (a constraint, a value it cannot
    hold): retrying cannot help, so the caller sets them aside instead."""


class UsageStore(abc.ABC):
    """One database of usage rows.  Creating one does no I/O; connections are made on use,
    so a store can be built before the database is reachable.  Not thread-safe: the
    tracker's writer thread, or one report, owns a store."""

    @abc.abstractmethod
    def check(self) -> str | None:
        """Start-up check (in gunicorn's master): raise TrackerPathError when the setting can
        never work; return a warning when the database is unusable for now, else None."""

    @abc.abstractmethod
    def open(self) -> None:
        """Connect and bring the schema up to date, ready for inserts; idempotent.
        Raises StoreFault."""

    @abc.abstractmethod
    def close(self) -> None:
        """Let go of every connection; never raises.  The store can be opened again."""

    @abc.abstractmethod
    def insert_rows(self, rows: list[dict], only_new: bool = False) -> int:
        """Store ``rows`` (complete dicts of RECORD_FIELDS) in one transaction, all or none;
        return how many were stored.  With ``only_new``, rows whose request_id is stored
        already are skipped: replays and retries must never store a row twice.  Opens the
        store if needed.  Raises StoreFault (nothing stored, try again later) or RowRejected
        (nothing stored; some row can never be)."""

    @abc.abstractmethod
    def totals(self, since: float | None, until: float | None,
               client_key: str | None = None) -> Counts:
        """Counts over the rows that started in [since, until) (epoch seconds, None for no
        bound), only those of ``client_key`` (a client key id) when given.  A database that
        does not exist yet holds no rows.  Raises StoreFault, or ValueError when the
        database holds something other than usage rows."""

    @abc.abstractmethod
    def breakdown(self, grouping: str, since: float | None, until: float | None,
                  top: int | None = None, client_key: str | None = None) -> dict[Any, Counts]:
        """Counts per group (one of GROUPINGS; a row without a value is in the group None);
        with ``top``, only the ``top`` groups with the most spend, then requests.  Raises as
        ``totals`` does."""

    @abc.abstractmethod
    def group_count(self, grouping: str, since: float | None, until: float | None,
                    client_key: str | None = None) -> int:
        """How many groups ``breakdown`` would return without ``top``."""

    @abc.abstractmethod
    def rows(self, request_id: str | None = None, limit: int | None = None) -> list[dict]:
        """Stored rows as dicts of RECORD_FIELDS, oldest first (only ``request_id``'s when
        given; the first ``limit`` when given): what a test or an embedding application
        asserts on.
        Raises as ``totals`` does."""


    def prune(self, before: float, limit: int) -> int:
        """Delete at most `limit` raw rows that started before `before` (retention), in one
        short transaction; how many went.  Only a store whose reports read rollups prunes:
        the others keep every row (their reports are the rows)."""
        return 0

    # -- finished answers kept for replay (a cache shared by the workers; see proxy/dedup) --

    @abc.abstractmethod
    def put_answers(self, answers: list[dict], now: float) -> None:
        """Keep ``answers`` (dicts of ANSWER_FIELDS) and forget those expired before ``now``,
        in one transaction.  Raises StoreFault (nothing kept: they are a cache, the caller
        drops them)."""

    @abc.abstractmethod
    def find_answers(self, shape: str, now: float) -> list[dict]:
        """The kept answers of this shape that have not expired by ``now``, newest first,
        without their bodies: ``id``, ``digest``, ``stream`` and ``variant`` (a lookup reads
        a body only once a digest matched).  None kept (or no such table yet) is an empty
        list.  Raises StoreFault."""

    @abc.abstractmethod
    def answer(self, answer_id: Any) -> dict | None:
        """One kept answer, whole (ANSWER_FIELDS), by the ``id`` find_answers gave; None
        when it is gone.  Raises StoreFault."""


# What a kept answer is stored as (proxy/dedup/answers.py builds and reads them).
ANSWER_FIELDS = ("shape", "digest", "stream", "variant", "fmt", "content_type", "status", "body",
                 "hidden", "paid_by", "usage", "ended_at", "expires_at")


def member_of(expression: str, keys: list, params: list, mark: str) -> str:
    """SQL for "expression is one of keys" (NULL included), appending the keys to params;
    `mark` is the driver's placeholder (`?`, `%s`)."""
    values = [k for k in keys if k is not None]
    params.extend(values)
    parts = [f"{expression} IN ({', '.join([mark] * len(values))})"] if values else []
    if None in keys:
        parts.append(f"{expression} IS NULL")
    return "(" + " OR ".join(parts) + ")" if parts else "(1 = 0)"


def default_spill_dir(db: str, data_dir: str) -> str:
    """Where rows wait that the database `db` cannot take yet, unless configured: one
    directory per database (a shared one would replay rows into the wrong database).  A
    file's beside it; a server's in `data_dir`, named after the URL (without its
    password)."""
    from .postgres import is_postgres_url, redacted_url

    if not is_postgres_url(db):
        return db + ".spill"
    digest = hashlib.sha256(redacted_url(db).encode("utf-8")).hexdigest()[:16]
    return os.path.join(data_dir, f"usage-{digest}.spill")


def open_store(db: str, busy_timeout_ms: int = 5000) -> UsageStore:
    """The store that the ``tracker.db`` setting names: a ``postgresql://`` URL, else a file
    path (SQLite).  Nothing is opened yet; ``busy_timeout_ms`` bounds how long a call waits
    for another writer."""
    from .postgres import PostgresStore, is_postgres_url
    from .sqlite import SqliteStore

    if is_postgres_url(db):
        return PostgresStore(db, busy_timeout_ms)
    return SqliteStore(db, busy_timeout_ms)
