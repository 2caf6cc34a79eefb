"""The report's views (``llm-proxy usage daily|monthly|session|blocks|models|keys``) and the
dashboard's figures, from the hourly rollups (proxy/store/rollups.py).

Pure: rollup rows in, view rows out.  The store reads; proxy/report.py renders.  Views work
in whole UTC hours: a period starting at 10:30 counts from 10:00 (the rollups' grain), and
days and months are UTC days and months.

Every row has the same figures, so every view reads alike:
``requests``, the five token counts (what was paid for: replays and joins are counted in
``dedup_requests`` instead), ``cache_hit_ratio`` (cache read over the whole prompt: input,
cache read and cache write), ``cost_usd`` (priced rows), ``unpriced_requests``,
``failed_requests`` (every end reason except complete and the dedup ones), ``retries``,
``fallbacks``, ``continued_requests``, and ``ttft_p50_ms`` / ``ttft_p95_ms``, estimated from
the TTFT histogram (linear within a bucket, see rollups.TTFT_BOUNDS_MS).
"""

from __future__ import annotations

from datetime import datetime, timezone, tzinfo
from typing import Any, Iterable

from .store import TOKEN_FIELDS
from .store.rollups import HOUR, SUM_COLUMNS, TTFT_COLUMNS, quantile
from .usage import DEDUP_REASONS

VIEWS = ("daily", "monthly", "session", "blocks", "models", "keys")
BLOCK_HOURS = 5  # Anthropic's usage windows: ccusage's "blocks"
BLOCK = BLOCK_HOURS * HOUR

STAT_FIELDS = ("requests", *TOKEN_FIELDS, "cache_hit_ratio", "cost_usd", "unpriced_requests",
               "failed_requests", "retries", "fallbacks", "continued_requests",
               "dedup_requests", "ttft_p50_ms", "ttft_p95_ms")
_NOT_FAILED = ("complete", *DEDUP_REASONS)


# ---------------------------------------------------------------------------------------------
# Sums and the figures derived from them.


def empty_sums() -> dict:
    return dict.fromkeys(SUM_COLUMNS, 0) | {"failed": 0}


def add_sums(into: dict, row: dict) -> dict:
    """Add a rollup row's sums (and its failures, by its end reason) into `into`."""
    for column in SUM_COLUMNS:
        into[column] += row[column]
    reason = row.get("end_reason", "complete")
    if reason not in _NOT_FAILED:
        into["failed"] += row["requests"]
    return into


def stats(sums: dict) -> dict:
    """A group's figures, from its sums."""
    prompt = sums["input_tokens"] + sums["cache_read_tokens"] + sums["cache_write_tokens"]
    buckets = [sums[c] for c in TTFT_COLUMNS]
    p50, p95 = quantile(buckets, 0.5), quantile(buckets, 0.95)
    return {
        "requests": sums["requests"],
        **{c: sums[c] for c in TOKEN_FIELDS},
        "cache_hit_ratio": sums["cache_read_tokens"] / prompt if prompt else None,
        "cost_usd": round(sums["cost_usd"], 9),
        "unpriced_requests": sums["unpriced"],
        "failed_requests": sums["failed"],
        "retries": sums["retries"],
        "fallbacks": sums["fallbacks"],
        "continued_requests": sums["continued"],
        "dedup_requests": sums["dedup_requests"],
        "ttft_p50_ms": round(p50, 1) if p50 is not None else None,
        "ttft_p95_ms": round(p95, 1) if p95 is not None else None,
    }


def grouped(rows: Iterable[dict], key) -> dict[Any, dict]:
    """Sums per `key(row)`, in the order groups are first met."""
    groups: dict[Any, dict] = {}
    for row in rows:
        k = key(row)
        add_sums(groups.setdefault(k, empty_sums()), row)
    return groups


def total(rows: Iterable[dict]) -> dict:
    return stats(grouped(rows, lambda row: None).get(None, empty_sums()))


# ---------------------------------------------------------------------------------------------
# The views.  Each takes the rollup rows its store query gave (see QUERIES) and returns
# {"view", "rows", "totals"}; the caller adds the period.

# What each view asks the store for: the rollups' dimensions (rollups.DIMENSIONS).
QUERIES = {
    "daily": ("hour", "model", "end_reason"),
    "monthly": ("hour", "model", "end_reason"),
    "models": ("model", "end_reason"),
    "keys": ("key", "end_reason"),
    "blocks": ("hour", "model", "end_reason"),
}


def day_of(hour: float, zone: tzinfo = timezone.utc) -> str:
    """The day an hour starts in, in `zone` (a zone with a half-hour offset counts each
    hour whole in the day it starts in: the rollups' grain is the hour)."""
    return datetime.fromtimestamp(hour, zone).strftime("%Y-%m-%d")


def month_of(hour: float, zone: tzinfo = timezone.utc) -> str:
    return datetime.fromtimestamp(hour, zone).strftime("%Y-%m")


def iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat().replace("+00:00", "Z")


def by_period(rows: list[dict], view: str, zone: tzinfo = timezone.utc) -> dict:
    """daily or monthly: one row per day (month) in `zone`, oldest first, with its models."""
    label, of = ("day", day_of) if view == "daily" else ("month", month_of)

    def period(hour: float) -> str:
        return of(hour, zone)

    models: dict[str, set] = {}
    for row in rows:
        if row["model"] is not None and row["requests"]:
            models.setdefault(period(row["hour"]), set()).add(row["model"])
    groups = grouped(rows, lambda row: period(row["hour"]))
    out = [{label: k, "models": sorted(models.get(k, ())), **stats(v)}
           for k, v in sorted(groups.items())]
    return {"view": view, "rows": out, "totals": total(rows)}


def by_dimension(rows: list[dict], view: str) -> dict:
    """models or keys: one row per model (proxy key), by spend, then requests."""
    label = {"models": "model", "keys": "key"}[view]
    groups = grouped(rows, lambda row: row[label])
    out = [{label: k, **stats(v)} for k, v in groups.items()]
    out.sort(key=lambda r: (-r["cost_usd"], -r["requests"], r[label] or ""))
    return {"view": view, "rows": out, "totals": total(rows)}


def blocks(rows: list[dict], now: float, first_started: float | None = None,
           since: float | None = None) -> dict:
    """ccusage's 5-hour blocks: a block starts at the hour of the first request after the
    last block ended, and lasts 5 hours.  The block that is still running gets its burn
    rate (since its first request, given as `first_started` when known) and a projection
    to its end at that rate.  `rows` may start before `since` (so that the blocks start
    where they really do); only blocks that reach past `since` are shown, and the totals
    count the rows from `since` on."""
    hours = grouped(rows, lambda row: row["hour"])
    models: dict[float, set] = {}
    for row in rows:
        if row["model"] is not None and row["requests"]:
            models.setdefault(row["hour"], set()).add(row["model"])
    out: list[dict] = []
    current: dict | None = None
    for hour in sorted(hours):
        if current is None or hour >= current["start"] + BLOCK:
            current = {"start": hour, "sums": empty_sums(), "models": set(), "last": hour}
            out.append(current)
        add_sums(current["sums"], {**hours[hour], "end_reason": "complete"})
        current["sums"]["failed"] += hours[hour]["failed"]
        current["models"] |= models.get(hour, set())
        current["last"] = hour
    shown = [b for b in out if since is None or b["start"] + BLOCK > since]
    result = [_block_row(b, now, first_started) for b in shown]
    counted = rows if since is None else [r for r in rows if r["hour"] >= since]
    return {"view": "blocks", "rows": result, "totals": total(counted)}


def _block_row(block: dict, now: float, first_started: float | None) -> dict:
    start, end = block["start"], block["start"] + BLOCK
    row = {"block_start": iso(start), "block_end": iso(end), "active": start <= now < end,
           "models": sorted(block["models"]), **stats(block["sums"])}
    if row["active"]:
        began = first_started if first_started is not None and first_started >= start else start
        elapsed = max(now - began, 60.0)  # a minute at least: no rate from a blip
        tokens = sum(block["sums"][c] for c in TOKEN_FIELDS[:4])
        remaining = end - now
        row["burn_rate"] = {
            "cost_usd_per_hour": round(block["sums"]["cost_usd"] / elapsed * HOUR, 6),
            "tokens_per_minute": round(tokens / elapsed * 60.0, 1),
        }
        row["projection"] = {
            "cost_usd": round(block["sums"]["cost_usd"] * (1 + remaining / elapsed), 6),
            "tokens": int(tokens * (1 + remaining / elapsed)),
            "remaining_minutes": round(remaining / 60.0, 1),
        }
    return row


def sessions(found: list[dict]) -> dict:
    """One row per session (newest activity first), as the store's `sessions` found them."""
    out = []
    everything = empty_sums()
    for row in found:
        sums = {c: row[c] for c in SUM_COLUMNS} | {"failed": row.get("failed", 0)}
        out.append({"session": row["session"], "first_at": iso(row["first_at"]),
                    "last_at": iso(row["last_at"]), "models": row.get("models", []),
                    **stats(sums)})
        add_sums(everything, {**row, "end_reason": "complete"})
        everything["failed"] += sums["failed"]
    return {"view": "session", "rows": out, "totals": stats(everything)}


# ---------------------------------------------------------------------------------------------
# The dashboard's figures (GET /dashboard/data): rollup rows of a few queries in, one JSON
# document out.

DASHBOARD_PERIODS = {"24h": 1, "7d": 7, "30d": 30, "90d": 90}  # days
DASHBOARD_QUERIES = {
    "series": ("hour", "end_reason"),
    "models": ("model", "end_reason"),
    "deployments": ("deployment", "end_reason"),
    "keys": ("key", "end_reason"),
}


def dashboard(found: dict[str, list[dict]], since: float, until: float,
              recent: list[dict], choices: dict[str, list]) -> dict:
    """`found` holds each of DASHBOARD_QUERIES' rows; `choices` the models and keys seen in
    the period (whatever the filters), for the filters' menus."""
    hourly = until - since <= 7 * 86400  # else one point per day
    series = grouped(found["series"], lambda row: row["hour"] if hourly else day_of(row["hour"]))
    for point in _steps(since, until, hourly):  # quiet hours (days) are on the chart too
        series.setdefault(point, empty_sums())
    everything = found["deployments"]
    reasons: dict[str, int] = {}
    for row in everything:
        reasons[row["end_reason"] or "unknown"] = (reasons.get(row["end_reason"] or "unknown", 0)
                                                   + row["requests"])
    return {
        "since": iso(since), "until": iso(until), "step": "hour" if hourly else "day",
        "series": [_point(k, v, hourly) for k, v in sorted(series.items())],
        "totals": total(everything),
        "by_model": _ranked(found["models"], "model"),
        "by_deployment": _ranked(found["deployments"], "deployment"),
        "by_key": _ranked(found["keys"], "key"),
        "end_reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
        "recent": [_recent(row) for row in recent],
        "choices": choices,
    }


def _steps(since: float, until: float, hourly: bool) -> list:
    """Every hour (or UTC day) of [since, until), as the series keys them."""
    hours = [since + i * HOUR for i in range(int((until - since) // HOUR))]
    return hours if hourly else sorted({day_of(hour) for hour in hours})


def _point(key: Any, sums: dict, hourly: bool) -> dict:
    figures = stats(sums)
    return {"t": iso(key) if hourly else key + "T00:00:00Z",
            **{name: figures[name] for name in ("requests", "cost_usd", *TOKEN_FIELDS[:4],
                                                "failed_requests")}}


def _ranked(rows: list[dict], label: str) -> list[dict]:
    groups = grouped(rows, lambda row: row[label])
    out = [{label: k, **stats(v)} for k, v in groups.items()]
    out.sort(key=lambda r: (-r["cost_usd"], -r["requests"], r[label] or ""))
    return out[:50]


def _recent(row: dict) -> dict:
    return {**row, "started_at": iso(row["started_at"]), "ended_at": iso(row["ended_at"]),
            "model": row["upstream_model"] or row["model_requested"],
            "priced": bool(row["priced"]), "stream": bool(row["stream"])}
