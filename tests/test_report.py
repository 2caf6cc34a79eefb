"""Usage reports: the summary's figures, time windows, and the table, CSV and JSON outputs."""

import argparse
import csv
import io
import json
import sqlite3
from datetime import date, datetime, timezone

import pytest

from proxy.report import (
    add_usage_arguments,
    parse_when,
    render_csv,
    render_table,
    run_usage,
    summarize,
)
from proxy.store import open_store
from proxy.tracker import Tracker
from proxy.usage import UsageRecord

DAY1 = datetime(2026, 11, 20, 12, 0, tzinfo=timezone.utc).timestamp()
DAY2 = datetime(2026, 11, 21, 9, 30, tzinfo=timezone.utc).timestamp()

RECORDS = [
    UsageRecord(request_id="r1", started_at=DAY1, upstream_model="claude-sonnet-4-5",
                client_key_id="k1", input_tokens=100, output_tokens=50, cache_read_tokens=300,
                cache_write_tokens=100, reasoning_tokens=10, cost_usd=0.01, priced=True,
                usage_complete=True),
    UsageRecord(request_id="r2", started_at=DAY1 + 60, upstream_model="gpt-4o",
                client_key_id="k2", end_reason="client_gone", input_tokens=20,
                cost_usd=0.00005, priced=True),
    UsageRecord(request_id="r3", started_at=DAY2, upstream_model="claude-sonnet-4-5",
                client_key_id="k1", input_tokens=200, output_tokens=100, cost_usd=0.02,
                priced=True, usage_complete=True, continuations=1, continuation_cost_usd=0.004),
    UsageRecord(request_id="r4", started_at=DAY2 + 1, upstream_model="mystery-model",
                input_tokens=10, output_tokens=5, usage_complete=True),
    UsageRecord(request_id="r5", started_at=DAY2 + 2, model_requested="fast", status=429,
                end_reason="rejected"),
    UsageRecord(request_id="r6", started_at=DAY2 + 3, upstream_model="gpt-4o",
                client_key_id="k2", status=502, end_reason="upstream_error"),
]


def stored(path: str, records) -> str:
    """A usage database at `path` holding `records`, written by the real tracker."""
    tracker = Tracker(path)
    tracker.start()
    for record in records:
        tracker.record(record)
    assert tracker.flush()
    tracker.close()
    return path


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    return stored(str(tmp_path_factory.mktemp("report") / "usage.db"), RECORDS)


def by(rows, label):
    return {row[label]: row for row in rows}


# --- summary -------------------------------------------------------------------------------------


def test_totals_sum_every_token_kind_the_cost_and_the_failures(db):
    totals = summarize(db)["totals"]
    assert totals == {
        "requests": 6,
        "input_tokens": 330,
        "output_tokens": 155,
        "cache_read_tokens": 300,
        "cache_write_tokens": 100,
        "reasoning_tokens": 10,
        "cache_hit_ratio": pytest.approx(300 / 730),
        "cost_usd": pytest.approx(0.03005),
        "unpriced_requests": 1,  # r4 used tokens nobody could price; r5 and r6 used none
        "continued_requests": 1,  # r3's stream broke and was continued...
        "continuation_cost_usd": pytest.approx(0.004),  # ...which cost this on top
        "dedup_requests": 0, "dedup_tokens": 0, "dedup_saved_usd": 0.0,
        "failures": {"client_gone": 1, "rejected": 1, "upstream_error": 1},
    }


def test_replayed_and_joined_requests_count_as_saved_not_as_spent(tmp_path):
    """A duplicate served without an upstream call keeps the paid tokens on its row; the
    report counts them as saved (with what they cost the request that paid), never as used,
    and a dedup row is not a failure."""
    paid = dict(upstream_model="claude-sonnet-4-5", client_key_id="k1", input_tokens=100,
                output_tokens=50, cache_read_tokens=300, cache_write_tokens=100, priced=True,
                usage_complete=True)
    records = [
        UsageRecord(request_id="p1", started_at=DAY1, cost_usd=0.01, **paid),
        UsageRecord(request_id="d1", started_at=DAY1 + 1, end_reason="replay", paid_by="p1",
                    cost_usd=0.0, saved_cost_usd=0.01, **paid),
        UsageRecord(request_id="d2", started_at=DAY1 + 2, end_reason="joined", paid_by="p1",
                    cost_usd=0.0, saved_cost_usd=0.01, **paid),
        UsageRecord(request_id="d3", started_at=DAY1 + 3, end_reason="client_gone", paid_by="p1",
                    status=499),  # a joined client that left: a failure, nothing saved
    ]
    path = stored(str(tmp_path / "usage.db"), records)
    totals = summarize(path)["totals"]
    assert (totals["requests"], totals["input_tokens"], totals["output_tokens"]) == (4, 100, 50)
    assert (totals["cache_read_tokens"], totals["cache_write_tokens"]) == (300, 100)
    assert totals["cost_usd"] == pytest.approx(0.01)
    assert (totals["dedup_requests"], totals["dedup_tokens"]) == (2, 2 * 550)
    assert totals["dedup_saved_usd"] == pytest.approx(0.02)
    assert totals["failures"] == {"client_gone": 1}
    table = render_table(summarize(path))
    assert "saved USD" in table and "0.020000" in table
    assert "failed_replay" not in render_csv(summarize(path))


def test_requests_are_grouped_by_utc_day(db):
    days = summarize(db)["by_day"]
    assert [d["day"] for d in days] == ["2026-11-20", "2026-11-21"]
    assert [d["requests"] for d in days] == [2, 4]
    assert days[0]["failures"] == {"client_gone": 1}
    assert days[1]["cost_usd"] == pytest.approx(0.02)
    assert (days[0]["continued_requests"], days[1]["continued_requests"]) == (0, 1)


def test_by_model_uses_upstream_model_then_requested(db):
    models = by(summarize(db)["by_model"], "model")
    assert set(models) == {"claude-sonnet-4-5", "gpt-4o", "mystery-model", "fast"}
    sonnet = models["claude-sonnet-4-5"]
    assert (sonnet["requests"], sonnet["input_tokens"], sonnet["output_tokens"]) == (2, 300, 150)
    assert sonnet["cache_hit_ratio"] == pytest.approx(300 / 700)
    assert models["gpt-4o"]["failures"] == {"client_gone": 1, "upstream_error": 1}
    assert models["mystery-model"]["unpriced_requests"] == 1
    assert models["fast"]["cache_hit_ratio"] is None  # no input at all: no ratio, not 0
    assert summarize(db)["by_model"][0]["model"] == "claude-sonnet-4-5"  # biggest spend first


def test_requests_are_grouped_by_client_key_with_keyless_ones_apart(db):
    keys = by(summarize(db)["by_client_key"], "client_key_id")
    assert set(keys) == {"k1", "k2", None}
    assert keys["k1"]["requests"] == 2 and keys["k1"]["cost_usd"] == pytest.approx(0.03)
    assert keys[None]["failures"] == {"rejected": 1}


@pytest.mark.parametrize("since, until, requests", [
    ("2026-11-21", None, 4),
    (None, "2026-11-20", 2),  # a bare date includes that whole day
    (None, "2026-11-21T00:00:00Z", 2),  # a datetime is an exclusive bound
    ("2026-11-21T01:00:00+01:00", None, 4),  # the same instant in another zone
    ("2026-11-20T12:00:30", "2026-11-21T09:30:01", 2),  # naive means UTC: r2 and r3
    ("2026-11-22", None, 0),
])
def test_a_time_window_counts_only_the_requests_inside_it(db, since, until, requests):
    summary = summarize(db, since=since, until=until)
    assert summary["totals"]["requests"] == requests
    assert sum(d["requests"] for d in summary["by_day"]) == requests


def test_window_is_echoed_in_utc(db):
    summary = summarize(db, since="2026-11-20", until="2026-11-20")
    assert (summary["since"], summary["until"]) == ("2026-11-20T00:00:00Z", "2026-11-21T00:00:00Z")


def test_an_empty_window_reports_zeros_and_no_cache_ratio(db):
    summary = summarize(db, since="2030-01-01")
    assert summary["totals"]["requests"] == 0 and summary["totals"]["cost_usd"] == 0.0
    assert summary["totals"]["cache_hit_ratio"] is None
    assert summary["by_day"] == summary["by_model"] == summary["by_client_key"] == []
    assert "(no requests)" in render_table(summary)


def empty_databases(tmp_path) -> dict[str, str]:
    """A database not created yet, a file with no tables, one the proxy made but never used."""
    blank, unused = tmp_path / "blank.db", tmp_path / "unused.db"
    sqlite3.connect(blank).close()
    store = open_store(str(unused))
    store.open()
    store.close()
    return {"missing": str(tmp_path / "missing.db"), "blank": str(blank), "unused": str(unused)}


def test_a_missing_or_empty_database_gives_the_empty_summary(tmp_path):
    summaries = {name: summarize(path, top=5) for name, path in empty_databases(tmp_path).items()}
    assert summaries["missing"] == summaries["blank"] == summaries["unused"]
    empty = summaries["missing"]
    assert empty["totals"]["requests"] == 0
    assert empty["groups"] == {"by_model": 0, "by_client_key": 0, "by_key": 0}
    assert empty["by_day"] == empty["by_model"] == empty["by_client_key"] == []
    assert not (tmp_path / "missing.db").exists()  # reading never creates the database


def test_a_database_of_something_else_is_refused(tmp_path):
    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE notes (text)")
    conn.close()
    with pytest.raises(ValueError, match="not a usage database"):
        summarize(str(other))


# --- parse_when ----------------------------------------------------------------------------------

MIDNIGHT_21 = datetime(2026, 11, 21, tzinfo=timezone.utc).timestamp()


@pytest.mark.parametrize("value, end, expected", [
    ("2026-11-21", False, MIDNIGHT_21),
    ("2026-11-21", True, MIDNIGHT_21 + 86400),
    (" 2026-11-21 ", False, MIDNIGHT_21),
    ("2026-11-21T13:00:00Z", False, MIDNIGHT_21 + 13 * 3600),
    ("2026-11-21T13:00:00", True, MIDNIGHT_21 + 13 * 3600),
    ("2026-11-21T13:00:00+02:00", False, MIDNIGHT_21 + 11 * 3600),
    ("2026-11-21 13:00", False, MIDNIGHT_21 + 13 * 3600),
    (date(2026, 11, 21), False, MIDNIGHT_21),
    (datetime(2026, 11, 21, 1), False, MIDNIGHT_21 + 3600),
    (MIDNIGHT_21, False, MIDNIGHT_21),
    (None, False, None),
    ("", True, None),
])
def test_dates_and_times_parse_to_window_edges(value, end, expected):
    assert parse_when(value, end=end) == expected


@pytest.mark.parametrize(
    "value", ["yesterday", "2026-13-01", "21/11/2026", "2026-11-21T25:00", True, []])
def test_parse_when_rejects_nonsense(value):
    with pytest.raises(ValueError, match="not a date or time"):
        parse_when(value)


# --- rendering -----------------------------------------------------------------------------------


def test_table_columns_line_up(db):
    text = render_table(summarize(db))
    assert text.startswith("Usage: all recorded requests")
    blocks = [b.splitlines() for b in text.split("\n\n")][1:]
    assert [b[0] for b in blocks] == ["Totals", "By day (UTC)", "By model", "By client key",
                                      "By proxy key"]
    for block in blocks:
        header, rows = block[1], block[2:]
        assert rows
        for label in ("requests", "cost USD", "unpriced"):  # numbers end under their header
            edge = header.index(label) + len(label)
            assert all(row[edge - 1] != " " and row[edge] == " " for row in rows), (label, block)
        start = header.index("failures")
        assert all(row[start - 2:start] == "  " and row[start] != " " for row in rows), block
    assert "client_gone=1, rejected=1, upstream_error=1" in text
    assert "41.1%" in text  # 300 / 730


def test_csv_has_a_row_per_group_and_a_column_per_failure_kind(db):
    summary = summarize(db)
    rows = list(csv.DictReader(io.StringIO(render_csv(summary))))
    assert [(r["group"], r["key"]) for r in rows][:3] == [
        ("total", ""), ("day", "2026-11-20"), ("day", "2026-11-21")]
    assert [r["group"] for r in rows].count("model") == 4
    assert [r["group"] for r in rows].count("client_key") == 3
    total = rows[0]
    assert total["requests"] == "6" and total["input_tokens"] == "330"
    assert float(total["cost_usd"]) == pytest.approx(0.03005)
    assert total["failed_client_gone"] == "1" and total["failed_shutdown"] == "0"
    assert "failed_complete" not in total
    fast = next(r for r in rows if r["key"] == "fast")
    assert fast["cache_hit_ratio"] == ""  # None is an empty cell, not "None"


def test_the_summary_survives_a_json_round_trip(db):
    summary = summarize(db)
    again = json.loads(json.dumps(summary))
    assert set(again) == {"since", "until", "totals", "by_day", "by_model", "by_client_key",
                          "by_key"}
    assert again["totals"]["requests"] == 6


# --- command line --------------------------------------------------------------------------------


def parse(argv):
    parser = argparse.ArgumentParser(prog="llm-proxy usage")
    add_usage_arguments(parser)
    return parser.parse_args(argv)


def test_the_usage_command_prints_json_for_a_window(db, capsys):
    assert run_usage(parse(["summary", "--json", "--since", "2026-11-21"]), db) == 0
    assert json.loads(capsys.readouterr().out)["totals"]["requests"] == 4


def test_the_usage_command_prints_csv_from_the_database_it_is_given(db, capsys):
    assert run_usage(parse(["summary", "--csv", "--db", db]), "/nonexistent/default.db") == 0
    assert capsys.readouterr().out.startswith("group,key,requests,")


def test_the_usage_command_prints_the_summary_table(db, capsys):
    assert run_usage(parse(["summary"]), db) == 0
    assert "By client key" in capsys.readouterr().out


def test_run_usage_on_a_missing_database_prints_the_empty_report(tmp_path, capsys):
    assert run_usage(parse(["summary"]), str(tmp_path / "usage.db")) == 0
    out = capsys.readouterr().out
    assert out.startswith("Usage: all recorded requests") and "(no requests)" in out
    assert run_usage(parse([]), str(tmp_path / "usage.db")) == 0  # the daily view
    out = capsys.readouterr().out
    assert out.startswith("Usage per day, from the beginning") and "(no requests)" in out
    assert run_usage(parse([]), None) == 1  # nothing configured at all
    assert "no usage database configured" in capsys.readouterr().err


def test_the_usage_endpoint_answers_a_missing_database_like_the_report(tmp_path):
    """/usage and `llm-proxy usage` show one shape, made in one place, for "nothing yet"."""
    from werkzeug.test import Client

    from proxy.app import App
    from proxy.config import load_config

    db = tmp_path / "usage.db"
    app = App(load_config(env={"LLM_PROXY_DB": str(db), "LLM_PROXY_TRACKER": "false"}))
    try:
        response = Client(app).get("/usage", query_string={"since": "2026-11-01",
                                                           "until": "2026-11-30"})
    finally:
        app.close()
    assert response.status_code == 200 and not db.exists()
    assert response.json == summarize(str(db), "2026-11-01", "2026-11-30", top=50)


def test_the_usage_command_with_a_bad_date_exits_2(db, capsys):
    assert run_usage(parse(["--since", "last tuesday"]), db) == 2
    assert "not a date or time" in capsys.readouterr().err


def test_json_and_csv_are_exclusive():
    with pytest.raises(SystemExit):
        parse(["--json", "--csv"])


def test_top_keeps_the_biggest_groups_and_says_how_many_there_are(db):
    summary = summarize(db, top=1)
    assert [row["model"] for row in summary["by_model"]] == ["claude-sonnet-4-5"]
    assert summary["groups"] == {"by_model": len(summarize(db)["by_model"]),
                                 "by_client_key": len(summarize(db)["by_client_key"]),
                                 "by_key": len(summarize(db)["by_key"])}
    [key] = summary["by_client_key"]
    assert key == max(summarize(db)["by_client_key"], key=lambda r: (r["cost_usd"], r["requests"]))
    assert summary["totals"] == summarize(db)["totals"]  # totals still count every row


def test_continued_answers_are_counted_as_requests_and_their_extra_cost_is_shown(tmp_path):
    path = str(tmp_path / "usage.db")
    tracker = Tracker(path)
    tracker.start()
    for record in [
        UsageRecord(request_id="a", started_at=DAY1, upstream_model="m", input_tokens=1, cost_usd=0.01,
                    priced=True, continuations=2, continuation_cost_usd=0.00125),
        UsageRecord(request_id="b", started_at=DAY1 + 1, upstream_model="m", input_tokens=1, cost_usd=0.01,
                    priced=True, continuations=1, continuation_cost_usd=0.00125),
        UsageRecord(request_id="c", started_at=DAY1 + 2, upstream_model="x", input_tokens=1),
    ]:
        tracker.record(record)
    assert tracker.flush()
    tracker.close()
    summary = summarize(path)
    assert summary["totals"]["continued_requests"] == 2  # requests, not continuations
    assert summary["totals"]["continuation_cost_usd"] == pytest.approx(0.0025)
    table = render_table(summary)
    assert "continuation USD" in table and "0.002500" in table
