"""Hourly rollups: what the report views and the dashboard read instead of raw rows.

Each store keeps a ``usage_rollups`` table with one row per hour and group (endpoint,
deployment, model, client key, key name, end reason), updated in the transaction that stores
the raw rows, so a view of a year reads a few rows an hour however many requests there
were.  Time to first token is kept as a histogram (TTFT_BOUNDS_MS), so p50 and p95 can be
estimated for any group and period, the way Prometheus estimates them from its buckets.

This module is pure (no connection): the columns, the sums that rows add (`deltas`, in
Python, for new rows), the same sums in SQL (`raw_as_rollup`, for a backfill and for raw
rows read in the rollups' shape), and the queries over the rollups, written once for both
stores (`RollupQueries`), which differ only in their placeholder and hour expression.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

from ..usage import DEDUP_REASONS
from . import TOKEN_FIELDS

HOUR = 3600.0
ROLLUPS = "usage_rollups"
TABLE = "usage_records"

KEY_COLUMNS = ("hour", "endpoint", "deployment", "model", "client_key_id", "key_name",
               "end_reason")
# The sums the usage summary has always read (Counts), in its order.
COUNT_SUMS = ("requests", *TOKEN_FIELDS, "cost_usd", "unpriced", "continued",
              "continuation_cost_usd", "dedup_requests", "dedup_tokens", "dedup_saved_usd")
# Time to first token of paid requests, counted per bucket (not cumulative): upper bounds in
# milliseconds; the last bucket takes the rest.
TTFT_BOUNDS_MS = (100, 250, 500, 1000, 2000, 3000, 5000, 10000, 20000, 30000, 60000, 120000)
TTFT_COLUMNS = tuple(f"ttft_le_{b}" for b in TTFT_BOUNDS_MS) + ("ttft_le_inf",)
EXTRA_SUMS = ("retries", "fallbacks", "ttft_count", "ttft_sum_ms", *TTFT_COLUMNS)
SUM_COLUMNS = COUNT_SUMS + EXTRA_SUMS
COLUMNS = KEY_COLUMNS + SUM_COLUMNS
_SUM_INDEX = {column: index for index, column in enumerate(SUM_COLUMNS)}
FLOAT_SUMS = frozenset({"cost_usd", "continuation_cost_usd", "dedup_saved_usd", "ttft_sum_ms"})

# What a view may group by or filter on, and the rollup column behind each.
DIMENSIONS = {"hour": "hour", "endpoint": "endpoint", "deployment": "deployment",
              "model": "model", "client_key": "client_key_id", "key": "key_name",
              "end_reason": "end_reason"}

_DEDUP = "('" + "', '".join(DEDUP_REASONS) + "')"
_NOT_FAILED = "('complete', '" + "', '".join(DEDUP_REASONS) + "')"
_BILLED = " + ".join(f"COALESCE({c}, 0)" for c in TOKEN_FIELDS[:4])
_PAID_TTFT = "paid_by IS NULL AND ttft_ms IS NOT NULL"


def ttft_bucket(ms: float) -> int:
    """The index of the bucket that `ms` falls in."""
    for index, bound in enumerate(TTFT_BOUNDS_MS):
        if ms <= bound:
            return index
    return len(TTFT_BOUNDS_MS)


def quantile(buckets: list[float], q: float) -> float | None:
    """The q-quantile (0..1) of a TTFT histogram, in ms: linear within the bucket it falls
    in (as Prometheus' histogram_quantile), the last bucket's lower bound beyond the last
    bound.  None without observations."""
    total = sum(buckets)
    if total <= 0:
        return None
    rank = q * total
    seen = 0.0
    for index, count in enumerate(buckets):
        if count and seen + count >= rank:
            if index == len(TTFT_BOUNDS_MS):
                return float(TTFT_BOUNDS_MS[-1])
            low = TTFT_BOUNDS_MS[index - 1] if index else 0.0
            return low + (TTFT_BOUNDS_MS[index] - low) * (rank - seen) / count
        seen += count
    return float(TTFT_BOUNDS_MS[-1])


def rollup_key(row: dict) -> tuple:
    """The rollup a stored row adds to ('' stands for no value: keys have no NULLs)."""
    model = next((m for m in (row["upstream_model"], row["model_requested"]) if m is not None),
                 "")  # as SQL's COALESCE: '' is a value
    return (math.floor((row["started_at"] or 0) / HOUR) * HOUR, row["endpoint"] or "",
            row["deployment"] or "", model, row["client_key_id"] or "", row["key_name"] or "",
            row["end_reason"] or "")


def deltas(rows: Iterable[dict]) -> list[tuple]:
    """What `rows` (stored just now) add to the rollups, as rows of COLUMNS sorted by key
    (writers that take rollup rows in one order never deadlock); the same sums as
    `raw_as_rollup` makes of stored rows."""
    found: dict[tuple, list] = {}
    for row in rows:
        sums = found.setdefault(rollup_key(row), [0] * len(SUM_COLUMNS))
        _add(sums, row)
    return [key + tuple(sums) for key, sums in sorted(found.items())]


def _add(sums: list, row: dict) -> None:
    """Add one stored row to a rollup's sums (in SUM_COLUMNS' order)."""
    for column, amount in _amounts(row).items():
        sums[_SUM_INDEX[column]] += amount


def _amounts(row: dict) -> dict:
    """What one stored row adds to each sum of its rollup (the Python twin of the SQL in
    raw_as_rollup: change both together)."""
    billed = sum(row[c] or 0 for c in TOKEN_FIELDS[:4])
    dedup = row["end_reason"] in DEDUP_REASONS
    paid = row["paid_by"] is None
    fallbacks = row["fallbacks"] or 0
    amounts = {"requests": 1,
               **{c: (row[c] or 0) if paid else 0 for c in TOKEN_FIELDS},
               "cost_usd": (row["cost_usd"] or 0.0) if row["priced"] else 0.0,
               "unpriced": 1 if not row["priced"] and billed > 0 else 0,
               "continued": 1 if (row["continuations"] or 0) > 0 else 0,
               "continuation_cost_usd": row["continuation_cost_usd"] or 0.0,
               "dedup_requests": 1 if dedup else 0,
               "dedup_tokens": billed if dedup else 0,
               "dedup_saved_usd": (row["saved_cost_usd"] or 0.0) if dedup else 0.0,
               "retries": max((row["attempts"] or 0) - 1 - fallbacks, 0),
               "fallbacks": fallbacks}
    if paid and row["ttft_ms"] is not None:
        amounts.update({"ttft_count": 1, "ttft_sum_ms": row["ttft_ms"],
                        TTFT_COLUMNS[ttft_bucket(row["ttft_ms"])]: 1})
    return amounts


def raw_as_rollup(hour: str, where: str = "", group: str | None = None) -> str:
    """SQL for stored rows in the rollups' shape (COLUMNS, in order), grouped by the rollup
    key, or by `group` instead (then the key columns are that expression and ''s).  `hour`
    is the store's expression for the hour a row started in."""
    model = "COALESCE(upstream_model, model_requested, '')"
    keys = [f"{hour} AS hour", "COALESCE(endpoint, '') AS endpoint",
            "COALESCE(deployment, '') AS deployment", f"{model} AS model",
            "COALESCE(client_key_id, '') AS client_key_id", "COALESCE(key_name, '') AS key_name",
            "COALESCE(end_reason, '') AS end_reason"]
    if group is not None:
        keys = [f"{group} AS hour"] + [f"'' AS {c}" for c in KEY_COLUMNS[1:]]
    sums = (["COUNT(*)"]
            + [f"COALESCE(SUM(CASE WHEN paid_by IS NULL THEN {c} END), 0)" for c in TOKEN_FIELDS]
            + ["COALESCE(SUM(CASE WHEN priced <> 0 THEN cost_usd END), 0)",
               f"SUM(CASE WHEN priced = 0 AND {_BILLED} > 0 THEN 1 ELSE 0 END)",
               "SUM(CASE WHEN continuations > 0 THEN 1 ELSE 0 END)",
               "COALESCE(SUM(continuation_cost_usd), 0)",
               f"SUM(CASE WHEN end_reason IN {_DEDUP} THEN 1 ELSE 0 END)",
               f"COALESCE(SUM(CASE WHEN end_reason IN {_DEDUP} THEN {_BILLED} END), 0)",
               f"COALESCE(SUM(CASE WHEN end_reason IN {_DEDUP} THEN saved_cost_usd END), 0)",
               "SUM(CASE WHEN COALESCE(attempts, 0) - 1 - COALESCE(fallbacks, 0) > 0 "
               "THEN COALESCE(attempts, 0) - 1 - COALESCE(fallbacks, 0) ELSE 0 END)",
               "COALESCE(SUM(fallbacks), 0)",
               f"SUM(CASE WHEN {_PAID_TTFT} THEN 1 ELSE 0 END)",
               f"COALESCE(SUM(CASE WHEN {_PAID_TTFT} THEN ttft_ms END), 0)"]
            + [_bucket_sum(i) for i in range(len(TTFT_COLUMNS))])
    columns = [f"{expression} AS {name}" for expression, name in
               zip(sums, SUM_COLUMNS)]
    group_by = ", ".join(str(i) for i in range(1, 2 if group is not None else 8))
    return (f"SELECT {', '.join(keys + columns)} FROM {TABLE}{where} GROUP BY {group_by}")


def _bucket_sum(index: int) -> str:
    low = f" AND ttft_ms > {TTFT_BOUNDS_MS[index - 1]}" if index else ""
    high = f" AND ttft_ms <= {TTFT_BOUNDS_MS[index]}" if index < len(TTFT_BOUNDS_MS) else ""
    return f"SUM(CASE WHEN {_PAID_TTFT}{low}{high} THEN 1 ELSE 0 END)"


def upsert_sql(mark: str) -> str:
    """Add one row of COLUMNS to its rollup (both SQLite and PostgreSQL speak this)."""
    return (f"INSERT INTO {ROLLUPS} ({', '.join(COLUMNS)}) VALUES "
            f"({', '.join([mark] * len(COLUMNS))}) "
            f"ON CONFLICT ({', '.join(KEY_COLUMNS)}) DO UPDATE SET "
            + ", ".join(f"{c} = {ROLLUPS}.{c} + excluded.{c}" for c in SUM_COLUMNS))


def hour_floor(when: float) -> float:
    return math.floor(when / HOUR) * HOUR


def hour_ceil(when: float) -> float:
    return math.ceil(when / HOUR) * HOUR


class RollupQueries:
    """The views' reads, for a store that defines MARK (its placeholder), RAW_HOUR (its SQL
    for a row's hour), `_query(sql, params)` and `_has_rollups()`."""

    MARK = "?"
    RAW_HOUR = ""
    _query: Callable[[str, list], list[tuple]]

    def _has_rollups(self) -> bool:  # pragma: no cover - each store says
        raise NotImplementedError

    def hourly(self, since: float, until: float, dimensions: tuple[str, ...] = ("hour",),
               filters: dict[str, str | None] | None = None,
               client_key: str | None = None) -> list[dict]:
        """Sums per group of `dimensions` (names of DIMENSIONS) over the whole hours that
        start in [since, until); `filters` keep only rows whose dimension has that value
        (None: rows without one).  A dimension's missing value reads as None."""
        wanted = {name: value for name, value in (filters or {}).items()}
        if client_key is not None:
            wanted["client_key"] = client_key
        columns = [DIMENSIONS[d] for d in dimensions]
        where, params = ["hour >= " + self.MARK, "hour < " + self.MARK], [since, until]
        for name, value in wanted.items():
            where.append(f"{DIMENSIONS[name]} = {self.MARK}")
            params.append("" if value is None else value)
        source = ROLLUPS if self._has_rollups() else f"({raw_as_rollup(self.RAW_HOUR)}) AS raw"
        selected = ", ".join(columns + [f"SUM({c})" for c in SUM_COLUMNS])
        group = f" GROUP BY {', '.join(columns)}" if columns else ""
        found = self._query(f"SELECT {selected} FROM {source} WHERE {' AND '.join(where)}{group}",
                            params)
        return [_as_dict(dimensions, values) for values in found if values[len(columns)]]

    def sessions(self, since: float, until: float, top: int,
                 client_key: str | None = None) -> list[dict]:
        """The `top` sessions most recently active in [since, until), newest first, each
        with the sums of its rows there, when it began and ended, and its models.  A
        database the proxy has not migrated yet has no sessions."""
        if not self._has_rollups():  # the same schema version added both
            return []
        where, params = self._raw_window(since, until, client_key)
        where.append("session_id IS NOT NULL")
        sql = raw_as_rollup(self.RAW_HOUR, " WHERE " + " AND ".join(where), group="session_id")
        found = self._query(
            f"SELECT s.*, b.failed, b.first_at, b.last_at FROM ({sql}) AS s JOIN (SELECT "
            f"session_id, SUM(CASE WHEN end_reason IN {_NOT_FAILED} THEN 0 ELSE 1 END) AS "
            f"failed, MIN(started_at) AS first_at, MAX(ended_at) AS last_at FROM {TABLE} WHERE "
            f"{' AND '.join(where)} GROUP BY session_id) AS b ON b.session_id = s.hour "
            f"ORDER BY b.last_at DESC LIMIT {int(top)}", params + params)
        sessions = []
        for values in found:
            row = _as_dict(("session",), (values[0],) + tuple(values[len(KEY_COLUMNS):-3]))
            row["failed"], row["first_at"], row["last_at"] = int(values[-3] or 0), *values[-2:]
            sessions.append(row)
        self._add_models(sessions, where, params)
        return sessions

    def _add_models(self, sessions: list[dict], where: list[str], params: list) -> None:
        if not sessions:
            return
        marks = ", ".join([self.MARK] * len(sessions))
        models: dict[str, list[str]] = {s["session"]: [] for s in sessions}
        for session, model in self._query(
                f"SELECT DISTINCT session_id, COALESCE(upstream_model, model_requested) FROM "
                f"{TABLE} WHERE {' AND '.join(where)} AND session_id IN ({marks}) ORDER BY 1, 2",
                params + [s["session"] for s in sessions]):
            if model is not None:
                models[session].append(model)
        for row in sessions:
            row["models"] = models[row["session"]]

    def first_started(self, since: float, until: float, client_key: str | None = None,
                      filters: dict[str, str | None] | None = None) -> float | None:
        """When the first request in [since, until) of `filters`' model and key started (a
        block's start of activity)."""
        where, params = self._raw_window(since, until, client_key)
        self._raw_filters(filters, where, params)
        found = self._query(f"SELECT MIN(started_at) FROM {TABLE} WHERE "
                            f"{' AND '.join(where)}", params)
        return found[0][0] if found else None

    def recent(self, limit: int, filters: dict[str, str | None] | None = None,
               client_key: str | None = None, since: float | None = None,
               until: float | None = None) -> list[dict]:
        """The last `limit` requests (newest first) that started in [since, until), of
        `filters`' model and key."""
        where, params = [], []
        wanted = dict(filters or {})
        if client_key is not None:
            wanted["client_key"] = client_key
        self._raw_filters(wanted, where, params)
        if since is not None:
            where.append(f"started_at >= {self.MARK}")
            params.append(since)
        if until is not None:
            where.append(f"started_at < {self.MARK}")
            params.append(until)
        fields = RECENT_FIELDS
        clause = " WHERE " + " AND ".join(where) if where else ""
        # By start time: the index on it is walked backwards and the walk stops after
        # `limit` rows (ordering by id would sort every row of the period first).
        found = self._query(f"SELECT {', '.join(fields)} FROM {TABLE}{clause} "
                            f"ORDER BY started_at DESC LIMIT {int(limit)}", params)
        return [dict(zip(fields, values)) for values in found]

    def _raw_filters(self, filters: dict[str, str | None] | None, where: list[str],
                     params: list) -> None:
        """Raw rows of a dimension's value (None: rows without one), as the rollups see it."""
        for name, value in (filters or {}).items():
            column = _RAW_DIMENSIONS[name]
            where.append(f"{column} IS NULL" if value is None else f"{column} = {self.MARK}")
            params += [] if value is None else [value]

    def _raw_window(self, since: float, until: float,
                    client_key: str | None) -> tuple[list[str], list]:
        where = [f"started_at >= {self.MARK}", f"started_at < {self.MARK}"]
        params: list = [since, until]
        if client_key is not None:
            where.append(f"client_key_id = {self.MARK}")
            params.append(client_key)
        return where, params


# A dimension of the rollups, as the raw rows have it.
_RAW_DIMENSIONS = {"model": "COALESCE(upstream_model, model_requested)", "key": "key_name",
                   "deployment": "deployment", "client_key": "client_key_id",
                   "endpoint": "endpoint", "end_reason": "end_reason"}

# What the dashboard's list of recent requests shows (no error texts: they can quote
# upstreams, and the page is for reading at a glance).
RECENT_FIELDS = ("request_id", "started_at", "ended_at", "endpoint", "model_requested",
                 "upstream_model", "deployment", "key_name", "status", "end_reason",
                 "ttft_ms", "input_tokens", "output_tokens", "cache_read_tokens",
                 "cache_write_tokens", "cost_usd", "priced", "stream", "fallbacks",
                 "continuations")


def _as_dict(dimensions: tuple[str, ...], values: tuple) -> dict:
    """A group's row: its dimensions ('' back to None) and its sums as numbers."""
    row: dict[str, Any] = {}
    for name, value in zip(dimensions, values):
        row[name] = None if value == "" else value
    for name, value in zip(SUM_COLUMNS, values[len(dimensions):]):
        row[name] = float(value or 0) if name in FLOAT_SUMS else int(value or 0)
    return row
