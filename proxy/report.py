"""``llm-proxy usage``: the report's views (daily, monthly, session, blocks, models, keys;
proxy/views.py, read from the hourly rollups, drawn by proxy/tables.py), the summary
(totals, per day, per model and per client key, as /usage gives it), and the dashboard's
data.

The rest of this docstring is about the summary.  Days are UTC days of the request's start. ``since`` is inclusive and ``until`` exclusive; a bare
date for ``until`` means the end of that day, so ``--since 2026-11-01 --until 2026-11-30``
covers all of November's last day too.

The store (``proxy.store``) answers the sums; this module turns bounds into epoch seconds,
the sums into figures, and the figures into a table, CSV or JSON.  A database that does not
exist yet, or holds no rows, gives the same empty report as a period without requests.

Definitions, so that every figure can be checked against the rows:

- ``cache_hit_ratio`` = cache_read / (input + cache_read + cache_write), or None without input;
- ``cost_usd`` sums the priced rows only;
- ``unpriced_requests`` counts rows that used tokens but had no price (unknown model), i.e.
  spend the cost figure cannot include;
- ``failures`` counts rows by ``end_reason``, everything except ``complete`` and the two
  dedup reasons;
- the token sums count what was paid for: a replayed or joined request (end reason ``replay``
  or ``joined``) paid nothing, so its tokens are in ``dedup_tokens`` (input, output, cache
  read and write) instead, ``dedup_requests`` counts those requests and ``dedup_saved_usd``
  what their answers cost the requests that paid.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
import time
from datetime import date, datetime, timedelta, timezone, tzinfo
from typing import Any

from . import tables, views
from .store import TOKEN_FIELDS, Counts, StoreFault, UsageStore, open_store
from .store.rollups import hour_ceil, hour_floor
from .usage import DEDUP_REASONS, END_REASONS
from .views import VIEWS

STAT_COLUMNS = ("requests", *TOKEN_FIELDS, "cache_hit_ratio", "cost_usd", "unpriced_requests",
                "continued_requests", "continuation_cost_usd", "dedup_requests", "dedup_tokens",
                "dedup_saved_usd")

# (summary key, label of the group column, the store's grouping, which is also the CSV
# group, title in the table)
GROUPINGS = (
    ("by_day", "day", "day", "By day (UTC)"),
    ("by_model", "model", "model", "By model"),
    ("by_client_key", "client_key_id", "client_key", "By client key"),
    ("by_key", "key", "key", "By proxy key"),
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


def summarize(db: str, since: Any = None, until: Any = None, top: int | None = None,
              client_key: str | None = None) -> dict:
    """Totals and breakdowns for requests that started in [since, until), from the usage
    database that `db` (the ``tracker.db`` setting) names.

    With `top`, the model and client-key breakdowns hold only the `top` groups with the most
    spend (then requests), and ``groups`` says how many there are in all: a report over
    hundreds of thousands of keys stays small.  With `client_key` (a client key id), only
    that key's rows are counted (what a client may see of its own usage).  Raises ValueError for bad bounds or a
    database of something else, StoreFault when the database cannot be read now.
    """
    start, stop = parse_when(since), parse_when(until, end=True)
    store = open_store(db)
    try:
        return _summary(store, start, stop, top, client_key)
    finally:
        store.close()


def _summary(store: UsageStore, start: float | None, stop: float | None,
             top: int | None, client_key: str | None = None) -> dict:
    summary = {"since": _iso(start), "until": _iso(stop),
               "totals": _stats(store.totals(start, stop, client_key))}
    counts = {}
    for key, label, grouping, _ in GROUPINGS:
        limit = top if key != "by_day" else None  # every day of the period, in order
        groups = store.breakdown(grouping, start, stop, limit, client_key)
        summary[key] = _ordered(key, label, [{label: k, **_stats(c)} for k, c in groups.items()])
        if limit is not None:
            counts[key] = store.group_count(grouping, start, stop, client_key)
    if top is not None:
        summary["groups"] = counts
    return summary


def _stats(counts: Counts) -> dict:
    """A group's figures from the store's sums; derived here, so every store derives alike."""
    stats = {"requests": counts["requests"], **{c: counts[c] for c in TOKEN_FIELDS}}
    stats["cache_hit_ratio"] = _hit_ratio(stats)
    stats["cost_usd"] = round(counts["cost_usd"], 9)  # float sums carry noise below a nano-dollar
    stats["unpriced_requests"] = counts["unpriced_requests"]
    stats["continued_requests"] = counts["continued_requests"]
    stats["continuation_cost_usd"] = round(counts["continuation_cost_usd"], 9)
    stats["dedup_requests"] = counts["dedup_requests"]
    stats["dedup_tokens"] = counts["dedup_tokens"]
    stats["dedup_saved_usd"] = round(counts["dedup_saved_usd"], 9)
    stats["failures"] = dict(counts["failures"])
    return stats


def _hit_ratio(stats: dict) -> float | None:
    read = stats["cache_read_tokens"]
    prompt = stats["input_tokens"] + read + stats["cache_write_tokens"]
    return read / prompt if prompt else None


def _ordered(key: str, label: str, rows: list[dict]) -> list[dict]:
    """Days in calendar order; models and keys by spend, then by requests."""
    if key == "by_day":
        return sorted(rows, key=lambda r: r["day"] or "")
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
    "continued_requests": "continued",
    "continuation_cost_usd": "continuation USD",
    "dedup_requests": "deduped",
    "dedup_tokens": "dedup tokens",
    "dedup_saved_usd": "saved USD",
}


def render_table(summary: dict) -> str:
    """Readable aligned columns: totals, then each breakdown."""
    parts = [_title(summary), "", "Totals", _table("", [("all", summary["totals"])])]
    for key, label, _, title in GROUPINGS:
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
    if column in ("cost_usd", "continuation_cost_usd", "dedup_saved_usd"):
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
    for key, label, group, _ in GROUPINGS:
        for row in summary[key]:
            yield group, row[label], row


def _failure_reasons(summary: dict) -> list[str]:
    known = [r for r in END_REASONS if r != "complete" and r not in DEDUP_REASONS]
    seen = {r for _, _, stats in _csv_rows(summary) for r in stats["failures"]}
    return known + sorted(seen - set(known))


# ---------------------------------------------------------------------------------------------
# Command line.


def add_usage_arguments(parser) -> None:
    """Options of ``llm-proxy usage``."""
    parser.add_argument("view", nargs="?", default="daily", choices=(*VIEWS, "summary"),
                        help="daily (default), monthly, session, blocks (5-hour windows), "
                        "models, keys; or summary (totals and every breakdown, as /usage)")
    parser.add_argument("--since", help="first day or time to include: YYYY-MM-DD or an ISO "
                        "datetime (UTC unless it names a zone); views count whole hours")
    parser.add_argument("--until", help="end of the report: a bare date includes that whole "
                        "day; an ISO datetime is exclusive")
    parser.add_argument("--model", help="only this model (daily, monthly, blocks, models, keys)")
    parser.add_argument("--key", help="only this proxy key, by name (daily, monthly, blocks, "
                        "models, keys)")
    parser.add_argument("--timezone", help="days and months of the daily and monthly views, "
                        "and bare dates of --since/--until, in this IANA zone (default UTC), "
                        "e.g. Europe/Berlin")
    parser.add_argument("--top", type=int, default=VIEW_TOP,
                        help=f"rows of the session, models and keys views (default {VIEW_TOP})")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print the report as JSON")
    output.add_argument("--csv", action="store_true", help="print the report as CSV")
    parser.add_argument("--db", help="usage database to read (default: the configured tracker "
                        "database)")


def run_usage(args, default_db_path: str | None) -> int:
    """Print the report chosen by ``args``; 0 on success (an empty report for a database that
    does not exist yet), 1 when the database cannot be read, 2 for bad input."""
    db_path = getattr(args, "db", None) or default_db_path
    if not db_path:
        _complain("no usage database configured (use --db to name one)")
        return 1
    name = getattr(args, "view", None) or "daily"
    ignored = [f"--{flag}" for flag in ("model", "key", "timezone")
               if getattr(args, flag, None) and name in _WITHOUT.get(flag, ())]
    if ignored:
        _complain(f"{' and '.join(ignored)} do not apply to the {name} view")
        return 2
    try:
        if name == "summary":
            report = summarize(db_path, getattr(args, "since", None), getattr(args, "until", None))
        else:
            filters = {k: v for k in ("model", "key") if (v := getattr(args, k, None))}
            report = view(db_path, name, getattr(args, "since", None),
                          getattr(args, "until", None), filters=filters,
                          top=getattr(args, "top", VIEW_TOP),
                          zone=getattr(args, "timezone", None))
    except ValueError as exc:
        _complain(str(exc))
        return 2
    except StoreFault as exc:
        _complain(f"cannot read {db_path}: {exc}")
        return 1
    sys.stdout.write(_render(report, args))
    return 0


def _render(report: dict, args) -> str:
    if getattr(args, "json", False):
        return json.dumps(report, indent=2) + "\n"
    if "view" not in report:  # the summary
        return render_csv(report) if getattr(args, "csv", False) else render_table(report)
    if getattr(args, "csv", False):
        return tables.render_view_csv(report)
    return tables.render_view(report, rich_terminal=sys.stdout.isatty())


def _complain(message: str) -> None:
    print(f"llm-proxy usage: {message}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Views (proxy/views.py): read from the rollups, rendered here.

VIEW_TOP = 50
# Views an option does not apply to (an error, rather than a report that ignores it).
_WITHOUT = {"model": ("session", "summary"), "key": ("session", "summary"),
            "timezone": ("session", "blocks", "models", "keys", "summary")}
SESSION_DAYS = 30  # the session view reads raw rows: the last 30 days unless told otherwise


def view(db: str, name: str, since: Any = None, until: Any = None,
         filters: dict | None = None, top: int = VIEW_TOP, now: float | None = None,
         client_key: str | None = None, zone: str | None = None) -> dict:
    """One of views.VIEWS over [since, until) in whole hours (all recorded time by
    default; the last SESSION_DAYS for sessions); days and months in `zone` (an IANA
    name; UTC by default).  Raises ValueError for bad bounds, names or zones, StoreFault
    when the database cannot be read now."""
    if name not in VIEWS:
        raise ValueError(f"no view {name!r}; one of {', '.join(VIEWS)}")
    if not 1 <= int(top) <= 100_000:
        raise ValueError("top must be between 1 and 100000")
    tz = time_zone(zone)
    now = time.time() if now is None else now
    start, stop = view_bounds(since, until, now, SESSION_DAYS if name == "session" else None,
                              tz)
    store = open_store(db)
    try:
        report = _view(store, name, start, stop, filters or {}, int(top), now, client_key, tz)
    finally:
        store.close()
    return {"view": name, "since": _iso(start) if start > 0 else None, "until": _iso(stop),
            **({"timezone": zone} if zone else {}), **report}


def time_zone(name: str | None) -> tzinfo:
    if not name:
        return timezone.utc
    try:
        from zoneinfo import ZoneInfo
        return ZoneInfo(name)
    except (ValueError, KeyError, OSError) as exc:  # ZoneInfoNotFoundError is a KeyError
        raise ValueError(f"unknown time zone {name!r} (an IANA name such as Europe/Berlin)") \
            from exc


def view_bounds(since: Any, until: Any, now: float, default_days: int | None,
                zone: tzinfo = timezone.utc) -> tuple[float, float]:
    """[since, until) widened to whole hours; bare dates are midnights in `zone`."""
    stop = zoned(until, zone, end=True)
    stop = hour_ceil(stop) if stop is not None else hour_floor(now) + 3600
    start = zoned(since, zone)
    if start is None:
        start = stop - default_days * 86400 if default_days else 0.0
    return hour_floor(start), stop


BLOCKS_LOOKBACK_DAYS = 7


def _blocks(store: UsageStore, start: float, stop: float, filters: dict, now: float,
            client_key: str | None) -> dict:
    """Blocks start where the activity says, not where the period does: the rows are read
    from the last silence of 5 hours before `start` (looking back at most a week)."""
    anchor = _last_silence_before(store, start, filters, client_key)
    rows = store.hourly(anchor, stop, views.QUERIES["blocks"], filters, client_key)
    report = views.blocks(rows, now, since=start)
    last = report["rows"][-1] if report["rows"] else None
    if last is not None and last["active"]:  # its burn rate runs from its first request
        began = parse_when(last["block_start"])
        first = store.first_started(began, stop, client_key, filters)
        report = views.blocks(rows, now, first, start)
    return report


def _last_silence_before(store: UsageStore, start: float, filters: dict,
                         client_key: str | None) -> float:
    """The first hour of activity after the last gap of 5 hours or more before `start`
    (a block can only begin there), or `start` when there is none to look at."""
    if start <= 0:
        return start
    hours = sorted(r["hour"] for r in store.hourly(start - BLOCKS_LOOKBACK_DAYS * 86400, start,
                                                   ("hour",), filters, client_key))
    if not hours:
        return start
    anchor = hours[0]
    for before, after in zip(hours, hours[1:]):
        if after - before >= views.BLOCK:
            anchor = after
    return anchor if start - hours[-1] < views.BLOCK else start


def zoned(value: Any, zone: tzinfo, end: bool = False) -> float | None:
    """parse_when, with bare dates (and times without a zone) in `zone`."""
    if isinstance(value, str) and zone is not timezone.utc:
        text = value.strip()
        try:
            if _DATE_ONLY.fullmatch(text):
                day = date.fromisoformat(text) + timedelta(days=1 if end else 0)
                return datetime(day.year, day.month, day.day, tzinfo=zone).timestamp()
            moment = datetime.fromisoformat(text)
            if moment.tzinfo is None:
                return moment.replace(tzinfo=zone).timestamp()
        except ValueError:
            pass  # parse_when says what is wrong
    return parse_when(value, end=end)


def _view(store: UsageStore, name: str, start: float, stop: float, filters: dict, top: int,
          now: float, client_key: str | None, zone: tzinfo = timezone.utc) -> dict:
    if name == "session":
        return views.sessions(store.sessions(start, stop, top, client_key))
    rows = store.hourly(start, stop, views.QUERIES[name], filters, client_key)
    if name in ("daily", "monthly"):
        return views.by_period(rows, name, zone)
    if name == "blocks":
        return _blocks(store, start, stop, filters, now, client_key)
    report = views.by_dimension(rows, name)
    report["groups"] = len(report["rows"])
    report["rows"] = report["rows"][:top]
    return report


def dashboard_data(db: str, period: str, filters: dict | None = None,
                   now: float | None = None, recent: int = 25) -> dict:
    """What /dashboard shows for the last `period` (views.DASHBOARD_PERIODS), filtered by
    model and proxy key: a few queries over the rollups, and the last `recent` rows."""
    if period not in views.DASHBOARD_PERIODS:
        raise ValueError(f"period must be one of {', '.join(views.DASHBOARD_PERIODS)}")
    now = time.time() if now is None else now
    until = hour_floor(now) + 3600
    since = until - views.DASHBOARD_PERIODS[period] * 86400
    filters = {k: v for k, v in (filters or {}).items() if v}
    store = open_store(db)
    try:
        found = {name: store.hourly(since, until, dims, filters)
                 for name, dims in views.DASHBOARD_QUERIES.items()}
        choices = _choices(store, since, until, filters, found)
        last = store.recent(recent, filters, since=since, until=until)
    finally:
        store.close()
    return {"period": period, "filters": filters,
            **views.dashboard(found, since, until, last, choices)}


def _choices(store: UsageStore, since: float, until: float, filters: dict,
             found: dict) -> dict:
    """Every model and key of the period, for the filter menus (the filtered rows would
    only offer what is chosen already)."""
    models = found["models"] if not filters else store.hourly(since, until, ("model",))
    keys = found["keys"] if not filters else store.hourly(since, until, ("key",))
    return {"models": sorted({r["model"] for r in models if r["model"] is not None}),
            "keys": sorted({r["key"] for r in keys if r["key"] is not None})}
