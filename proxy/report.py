"""``llm-proxy usage``: totals, per day, per model and per client key from the usage database.

Days are UTC days of the request's start. ``since`` is inclusive and ``until`` exclusive; a bare
date for ``until`` means the end of that day, so ``--since 2026-11-01 --until 2026-11-30``
covers all of November's last day too.

Definitions, so that every figure can be checked against the rows:

- ``cache_hit_ratio`` = cache_read / (input + cache_read + cache_write), or None without input;
- ``cost_usd`` sums the priced rows only;
- ``unpriced_requests`` counts rows that used tokens but had no price (unknown model), i.e.
  spend the cost figure cannot include;
- ``failures`` counts rows by ``end_reason``, everything except ``complete``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import sqlite3
import sys
from datetime import date, datetime, timedelta, timezone
from typing import Any

from .tracker import TABLE
from .usage import END_REASONS

TOKEN_COLUMNS = (
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
)
STAT_COLUMNS = ("requests", *TOKEN_COLUMNS, "cache_hit_ratio", "cost_usd", "unpriced_requests")

# (summary key, label of the group column, SQL expression of the group)
GROUPINGS = (
    ("by_day", "day", "date(started_at, 'unixepoch')"),
    ("by_model", "model", "COALESCE(upstream_model, model_requested)"),
    ("by_client_key", "client_key_id", "client_key_id"),
)

_HAS_TOKENS = " + ".join(f"COALESCE({c}, 0)" for c in TOKEN_COLUMNS[:4]) + " > 0"
_AGGREGATES = ", ".join(
    ["COUNT(*)"]
    + [f"COALESCE(SUM({c}), 0)" for c in TOKEN_COLUMNS]
    + ["TOTAL(CASE WHEN priced THEN cost_usd END)",
       f"COALESCE(SUM(CASE WHEN NOT priced AND {_HAS_TOKENS} THEN 1 ELSE 0 END), 0)"]
)
_DATE_ONLY = re.compile(r"\d{4}-\d{2}-\d{2}")


# ---------------------------------------------------------------------------------------------
# Time bounds.


def parse_when(value: Any, end: bool = False) -> float | None:
    """Epoch seconds from ``YYYY-MM-DD``, an ISO datetime, a date/datetime or a number.

    Times without a zone are UTC. With ``end=True`` a bare date means the *next* midnight,
    so that an exclusive upper bound still includes the whole named day.
    """
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ValueError(f"not a date or time: {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, datetime):
        return _aware(value).timestamp()
    if isinstance(value, date):
        return _midnight(value, end)
    if isinstance(value, str):
        return _parse_text(value.strip(), end)
    raise ValueError(f"not a date or time: {value!r}")


def _parse_text(text: str, end: bool) -> float:
    try:
        if _DATE_ONLY.fullmatch(text):
            return _midnight(date.fromisoformat(text), end)
        return _aware(datetime.fromisoformat(text)).timestamp()
    except ValueError:
        raise ValueError(
            f"not a date or time: {text!r} (expected YYYY-MM-DD or an ISO datetime such as "
            "2026-11-21T13:00:00Z)"
        ) from None


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _midnight(day: date, end: bool) -> float:
    moment = datetime(day.year, day.month, day.day, tzinfo=timezone.utc)
    return (moment + timedelta(days=1) if end else moment).timestamp()


def _iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat().replace("+00:00", "Z")


# ---------------------------------------------------------------------------------------------
# Summary.


def summarize(db_path: str, since: Any = None, until: Any = None, top: int | None = None) -> dict:
    """Totals and breakdowns for requests that started in [since, until).

    With `top`, the model and client-key breakdowns hold only the `top` groups with the most
    spend (then requests), and ``groups`` says how many there are in all: a report over
    hundreds of thousands of keys stays small.  Raises FileNotFoundError for a missing
    database and ValueError for bad bounds or a file that is not a usage database.
    """
    start, stop = parse_when(since), parse_when(until, end=True)
    if not os.path.exists(db_path):
        raise FileNotFoundError(db_path)
    conn = _open(db_path)
    try:
        clauses, params = _window(start, stop)
        summary = {"since": _iso(start), "until": _iso(stop)}
        summary["totals"] = _grouped(conn, "NULL", clauses, params).get(None, _empty_stats())
        counts = {}
        for key, label, expression in GROUPINGS:
            limit = top if key != "by_day" else None
            groups = _grouped(conn, expression, clauses, params, limit)
            summary[key] = _ordered(key, [{label: k, **s} for k, s in groups.items()])
            if limit is not None:
                counts[key] = _group_count(conn, expression, clauses, params)
        if top is not None:
            summary["groups"] = counts
        return summary
    finally:
        conn.close()


def _open(db_path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(db_path, timeout=5.0)
    found = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (TABLE,)
    ).fetchone()
    if not found:
        conn.close()
        raise ValueError(f"{db_path} is not a usage database (no {TABLE} table)")
    return conn


def _window(start: float | None, stop: float | None) -> tuple[list[str], list]:
    clauses, params = [], []
    if start is not None:
        clauses.append("started_at >= ?")
        params.append(start)
    if stop is not None:
        clauses.append("started_at < ?")
        params.append(stop)
    return clauses, params


def _where(clauses: list[str]) -> str:
    return " WHERE " + " AND ".join(clauses) if clauses else ""


def _grouped(conn: sqlite3.Connection, expression: str, clauses: list[str], params: list,
             top: int | None = None) -> dict:
    """Stats per value of ``expression`` (one group, keyed None, for "NULL"); with `top`,
    only the groups with the most spend, then requests."""
    limit = (" ORDER BY TOTAL(CASE WHEN priced THEN cost_usd END) DESC, COUNT(*) DESC "
             f"LIMIT {int(top)}") if top is not None else ""
    rows = conn.execute(
        f"SELECT {expression} AS k, {_AGGREGATES} FROM {TABLE}{_where(clauses)} GROUP BY k{limit}",
        params,
    ).fetchall()
    groups = {row[0]: _stats(row[1:]) for row in rows}
    failed_clauses = [*clauses, "end_reason != 'complete'"]
    failed_params = list(params)
    if top is not None:
        failed_clauses.append(_member_of(expression, list(groups), failed_params))
    for key, reason, count in conn.execute(
        f"SELECT {expression} AS k, end_reason, COUNT(*) FROM {TABLE}{_where(failed_clauses)} "
        "GROUP BY k, end_reason ORDER BY k, end_reason",
        failed_params,
    ):
        groups[key]["failures"][reason] = count
    return groups


def _member_of(expression: str, keys: list, params: list) -> str:
    """SQL for "expression is one of keys" (NULL included), appending the keys to params."""
    values = [k for k in keys if k is not None]
    params.extend(values)
    parts = [f"{expression} IN ({', '.join('?' * len(values))})"] if values else []
    if None in keys:
        parts.append(f"{expression} IS NULL")
    return "(" + " OR ".join(parts) + ")" if parts else "0"


def _group_count(conn: sqlite3.Connection, expression: str, clauses: list[str], params: list) -> int:
    return conn.execute(f"SELECT COUNT(*) FROM (SELECT 1 FROM {TABLE}{_where(clauses)} "
                        f"GROUP BY {expression})", params).fetchone()[0]


def _stats(values: tuple) -> dict:
    requests, *tokens, cost, unpriced = values
    stats = {"requests": requests, **dict(zip(TOKEN_COLUMNS, tokens))}
    stats["cache_hit_ratio"] = _hit_ratio(stats)
    stats["cost_usd"] = round(cost, 9)  # float sums carry noise far below a nano-dollar
    stats["unpriced_requests"] = unpriced
    stats["failures"] = {}
    return stats


def _empty_stats() -> dict:
    return _stats((0, 0, 0, 0, 0, 0, 0.0, 0))


def _hit_ratio(stats: dict) -> float | None:
    read = stats["cache_read_tokens"]
    prompt = stats["input_tokens"] + read + stats["cache_write_tokens"]
    return read / prompt if prompt else None


def _ordered(key: str, rows: list[dict]) -> list[dict]:
    """Days in calendar order; models and keys by spend, then by requests."""
    if key == "by_day":
        return sorted(rows, key=lambda r: r["day"] or "")
    label = "model" if key == "by_model" else "client_key_id"
    return sorted(rows, key=lambda r: (-r["cost_usd"], -r["requests"], r[label] or ""))


# ---------------------------------------------------------------------------------------------
# Rendering.

_HEADERS = {
    "requests": "requests",
    "input_tokens": "input",
    "output_tokens": "output",
    "cache_read_tokens": "cache read",
    "cache_write_tokens": "cache write",
    "reasoning_tokens": "reasoning",
    "cache_hit_ratio": "cache hit",
    "cost_usd": "cost USD",
    "unpriced_requests": "unpriced",
}
_SECTIONS = (("by_day", "By day (UTC)", "day"), ("by_model", "By model", "model"),
             ("by_client_key", "By client key", "client_key_id"))


def render_table(summary: dict) -> str:
    """Readable aligned columns: totals, then each breakdown."""
    parts = [_title(summary), "", "Totals", _table("", [("all", summary["totals"])])]
    for key, title, label in _SECTIONS:
        rows = [(row[label], row) for row in summary[key]]
        parts += ["", title, _table(label.replace("_", " "), rows) if rows else "(no requests)"]
    return "\n".join(parts) + "\n"


def _title(summary: dict) -> str:
    since, until = summary.get("since"), summary.get("until")
    if not since and not until:
        return "Usage: all recorded requests"
    return f"Usage: requests started from {since or 'the beginning'} until {until or 'now'}"


def _table(label: str, rows: list[tuple[Any, dict]]) -> str:
    header = [label, *(_HEADERS[c] for c in STAT_COLUMNS), "failures"]
    body = [[_cell_key(key), *(_cell(c, stats[c]) for c in STAT_COLUMNS),
             _failures_text(stats["failures"])] for key, stats in rows]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    return "\n".join(_line(r, widths) for r in [header, *body])


def _line(cells: list[str], widths: list[int]) -> str:
    """First and last columns are text (left-aligned); the numbers between align right."""
    last = len(cells) - 1
    out = [c.ljust(w) if i in (0, last) else c.rjust(w)
           for i, (c, w) in enumerate(zip(cells, widths))]
    return "  ".join(out).rstrip()


def _cell_key(key: Any) -> str:
    return "-" if key is None else str(key)


def _cell(column: str, value: Any) -> str:
    if value is None:
        return "-"
    if column == "cache_hit_ratio":
        return f"{value:.1%}"
    if column == "cost_usd":
        return f"{value:,.6f}"  # single requests often cost fractions of a cent
    return f"{value:,}"


def _failures_text(failures: dict) -> str:
    return ", ".join(f"{reason}={count}" for reason, count in sorted(failures.items())) or "-"


def render_csv(summary: dict) -> str:
    """One flat CSV: a ``group`` column (total, day, model, client_key) and a ``key`` column,
    the stats, then one ``failed_<end_reason>`` column per failure reason."""
    reasons = _failure_reasons(summary)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["group", "key", *STAT_COLUMNS, *(f"failed_{r}" for r in reasons)])
    for group, key, stats in _csv_rows(summary):
        values = ["" if stats[c] is None else stats[c] for c in STAT_COLUMNS]
        writer.writerow([group, "" if key is None else key, *values,
                         *(stats["failures"].get(r, 0) for r in reasons)])
    return out.getvalue()


def _csv_rows(summary: dict):
    yield "total", None, summary["totals"]
    for key, _, label in _SECTIONS:
        group = {"by_day": "day", "by_model": "model", "by_client_key": "client_key"}[key]
        for row in summary[key]:
            yield group, row[label], row


def _failure_reasons(summary: dict) -> list[str]:
    known = [r for r in END_REASONS if r != "complete"]
    seen = {r for _, _, stats in _csv_rows(summary) for r in stats["failures"]}
    return known + sorted(seen - set(known))


# ---------------------------------------------------------------------------------------------
# Command line.


def add_usage_arguments(parser) -> None:
    """Options of ``llm-proxy usage``."""
    parser.add_argument("--since", help="first day or time to include: YYYY-MM-DD or an ISO "
                        "datetime (UTC unless it names a zone)")
    parser.add_argument("--until", help="end of the report: a bare date includes that whole "
                        "day; an ISO datetime is exclusive")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print the summary as JSON")
    output.add_argument("--csv", action="store_true", help="print the summary as CSV")
    parser.add_argument("--db", help="usage database to read (default: the configured tracker "
                        "database)")


def run_usage(args, default_db_path: str | None) -> int:
    """Print the report chosen by ``args``; 0 on success, 1 without a database, 2 bad input."""
    db_path = getattr(args, "db", None) or default_db_path
    if not db_path or not os.path.exists(db_path):
        _complain(f"no usage database at {db_path or '(none configured)'}; the proxy creates it "
                  "when it records its first request (use --db to read another file)")
        return 1
    try:
        summary = summarize(db_path, getattr(args, "since", None), getattr(args, "until", None))
    except ValueError as exc:
        _complain(str(exc))
        return 2
    except (OSError, sqlite3.Error) as exc:
        _complain(f"cannot read {db_path}: {exc}")
        return 1
    sys.stdout.write(_render(summary, args))
    return 0


def _render(summary: dict, args) -> str:
    if getattr(args, "json", False):
        return json.dumps(summary, indent=2) + "\n"
    if getattr(args, "csv", False):
        return render_csv(summary)
    return render_table(summary)


def _complain(message: str) -> None:
    print(f"llm-proxy usage: {message}", file=sys.stderr)
