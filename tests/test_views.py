"""The report's views and the dashboard's figures, against seeded databases (SQLite and
PostgreSQL): the rollups say what the raw rows say, each view adds up to known numbers,
and `llm-proxy usage VIEW` prints them as JSON, CSV, a plain table or a terminal table."""

from __future__ import annotations

import csv
import io
import json
import random
import subprocess
import sys
import uuid
from datetime import datetime, timezone

import pytest

from proxy import report, tables, views
from proxy.sessions import session_of
from proxy.store import open_store
from proxy.store.rollups import TTFT_BOUNDS_MS, deltas, quantile
from proxy.tracker import to_storage_row
from proxy.usage import RECORD_FIELDS, UsageRecord

from support.processes import ROOT

DAY1 = datetime(2026, 11, 2, tzinfo=timezone.utc).timestamp()
DAY2 = datetime(2026, 11, 3, tzinfo=timezone.utc).timestamp()
DEC = datetime(2026, 12, 1, tzinfo=timezone.utc).timestamp()


def row(at: float, **fields) -> dict:
    values = dict(request_id=uuid.uuid4().hex, started_at=at, ended_at=at + 2.0,
                  endpoint="anthropic", model_requested="claude-a", deployment="d1",
                  status=200, end_reason="complete", input_tokens=100, output_tokens=10,
                  cache_read_tokens=50, cache_write_tokens=0, reasoning_tokens=0,
                  cost_usd=0.5, priced=True, usage_complete=True, ttft_ms=400.0, stream=True)
    values.update(fields)
    return to_storage_row(UsageRecord(**values))


SEEDED = [
    row(DAY1 + 3600, key_name="alice", session_id="s1"),
    row(DAY1 + 3600 + 60, key_name="alice", session_id="s1", ttft_ms=1500.0),
    row(DAY1 + 7 * 3600, model_requested="gpt-b", deployment="d2", key_name="bob",
        end_reason="upstream_error", output_tokens=None, cost_usd=0.25, ttft_ms=None,
        session_id="s2"),
    row(DAY2 + 60, upstream_model="claude-a-2026", model_requested="claude-a",
        attempts=3, fallbacks=1, deployment="d2"),
    row(DAY2 + 120, end_reason="replay", paid_by="x", cost_usd=0.0, saved_cost_usd=0.5),
    row(DEC + 600, cost_usd=2.0, priced=True, continuations=1, key_name="alice"),
]


# Rows at the edges of what the sums treat apart: unpriced with tokens, no usage at all,
# TTFT exactly on bucket bounds and past the last one, a dedup join, no model, no start.
EDGES = [
    row(DAY1 + 600, cost_usd=None, priced=False, ttft_ms=100.0),
    row(DAY1 + 610, input_tokens=None, output_tokens=None, cache_read_tokens=None,
        cache_write_tokens=None, cost_usd=None, priced=False, ttft_ms=250.0,
        end_reason="client_gone"),
    row(DAY1 + 620, ttft_ms=120000.0, reasoning_tokens=7),
    row(DAY1 + 630, ttft_ms=500000.0, model_requested=None, deployment=None),
    row(DAY1 + 640, end_reason="joined", paid_by="y", saved_cost_usd=0.125, ttft_ms=50.0),
    row(DAY1 + 650, attempts=4, fallbacks=2, continuations=2, continuation_cost_usd=0.01,
        endpoint="openai_chat", client_key_id="ck_1"),
]


@pytest.fixture(params=["sqlite", "postgres"])
def db(request, tmp_path):
    """A seeded usage database of either kind."""
    if request.param == "sqlite":
        path = str(tmp_path / "usage.db")
    else:
        path = request.getfixturevalue("postgres").database()
    store = open_store(path)
    store.insert_rows(SEEDED)
    store.close()
    return path


def test_the_rollups_say_what_the_raw_rows_say_at_the_edges(tmp_path):
    """Python's sums of new rows (deltas) against SQL's sums of the same stored rows."""
    path = str(tmp_path / "edges.db")
    store = open_store(path)
    try:
        store.insert_rows(EDGES)
        dims = ("hour", "endpoint", "deployment", "model", "client_key", "key", "end_reason")
        kept = store.hourly(0, 2e9, dims)
        store._has_rollups = lambda: False
        raw = store.hourly(0, 2e9, dims)
    finally:
        store.close()
    assert _sorted(kept) == _sorted(raw)
    everything = views.total([{**r, "end_reason": r["end_reason"] or "complete"} for r in kept])
    assert everything["unpriced_requests"] == 1 and everything["dedup_requests"] == 1
    assert (everything["retries"], everything["fallbacks"]) == (1, 2)
    ttft = {c: sum(r[c] for r in kept) for c in ("ttft_le_100", "ttft_le_250", "ttft_le_120000",
                                                 "ttft_le_inf", "ttft_count")}
    # 100 and 250 fall in their own bucket (<=), 120000 in the last bounded one, and the
    # last row's 400 in ttft_le_500; the joined request's TTFT is not the deployment's
    # (another request paid for the call).
    assert ttft == {"ttft_le_100": 1, "ttft_le_250": 1, "ttft_le_120000": 1, "ttft_le_inf": 1,
                    "ttft_count": 5}


def test_the_rollups_say_what_the_raw_rows_say(db):
    """Every dimension the views group by: the rollups kept at insert time against the same
    sums computed from the raw rows (the store's fallback for a database not migrated)."""
    store = open_store(db)
    try:
        for dims in (("hour",), ("model", "end_reason"), ("deployment",), ("key",),
                     ("hour", "endpoint", "deployment", "model", "client_key", "key",
                      "end_reason")):
            kept = store.hourly(0, 2e9, dims)
            store._has_rollups = lambda: False
            raw = store.hourly(0, 2e9, dims)
            del store._has_rollups
            assert _sorted(kept) == _sorted(raw), dims
    finally:
        store.close()


def _sorted(rows: list[dict]) -> list:
    return sorted((json.dumps(r, sort_keys=True, default=str) for r in rows))


def test_deltas_add_rows_of_one_hour_and_group_together():
    found = deltas(SEEDED[:2])
    assert len(found) == 1  # same hour, same group
    sums = dict(zip(("hour", "endpoint", "deployment", "model", "client_key_id", "key_name",
                     "end_reason"), found[0][:7]))
    assert sums == {"hour": DAY1 + 3600, "endpoint": "anthropic", "deployment": "d1",
                    "model": "claude-a", "client_key_id": "", "key_name": "alice",
                    "end_reason": "complete"}


def test_ttft_quantiles_fall_in_the_right_bucket_and_interpolate_within_it():
    buckets = [0] * (len(TTFT_BOUNDS_MS) + 1)
    buckets[2] = 10  # ten requests between 250 and 500 ms
    assert quantile(buckets, 0.5) == pytest.approx(375.0)
    buckets[4] = 10  # ten more between 1000 and 2000 ms
    assert 1000 <= quantile(buckets, 0.95) <= 2000
    assert quantile([0] * len(buckets), 0.5) is None
    assert quantile([0] * len(TTFT_BOUNDS_MS) + [3], 0.5) == TTFT_BOUNDS_MS[-1]


def test_the_daily_view_adds_up_each_utc_day(db):
    daily = report.view(db, "daily", now=DEC + 3600)
    days = {r["day"]: r for r in daily["rows"]}
    assert list(days) == ["2026-11-02", "2026-11-03", "2026-12-01"]
    first = days["2026-11-02"]
    assert (first["requests"], first["input_tokens"], first["output_tokens"],
            first["cache_read_tokens"]) == (3, 300, 20, 150)
    assert first["cost_usd"] == pytest.approx(1.25)
    assert first["failed_requests"] == 1 and first["models"] == ["claude-a", "gpt-b"]
    assert first["cache_hit_ratio"] == pytest.approx(150 / 450)
    assert 250 <= first["ttft_p50_ms"] <= 2000  # two requests: 400 and 1500 ms
    second = days["2026-11-03"]
    # The replay paid nothing: its tokens are not counted, its request is (a dedup hit).
    assert (second["requests"], second["input_tokens"], second["dedup_requests"]) == (2, 100, 1)
    assert second["retries"] == 1 and second["fallbacks"] == 1
    assert second["models"] == ["claude-a", "claude-a-2026"]
    assert daily["totals"]["requests"] == 6
    assert daily["totals"]["cost_usd"] == pytest.approx(3.75)


def test_the_monthly_models_and_keys_views(db):
    monthly = {r["month"]: r for r in report.view(db, "monthly", now=DEC + 3600)["rows"]}
    assert monthly["2026-11"]["requests"] == 5 and monthly["2026-12"]["cost_usd"] == 2.0
    models = report.view(db, "models", now=DEC + 3600)["rows"]
    assert [m["model"] for m in models] == ["claude-a", "claude-a-2026", "gpt-b"]  # by spend
    assert models[0]["requests"] == 4 and models[0]["cost_usd"] == pytest.approx(3.0)
    keys = {k["key"]: k for k in report.view(db, "keys", now=DEC + 3600)["rows"]}
    assert keys["alice"]["requests"] == 3 and keys["bob"]["failed_requests"] == 1
    assert keys[None]["requests"] == 2
    only = report.view(db, "daily", filters={"key": "alice"}, now=DEC + 3600)
    assert only["totals"]["requests"] == 3
    november = report.view(db, "models", since="2026-11-01", until="2026-11-30", now=DEC)
    assert november["totals"]["requests"] == 5


def test_the_session_view_groups_by_session_newest_first(db):
    found = report.view(db, "session", since="2026-11-01", now=DEC + 3600)
    assert [s["session"] for s in found["rows"]] == ["s2", "s1"]
    s1 = found["rows"][1]
    assert s1["requests"] == 2 and s1["models"] == ["claude-a"]
    assert s1["first_at"].startswith("2026-11-02T01:00") and s1["failed_requests"] == 0
    assert found["rows"][0]["failed_requests"] == 1
    assert found["totals"]["requests"] == 3


def test_the_blocks_view_starts_a_block_at_the_first_hour_after_the_last_one_ended(db):
    now = DEC + 600 + 1800  # half an hour after the last request
    found = report.view(db, "blocks", now=now)
    starts = [b["block_start"] for b in found["rows"]]
    # 01:00 and 01:01 open a block at 01:00; 07:00 is past its end (06:00): a new one.
    assert starts == ["2026-11-02T01:00:00Z", "2026-11-02T07:00:00Z", "2026-11-03T00:00:00Z",
                      "2026-12-01T00:00:00Z"]
    assert [b["requests"] for b in found["rows"]] == [2, 1, 2, 1]
    last = found["rows"][-1]
    assert last["active"] and not any(b["active"] for b in found["rows"][:-1])
    # $2 in the 30 minutes since its first request (00:10): $4 an hour, and at that rate
    # the block ends ($2 + 4 h 20 min more) at about $19.33.
    assert last["burn_rate"]["cost_usd_per_hour"] == pytest.approx(4.0)
    assert last["projection"]["cost_usd"] == pytest.approx(2.0 + 4.0 * (4 * 3600 + 1200) / 3600)
    assert last["projection"]["remaining_minutes"] == pytest.approx(260.0)


def test_blocks_start_where_the_activity_does_not_where_the_period_does(tmp_path):
    """Requests at 10, 14, 16 and 19 h: blocks at 10 and 16, whether the report starts at
    the beginning or at 11 h (a block that reaches into the period is shown whole)."""
    path = str(tmp_path / "usage.db")
    store = open_store(path)
    store.insert_rows([row(DAY1 + h * 3600 + 60) for h in (10, 14, 16, 19)])
    store.close()
    now = DAY1 + 20 * 3600
    for since in (None, DAY1 + 11 * 3600):
        found = report.view(path, "blocks", since=since, now=now)
        assert [b["block_start"][11:16] for b in found["rows"]] == ["10:00", "16:00"], since
        assert found["rows"][-1]["active"]
    late = report.view(path, "blocks", since=DAY1 + 11 * 3600, now=now)
    assert late["totals"]["requests"] == 3  # the period's own rows


def test_options_that_do_not_apply_to_a_view_are_an_error(tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    report.add_usage_arguments(parser)
    path = str(tmp_path / "usage.db")
    assert report.run_usage(parser.parse_args(["session", "--model", "m"]), path) == 2
    assert "--model do not apply to the session view" in capsys.readouterr().err
    assert report.run_usage(parser.parse_args(["models", "--timezone", "UTC"]), path) == 2


def test_names_a_client_chose_are_text_in_a_terminal_and_inert_in_a_spreadsheet(tmp_path):
    path = str(tmp_path / "usage.db")
    hostile = ["[/evil]", "[link=http://phish.example]safe[/link]", "=HYPERLINK(\"x\")"]
    store = open_store(path)
    store.insert_rows([row(DAY1 + 60 * i, model_requested=name) for i, name in enumerate(hostile)])
    store.close()
    found = report.view(path, "models", now=DAY2)
    drawn = tables.render_view(found, rich_terminal=True, width=200)  # no MarkupError
    assert "[/evil]" in drawn and "phish.example" in drawn and "\x1b]8;" not in drawn
    lines = list(csv.reader(io.StringIO(tables.render_view_csv(found))))
    assert "'=HYPERLINK(\"x\")" in [line[0] for line in lines]


def test_the_dashboard_figures_of_a_filtered_period(db):
    data = report.dashboard_data(db, "7d", {"model": "claude-a"}, now=DAY2 + 3600)
    assert data["totals"]["requests"] == 3  # the upstream's own model name counts apart
    assert data["choices"]["models"] == ["claude-a", "claude-a-2026", "gpt-b"]
    assert data["choices"]["keys"] == ["alice", "bob"]
    assert [r["deployment"] for r in data["by_deployment"]] == ["d1"]
    assert data["by_deployment"][0]["ttft_p50_ms"] is not None
    assert data["end_reasons"] == {"complete": 2, "replay": 1}
    assert [r["end_reason"] for r in data["recent"]] == ["replay", "complete", "complete"]
    assert data["step"] == "hour" and sum(p["requests"] for p in data["series"]) == 3
    assert len(data["series"]) == 7 * 24  # every hour, the quiet ones too
    assert sum(p["failed_requests"] for p in data["series"]) == 0
    failed = report.dashboard_data(db, "30d", now=DAY2 + 3600)
    assert sum(p["failed_requests"] for p in failed["series"]) == 1
    assert len(failed["series"]) in (30, 31) and failed["step"] == "day"
    with pytest.raises(ValueError):
        report.dashboard_data(db, "1y")


def test_views_of_a_database_that_does_not_exist_are_empty(tmp_path):
    path = str(tmp_path / "none.db")
    for name in views.VIEWS:
        found = report.view(path, name)
        assert found["rows"] == [] and found["totals"]["requests"] == 0
    assert not (tmp_path / "none.db").exists()


# --- the command line ------------------------------------------------------------------------


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "proxy", "usage", *args], capture_output=True,
                          text=True, timeout=30, cwd=str(ROOT))


def test_each_view_prints_json_csv_and_a_plain_table_when_piped(tmp_path):
    path = str(tmp_path / "usage.db")
    store = open_store(path)
    store.insert_rows(SEEDED)
    store.close()
    for name in views.VIEWS:
        as_json = cli(name, "--db", path, "--json", "--since", "2026-11-01")
        assert as_json.returncode == 0, as_json.stderr
        found = json.loads(as_json.stdout)
        assert found["view"] == name and found["totals"]["requests"] >= 3
        as_csv = list(csv.DictReader(io.StringIO(cli(name, "--db", path, "--csv",
                                                     "--since", "2026-11-01").stdout)))
        assert len(as_csv) == len(found["rows"]) and "ttft_p50_ms" in as_csv[0]
        table = cli(name, "--db", path, "--since", "2026-11-01").stdout
        assert "\x1b[" not in table and "┃" not in table  # piped: plain text
        assert "TTFT p50" in table and "cache hit" in table
    assert cli("--db", path).stdout.startswith("Usage per day")  # daily is the default
    assert cli("weekly", "--db", path).returncode == 2


def test_a_terminal_gets_a_drawn_table_narrowed_to_its_width(tmp_path):
    path = str(tmp_path / "usage.db")
    store = open_store(path)
    store.insert_rows(SEEDED)
    store.close()
    found = report.view(path, "daily", now=DEC + 3600)
    wide = tables.render_view(found, rich_terminal=True, width=200)
    assert "┃" in wide and "claude-a, gpt-b" in wide
    narrow = tables.render_view(found, rich_terminal=True, width=80)
    assert all(len(line) <= 80 for line in _plain(narrow).splitlines())


def _plain(text: str) -> str:
    import re
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


# --- sessions --------------------------------------------------------------------------------


@pytest.mark.parametrize("headers, body, expected", [
    ({"X-LLM-Proxy-Session": "job-42"}, {}, "job-42"),
    ({"x-claude-code-session-id": "54c1eb09-bc4c-4d2f-98eb-6d2ab2d5e2fe"}, {},
     "54c1eb09-bc4c-4d2f-98eb-6d2ab2d5e2fe"),
    ({}, {"metadata": {"user_id": json.dumps({"device_id": "d", "session_id": "abc-1"})}},
     "abc-1"),
    ({}, {"metadata": {"user_id": "user_ff00_account__session_57a121ec-f78c-48c3"}},
     "57a121ec-f78c-48c3"),
    ({"X-LLM-Proxy-Session": "mine"}, {"metadata": {"user_id": '{"session_id":"cc"}'}}, "mine"),
    ({"X-LLM-Proxy-Session": "has space"}, {}, None),
    ({"X-LLM-Proxy-Session": "x" * 129}, {}, None),
    ({"X-LLM-Proxy-Session": "bad\x1bescape"}, {}, None),
    ({}, {"metadata": {"user_id": "plain-user"}}, None),
    ({}, {"metadata": "not a dict"}, None),
    ({}, {"metadata": {"user_id": "{not json"}}, None),
])
def test_a_requests_session_comes_from_its_header_or_claude_codes_metadata(headers, body,
                                                                             expected):
    from werkzeug.datastructures import Headers
    assert session_of(Headers(headers), body) == expected


def test_rows_keep_their_session_id():
    assert "session_id" in RECORD_FIELDS


def test_the_last_requests_walk_the_start_time_index_instead_of_sorting_the_period(tmp_path):
    """The dashboard's list of recent requests stops after its rows, whatever the period
    holds: SQLite reads them off the index in order, with no sort of the whole period."""
    from proxy.store.sqlite import SqliteStore

    path = str(tmp_path / "usage.db")
    store = open_store(path)
    store.insert_rows(SEEDED)
    captured = []
    query = SqliteStore._query

    def explained(self, sql, params):
        if sql.startswith("SELECT request_id"):
            captured.extend(row[-1] for row in query(self, "EXPLAIN QUERY PLAN " + sql, params))
        return query(self, sql, params)

    try:
        SqliteStore._query = explained
        found = store.recent(3, {"model": "claude-a"}, since=0, until=2e9)
    finally:
        SqliteStore._query = query
        store.close()
    assert [r["started_at"] for r in found] == sorted((r["started_at"] for r in found), reverse=True)
    assert captured and not any("TEMP B-TREE" in step for step in captured), captured
    assert any("started_at" in step for step in captured), captured


@pytest.mark.timeout(120)
def test_views_stay_fast_on_a_big_database(tmp_path):
    """200,000 rows over 90 days: the dashboard's queries read the rollups, not the rows."""
    import time

    path = str(tmp_path / "big.db")
    store = open_store(path)
    rng = random.Random(7)
    start = DEC - 90 * 86400 + 3600  # the period's first whole hour
    for _ in range(20):
        store.insert_rows([row(start + rng.random() * (90 * 86400 - 3600),
                               model_requested=rng.choice(["claude-a", "gpt-b", "claude-c"]),
                               deployment=rng.choice(["d1", "d2", "d3"]),
                               key_name=rng.choice(["alice", "bob", None]),
                               ttft_ms=rng.random() * 4000) for _ in range(10_000)])
    store.close()
    began = time.perf_counter()
    data = report.dashboard_data(path, "90d", now=DEC - 1)
    elapsed = time.perf_counter() - began
    assert data["totals"]["requests"] == 200_000
    assert elapsed < 5.0, f"the dashboard's data took {elapsed:.2f} s"


# --- migrations of databases that hold rows already ------------------------------------------


def test_a_sqlite_database_of_v5_gets_rollups_of_the_rows_it_holds(tmp_path):
    """The v6 migration fills the rollups from the rows stored before it, so the views see
    the past; rows stored after it add to them."""
    from proxy.store.sqlite import MIGRATIONS, connect

    path = str(tmp_path / "usage.db")
    conn = connect(path)
    for statements in MIGRATIONS[:5]:
        for statement in statements:
            conn.execute(statement)
    conn.execute("PRAGMA user_version = 5")
    old = [{k: v for k, v in r.items() if k != "session_id"} for r in SEEDED[:4]]
    conn.executemany(f"INSERT INTO usage_records ({', '.join(old[0])}) VALUES "
                     f"({', '.join('?' * len(old[0]))})", [tuple(r.values()) for r in old])
    conn.close()
    store = open_store(path)
    try:
        assert report.view(path, "daily", now=DEC)["totals"]["requests"] == 4  # raw fallback
        store.insert_rows(SEEDED[4:])  # migrates, then adds
        kept = store.hourly(0, 2e9, ("deployment", "end_reason"))
        store._has_rollups = lambda: False
        raw = store.hourly(0, 2e9, ("deployment", "end_reason"))
    finally:
        store.close()
    assert _sorted(kept) == _sorted(raw)
    assert sum(r["requests"] for r in kept) == 6


def v1_database(url: str, rows: list[dict]) -> None:
    """A PostgreSQL database as schema v1 left it: its raw rows (no session) and its
    rollups, in v1's shape (no endpoint, deployment or TTFT)."""
    import psycopg

    from proxy.store.postgres import MIGRATIONS, PG_HOUR, TABLE
    from proxy.store.rollups import raw_as_rollup

    v1_columns = ("hour", "model", "client_key_id", "key_name", "end_reason", "requests",
                  "input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens",
                  "reasoning_tokens", "cost_usd", "unpriced", "continued",
                  "continuation_cost_usd", "dedup_requests", "dedup_tokens", "dedup_saved_usd")
    rows = [{k: v for k, v in r.items() if k != "session_id"} for r in rows]
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in MIGRATIONS[0]:
            conn.execute(statement)
        conn.execute("CREATE TABLE llm_proxy_schema (version INTEGER)")
        conn.execute("INSERT INTO llm_proxy_schema VALUES (1)")
        with conn.cursor() as cursor:
            cursor.executemany(f"INSERT INTO {TABLE} ({', '.join(rows[0])}) VALUES "
                               f"({', '.join(['%s'] * len(rows[0]))})",
                               [tuple(r.values()) for r in rows])
        conn.execute(f"INSERT INTO usage_rollups ({', '.join(v1_columns)}) SELECT hour, model, "
                     f"client_key_id, key_name, end_reason, {', '.join(v1_columns[5:])} "
                     f"FROM ({raw_as_rollup(PG_HOUR)}) AS r")


def test_a_postgres_database_of_v1_gets_the_new_rollups_for_the_hours_it_still_has(postgres):
    """v2 adds endpoint, deployment and TTFT to the rollups: hours whose raw rows are all
    there are rebuilt from them; the first hour (retention may have cut into it) keeps what
    it had, so no total changes."""
    import psycopg

    from proxy.store.postgres import TABLE

    url = postgres.database()
    v1_database(url, SEEDED)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"DELETE FROM {TABLE} WHERE started_at < %s", (DAY1 + 3600 + 30,))
    store = open_store(url)
    try:
        store.open()  # migrates to v2
        by_deployment = {r["deployment"]: r for r in store.hourly(0, 2e9, ("deployment",))}
        totals = store.hourly(0, 2e9, ())
    finally:
        store.close()
    assert totals[0]["requests"] == 6 and totals[0]["cost_usd"] == pytest.approx(3.75)
    # The first hour's raw rows were cut: its rollup stays as v1 made it (no deployment).
    assert by_deployment[None]["requests"] == 2
    assert by_deployment["d2"]["requests"] == 2 and by_deployment["d1"]["requests"] == 2
    assert by_deployment["d1"]["ttft_count"] == 1  # the rebuilt hours have their TTFT


def test_the_usage_endpoint_gives_a_view_of_the_period_asked_for(tmp_path):
    from werkzeug.test import Client

    from proxy.app import App
    from proxy.config import load_config

    path = str(tmp_path / "usage.db")
    store = open_store(path)
    store.insert_rows(SEEDED[:5])
    store.close()
    app = App(load_config(env={"LLM_PROXY_DB": path, "LLM_PROXY_TRACKER": "false"}))
    try:
        client = Client(app)
        daily = client.get("/usage", query_string={"view": "daily", "since": "2026-11-01",
                                                   "until": "2026-11-30"}).json
        assert daily["view"] == "daily" and daily["totals"]["requests"] == 5
        keys = client.get("/usage", query_string={"view": "keys", "since": "2026-11-01",
                                                  "key": "alice"}).json
        assert [r["key"] for r in keys["rows"]] == ["alice"]
        bad = client.get("/usage", query_string={"view": "weekly", "since": "2026-11-01"})
        assert bad.status_code == 400 and "weekly" in bad.json["error"]["message"]
        zoned = client.get("/usage", query_string={"view": "daily", "since": "2026-11-01",
                                                   "timezone": "Asia/Tokyo"}).json
        # 07:00 UTC on the 2nd is 16:00 in Tokyo; 01:00 UTC is 10:00: all on the 2nd there
        assert zoned["rows"][0]["day"] == "2026-11-02" and zoned["timezone"] == "Asia/Tokyo"
    finally:
        app.close()


def test_days_in_a_time_zone_and_bare_dates_at_its_midnight(tmp_path):
    path = str(tmp_path / "usage.db")
    store = open_store(path)
    store.insert_rows(SEEDED)
    store.close()
    # 2026-12-01 00:10 UTC is still November 30 in New York.
    found = report.view(path, "daily", zone="America/New_York", now=DEC + 3600)
    assert [r["day"] for r in found["rows"]][-1] == "2026-11-30"
    december = report.view(path, "daily", since="2026-12-01", zone="America/New_York",
                           now=DEC + 3600)
    assert december["rows"] == []  # New York's December had not begun
    with pytest.raises(ValueError):
        report.view(path, "daily", zone="Nowhere/Land")


# --- found by mutation testing: bounds, filters and edges the tests above do not reach ---------


def seeded_sqlite(tmp_path, rows=SEEDED) -> str:
    path = str(tmp_path / "usage.db")
    store = open_store(path)
    store.insert_rows(rows)
    store.close()
    return path


def test_a_ttft_on_a_buckets_bound_counts_in_that_bucket_in_rollups_and_raw_rows_alike(db):
    """Bucket bounds are inclusive upper bounds (Prometheus' `le`): 500 ms is in the
    250..500 bucket, 1000 ms in 500..1000.  The rollups kept at insert time (Python) and the
    raw rows' SQL (the backfill, the fallback) must put a value on a bound in the same one."""
    hour = DEC + 7200
    store = open_store(db)
    try:
        store.insert_rows([row(hour + 60, ttft_ms=500.0), row(hour + 120, ttft_ms=1000.0)])
        kept = store.hourly(hour, hour + 3600)
        store._has_rollups = lambda: False
        raw = store.hourly(hour, hour + 3600)
        del store._has_rollups
    finally:
        store.close()
    for found in (kept, raw):
        [sums] = found
        assert (sums["ttft_le_250"], sums["ttft_le_500"], sums["ttft_le_1000"],
                sums["ttft_le_2000"]) == (0, 1, 1, 0)


def test_a_quantile_stays_in_the_bucket_it_falls_in_and_the_first_bucket_starts_at_zero():
    """The median of four requests under 100 ms is half way up that bucket (from 0 ms, not
    from some other floor); when the rank is exactly a bucket's count, the quantile is that
    bucket's bound, not the start of the next bucket that has requests."""
    buckets = [0] * (len(TTFT_BOUNDS_MS) + 1)
    buckets[0] = 4
    assert quantile(buckets, 0.5) == pytest.approx(50.0)
    buckets[5] = 4  # four more between 2 and 3 s: the 4th of 8 is still the first bucket's
    assert quantile(buckets, 0.5) == pytest.approx(100.0)


def test_p95_is_the_95th_percentile_of_the_ttft_histogram(tmp_path):
    """19 requests with their first token at 50 ms and one at 200 ms: the 95th percentile
    is the 19th request, the top of the first bucket (100 ms); the median is within it."""
    path = seeded_sqlite(tmp_path, [row(DEC + 60 + i, ttft_ms=50.0) for i in range(19)]
                         + [row(DEC + 120, ttft_ms=200.0)])
    totals = report.view(path, "daily", now=DEC + 3600)["totals"]
    assert totals["ttft_p95_ms"] == pytest.approx(100.0)
    assert totals["ttft_p50_ms"] == pytest.approx(round(100 * 10 / 19, 1))


def test_a_request_without_tokens_is_not_unpriced(tmp_path):
    """unpriced_requests counts requests that used tokens the proxy has no price for; a
    failed request that used none has nothing to price (rollups and raw rows agree)."""
    none = dict.fromkeys(("input_tokens", "output_tokens", "cache_read_tokens",
                          "cache_write_tokens", "reasoning_tokens"))
    path = seeded_sqlite(tmp_path, [
        row(DEC + 60, end_reason="upstream_error", priced=False, cost_usd=None, ttft_ms=None,
            **none),
        row(DEC + 120, model_requested="mystery-model", priced=False, cost_usd=None)])
    assert report.view(path, "daily", now=DEC + 3600)["totals"]["unpriced_requests"] == 1
    store = open_store(path)
    try:
        store._has_rollups = lambda: False
        assert store.hourly(0, 2e9, ())[0]["unpriced"] == 1
    finally:
        store.close()


def test_a_filter_of_none_keeps_the_rows_without_that_dimension(tmp_path):
    """`filters` with None select the rows that have no value there (as the keys view's
    row of None shows them): here the two requests made without a proxy key."""
    store = open_store(seeded_sqlite(tmp_path))
    try:
        keyless = store.hourly(0, 2e9, ("model",), {"key": None})
        recent = store.recent(10, {"key": None})
    finally:
        store.close()
    assert sum(r["requests"] for r in keyless) == 2
    assert {r["model"] for r in keyless} == {"claude-a", "claude-a-2026"}
    assert len(recent) == 2 and {r["key_name"] for r in recent} == {None}


def test_a_period_without_requests_has_no_rows_even_without_dimensions(tmp_path):
    """Only groups that had requests are rows: a sum over nothing (SQL's one row of NULLs
    when nothing is grouped) is no row, not a row of zeros."""
    store = open_store(seeded_sqlite(tmp_path))
    try:
        assert store.hourly(DEC + 86400, DEC + 2 * 86400, ()) == []
        assert store.hourly(DEC + 86400, DEC + 2 * 86400, ("model",)) == []
    finally:
        store.close()


def test_the_session_view_keeps_top_sessions_and_no_model_for_rows_without_one(tmp_path):
    """`top` bounds the sessions (the newest first); a request of a session that named no
    model (refused before one was known) adds no None to the session's models; and the
    totals count the failures of every session."""
    path = seeded_sqlite(tmp_path, SEEDED + [
        row(DAY1 + 3600 + 120, session_id="s1", model_requested=None, status=400,
            end_reason="rejected", input_tokens=None, output_tokens=None,
            cache_read_tokens=None, cost_usd=None, priced=False, ttft_ms=None)])
    found = report.view(path, "session", since="2026-11-01", now=DEC + 3600)
    assert [s["session"] for s in found["rows"]] == ["s2", "s1"]
    assert found["rows"][1]["models"] == ["claude-a"]
    assert found["totals"]["failed_requests"] == 2  # s2's upstream error, s1's rejected one
    top = report.view(path, "session", since="2026-11-01", top=1, now=DEC + 3600)
    assert [s["session"] for s in top["rows"]] == ["s2"]


def test_the_session_view_reads_the_last_30_days_unless_told(tmp_path):
    """Sessions are read from raw rows: without --since, only the last SESSION_DAYS."""
    path = seeded_sqlite(tmp_path)
    later = DEC + 40 * 86400
    found = report.view(path, "session", now=later)
    assert found["rows"] == []
    assert found["since"] == report._iso(report.hour_floor(later) + 3600
                                         - report.SESSION_DAYS * 86400)
    assert len(report.view(path, "session", since="2026-11-01", now=later)["rows"]) == 2


def test_a_client_key_sees_only_its_own_rows_in_every_view(tmp_path):
    """A client key (keys mode, /usage?view=) reads its own rows: the rollups' views, the
    session view and the block's first request alike."""
    mine = [row(DEC + 600, client_key_id="k-mine", session_id="mine", cost_usd=1.0),
            row(DEC + 1200, client_key_id="k-mine", session_id="mine", cost_usd=1.0)]
    theirs = [row(DEC + 60, client_key_id="k-theirs", session_id="theirs", cost_usd=5.0)]
    path = seeded_sqlite(tmp_path, mine + theirs)
    now = DEC + 2400
    for name in ("daily", "models", "keys", "blocks"):
        found = report.view(path, name, now=now, client_key="k-mine")
        assert found["totals"]["requests"] == 2, name
    sessions = report.view(path, "session", now=now, client_key="k-mine")
    assert [s["session"] for s in sessions["rows"]] == ["mine"]
    # The burn rate runs from this key's first request (00:10), not the other key's (00:01).
    block = report.view(path, "blocks", now=now, client_key="k-mine")["rows"][-1]
    assert block["burn_rate"]["cost_usd_per_hour"] == pytest.approx(2.0 / 1800 * 3600)


def test_a_blocks_burn_rate_runs_from_its_first_request_and_counts_every_token(tmp_path):
    """Two requests in the active block, at 00:10 and 00:30, now 00:40: $2 in 30 minutes
    is $4 an hour (from the first request, not the last); the tokens are all four billed
    kinds (input, output, cache read, cache write)."""
    path = seeded_sqlite(tmp_path, [row(DEC + 600, cost_usd=1.0, cache_write_tokens=40),
                                    row(DEC + 1800, cost_usd=1.0, cache_write_tokens=40)])
    now = DEC + 2400
    block = report.view(path, "blocks", now=now)["rows"][-1]
    assert block["active"]
    assert block["burn_rate"]["cost_usd_per_hour"] == pytest.approx(4.0)
    tokens = 2 * (100 + 10 + 50 + 40)
    assert block["burn_rate"]["tokens_per_minute"] == pytest.approx(round(tokens / 30, 1))
    remaining = DEC + 5 * 3600 - now
    assert block["projection"]["tokens"] == int(tokens * (1 + remaining / 1800))


def test_a_burn_rate_waits_a_minute_before_it_extrapolates(tmp_path):
    """Ten seconds after a block's first request, its rate is taken over a minute: a blip
    is not extrapolated to five hours."""
    path = seeded_sqlite(tmp_path, [row(DEC + 600, cost_usd=1.0)])
    block = report.view(path, "blocks", now=DEC + 610)["rows"][-1]
    assert block["burn_rate"]["cost_usd_per_hour"] == pytest.approx(60.0)


def test_a_block_ends_five_hours_after_it_starts_and_is_no_longer_active_then(tmp_path):
    """A request in the hour that starts when the first block ends opens a new block (a
    block is 5 hours, not 6); at its end a block is over: no burn rate, no projection."""
    path = seeded_sqlite(tmp_path, [row(DEC + 600), row(DEC + 5 * 3600 + 60)])
    found = report.view(path, "blocks", now=DEC + 5 * 3600 + 120)
    assert [b["block_start"] for b in found["rows"]] == ["2026-12-01T00:00:00Z",
                                                         "2026-12-01T05:00:00Z"]
    at_end = report.view(path, "blocks", until="2026-12-01T01:00:00Z", now=DEC + 5 * 3600)
    assert not at_end["rows"][0]["active"] and "burn_rate" not in at_end["rows"][0]
    assert "No active block." in tables.render_view(at_end)


def test_the_dashboards_totals_end_reasons_and_recent_requests(tmp_path):
    """Unfiltered: the totals count the failed request, the end reasons come most frequent
    first (the page lists them in that order), and a recent request names the model that
    answered (the upstream's own name) over the one asked for."""
    data = report.dashboard_data(seeded_sqlite(tmp_path), "7d", now=DAY2 + 3600)
    assert data["totals"]["requests"] == 5 and data["totals"]["failed_requests"] == 1
    counts = list(data["end_reasons"].values())
    assert list(data["end_reasons"])[0] == "complete" and counts == sorted(counts, reverse=True)
    fallback = next(r for r in data["recent"] if r["fallbacks"] == 1)
    assert fallback["model"] == "claude-a-2026"


def test_until_is_widened_to_the_whole_hour_it_falls_in(tmp_path):
    """Views count whole hours: an `until` of 00:05 counts the hour from 00:00 to 01:00
    (and so the request at 00:10)."""
    path = seeded_sqlite(tmp_path)
    found = report.view(path, "daily", until="2026-12-01T00:05:00Z", now=DEC + 86400)
    assert found["totals"]["requests"] == 6 and found["until"] == "2026-12-01T01:00:00Z"


def test_bare_dates_are_whole_days_in_the_time_zone_and_zoned_times_keep_their_zone(tmp_path):
    """With a time zone, a bare `until` includes that whole day there (New York's November
    30 ends at 05:00 UTC on December 1, after the request at 00:10 UTC); a time that names
    its own zone is read in that zone, not moved to the report's."""
    path = seeded_sqlite(tmp_path)
    nov = report.view(path, "daily", until="2026-11-30", zone="America/New_York", now=DEC + 86400)
    assert nov["totals"]["requests"] == 6 and nov["rows"][-1]["day"] == "2026-11-30"
    dec = report.view(path, "daily", since="2026-12-01T00:00:00+00:00", zone="America/New_York",
                      now=DEC + 86400)
    assert dec["totals"]["requests"] == 1


def test_the_models_and_keys_views_keep_the_top_rows_and_count_every_group(tmp_path):
    """`top` cuts the rows (the biggest spenders first); `groups` says how many there were."""
    found = report.view(seeded_sqlite(tmp_path), "models", top=1, now=DEC + 3600)
    assert [r["model"] for r in found["rows"]] == ["claude-a"] and found["groups"] == 3
    assert found["totals"]["requests"] == 6  # the totals are of every group


@pytest.mark.parametrize("headers, body, expected", [
    ({"X-LLM-Proxy-Session": "mine", "X-Claude-Code-Session-Id": "cc-1"}, {}, "mine"),
    ({"X-LLM-Proxy-Session": "  job-7 "}, {}, "job-7"),
    ({}, {"metadata": {"user_id": json.dumps({"session_id": "has space"})}}, None),
    ({}, {"metadata": {"user_id": json.dumps({"session_id": 42})}}, None),
    ({}, {"metadata": {"user_id": "user_" + "a" * 5000 + "_session_abc"}}, None),
])
def test_a_session_id_is_the_proxys_header_first_and_always_a_short_printable_label(
        headers, body, expected):
    """The proxy's own header wins over Claude Code's; surrounding spaces go; an id from
    the body's metadata is checked like a header's (no spaces, a text); a user_id beyond
    4 KB is not searched at all."""
    from werkzeug.datastructures import Headers
    assert session_of(Headers(headers), body) == expected


def test_a_postgres_v1_migration_rebuilds_the_first_whole_hour_in_place_of_its_old_rollup(
        postgres):
    """The first whole hour's v1 rollup (no deployment) must go before the hour is rebuilt
    from its raw rows, or its requests count twice; the hour before it (whose raw rows
    retention may have cut) keeps its v1 rollup."""
    url = postgres.database()
    v1_database(url, [row(DAY1 + 3600 + 60), row(DAY1 + 7200 + 60), row(DAY1 + 7200 + 120)])
    store = open_store(url)
    try:
        store.open()  # migrates to v2
        found = store.hourly(0, 2e9, ("hour", "deployment"))
    finally:
        store.close()
    # The hour before keeps its v1 rollup (no deployment); the first whole hour is rebuilt.
    assert sorted((float(r["hour"]), r["deployment"] or "", r["requests"]) for r in found) == [
        (DAY1 + 3600, "", 1), (DAY1 + 7200, "d1", 2)]


def test_a_filtered_blocks_burn_rate_runs_from_that_models_first_request(tmp_path):
    """`--model claude-a`: the active block's rate runs from claude-a's first request
    (00:30), not from another model's (00:01): $1 over 10 minutes is $6 an hour."""
    path = str(tmp_path / "usage.db")
    store = open_store(path)
    store.insert_rows([row(DEC + 60, model_requested="gpt-b", cost_usd=9.0),
                       row(DEC + 1800, model_requested="claude-a", cost_usd=1.0)])
    store.close()
    block = report.view(path, "blocks", filters={"model": "claude-a"}, now=DEC + 2400)["rows"][-1]
    assert block["requests"] == 1
    assert block["burn_rate"]["cost_usd_per_hour"] == pytest.approx(6.0)
