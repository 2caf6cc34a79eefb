"""The usage store on a real PostgreSQL server: the same rows and reports as SQLite, inserts
that a retried batch cannot double, migrations that several hosts starting at once run
once, faults while the server is down, and the tracker's spill and replay across an outage
(nothing lost, nothing twice)."""

from __future__ import annotations

import logging
import multiprocessing
import os
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from proxy.report import summarize
from proxy.store import RowRejected, StoreFault, empty_counts, open_store
from proxy.store.postgres import (_ROLLUP_UPSERT, SCHEMA_VERSION, PostgresStore, fault_kind,
                                  redacted_url, rollup_deltas)
from proxy.store.sqlite import SqliteStore
from proxy.tracker import Tracker, to_storage_row
from proxy.usage import UsageRecord

from support.postgres import PostgresServer, wait_for_a_lock_wait
from test_report import RECORDS, stored

pytestmark = pytest.mark.timeout(120)


def row(request_id: str, **fields) -> dict:
    return to_storage_row(UsageRecord(request_id=request_id, started_at=1_763_700_000.0,
                                      endpoint="anthropic", **fields))


@pytest.fixture
def url(postgres) -> str:
    return postgres.database()


@pytest.fixture
def store(url):
    opened = open_store(url)
    yield opened
    opened.close()


@pytest.fixture
def own_server():
    """A server of this test's own, to stop and start (the session's serves the others)."""
    directory = tempfile.mkdtemp(prefix="llm-proxy-pg-")
    os.chmod(directory, 0o755)
    server = PostgresServer(Path(directory) / "cluster").start()
    yield server
    server.stop("immediate")


def test_open_store_picks_postgres_for_a_url_and_opens_nothing_yet(url):
    store = open_store(url)
    assert isinstance(store, PostgresStore) and store._conn is None
    assert isinstance(open_store("/tmp/x/usage.db"), SqliteStore)


def test_a_batch_stored_twice_is_stored_once(store, url):
    """A batch retried after a lost acknowledgement inserts nothing twice."""
    batch = [row("req_a", input_tokens=10), row("req_b", output_tokens=5)]
    assert store.insert_rows(batch) == 2
    assert store.insert_rows(batch) == 0
    assert store.insert_rows(batch + [row("req_c")], only_new=True) == 1
    assert store.insert_rows([row("req_d", input_tokens=7)] * 2) == 1  # twice in one batch
    assert [r["request_id"] for r in store.rows()] == ["req_a", "req_b", "req_c", "req_d"]
    assert store.rows("req_a")[0]["input_tokens"] == 10
    totals = store.totals(None, None)  # the rollups counted each row once, too
    assert (totals["requests"], totals["input_tokens"], totals["output_tokens"]) == (4, 17, 5)


def test_rows_read_back_as_sqlite_reads_them(store, tmp_path):
    record = UsageRecord(request_id="req_x", started_at=1_763_700_000.5, endpoint="anthropic",
                         model_requested="claude-x", input_tokens=3, output_tokens=4,
                         cost_usd=0.25, priced=True, usage_complete=True, stream=True,
                         error="an error with ünïcode", key_name="alice", paid_by=None)
    sqlite = open_store(str(tmp_path / "usage.db"))
    for each in (store, sqlite):
        each.insert_rows([to_storage_row(record)])
    assert store.rows() == sqlite.rows()
    assert UsageRecord.from_row(store.rows()[0]) == UsageRecord.from_row(sqlite.rows()[0])
    sqlite.close()


# Beside the report tests' rows: answers served without paying (a replay, a join), proxy
# key names, and a row with no model at all.
MORE_RECORDS = [
    UsageRecord(request_id="r7", started_at=RECORDS[0].started_at + 30, end_reason="replay",
                upstream_model="claude-sonnet-4-5", client_key_id="k1", key_name="alice",
                input_tokens=100, output_tokens=50, cost_usd=0.0, priced=True, paid_by="r1",
                saved_cost_usd=0.01),
    UsageRecord(request_id="r8", started_at=RECORDS[2].started_at + 5, end_reason="joined",
                upstream_model="claude-sonnet-4-5", client_key_id="k3", key_name="bob",
                input_tokens=200, cost_usd=0.0, priced=True, paid_by="r3", saved_cost_usd=0.02),
    UsageRecord(request_id="r9", started_at=RECORDS[2].started_at + 7, end_reason="rejected",
                status=401, key_name="alice"),
]


def test_the_report_is_the_same_on_both_databases(url, tmp_path):
    """The report's figures come from each store's own SQL: every total, group and failure
    must agree, with and without a period, a top, or one client key."""
    sqlite = stored(str(tmp_path / "usage.db"), RECORDS + MORE_RECORDS)
    postgres = stored(url, RECORDS + MORE_RECORDS)
    assert summarize(postgres)["totals"]["dedup_requests"] == 2
    for options in ({}, {"since": "2026-11-21"}, {"top": 1}, {"client_key": "k1"},
                    {"since": "2026-11-20", "until": "2026-11-20"},
                    # partial hours at both edges (raw rows there, rollups between)
                    {"since": "2026-11-20T12:00:30Z", "until": "2026-11-21T09:30:02Z"},
                    {"since": "2026-11-21T09:30:00.5Z", "until": "2026-11-21T09:59:00Z"},
                    {"since": "2026-11-20T11:30:00Z", "client_key": "k2", "top": 5}):
        assert summarize(postgres, **options) == summarize(sqlite, **options), options


def test_reports_read_the_hourly_rollups_not_the_raw_rows(url):
    """Raw rows gone (as retention deletes them): whole hours are still counted, from the
    rollups kept with each batch; a partial hour at the period's edge is read raw."""
    stored(url, RECORDS)
    before = summarize(url)
    edge = "2026-11-21T09:30:00.5Z"  # r4-r6 are in the partial hour after it
    assert summarize(url, since=edge)["totals"]["requests"] == 3
    store = open_store(url)
    store._query("DELETE FROM usage_records RETURNING id", ())
    store.close()
    assert summarize(url) == before
    assert summarize(url, since=edge)["totals"]["requests"] == 0  # that hour was read raw


def test_hosts_starting_together_migrate_an_empty_database_once(url):
    context = multiprocessing.get_context("spawn")
    with context.Pool(3) as pool:
        found = pool.map(_open_and_report_version, [url] * 3)
    assert set(found) <= {0, SCHEMA_VERSION}  # one migrated, the others found it done
    assert found.count(0) == 1
    store = open_store(url)
    try:
        assert store._query("SELECT count(*) FROM llm_proxy_schema", ()) == [(1,)]
    finally:
        store.close()


def _open_and_report_version(url: str) -> int:
    store = PostgresStore(url)
    store._conn = store._connect()
    try:
        return store._migrate()
    finally:
        store.close()


def test_a_value_postgres_refuses_is_the_rows_fault(store):
    bad = row("req_bad")
    bad["status"] = 2**40  # fits SQLite's integer, not PostgreSQL's INTEGER column
    with pytest.raises(RowRejected):
        store.insert_rows([row("req_ok"), bad])
    assert store.rows() == []  # the batch is all or nothing
    assert store.insert_rows([row("req_ok")]) == 1  # and the store goes on


def test_a_server_that_is_down_is_an_unreachable_fault_and_the_store_reconnects(own_server):
    store = open_store(own_server.database())
    store.insert_rows([row("req_1")])
    own_server.stop("immediate")
    with pytest.raises(StoreFault) as fault:
        store.insert_rows([row("req_2")])
    assert fault.value.kind == "unreachable"
    own_server.start()
    assert store.insert_rows([row("req_2")]) == 1
    assert [r["request_id"] for r in store.rows()] == ["req_1", "req_2"]
    store.close()


def test_rows_queued_while_the_server_is_down_spill_and_arrive_once(own_server, tmp_path):
    url = own_server.database()
    tracker = Tracker(url, spill_dir=str(tmp_path / "spill"), flush_interval=0.01,
                      spill_after=0.2)
    tracker.start()
    try:
        tracker.record(UsageRecord(request_id="req_before", started_at=time.time()))
        assert tracker.flush(5)
        own_server.stop("immediate")
        for i in range(50):
            tracker.record(UsageRecord(request_id=f"req_down_{i}", started_at=time.time()))
        assert tracker.wait_for_count("spilled", 50, 10), tracker.stats()
        own_server.start()
        reader = open_store(url)
        deadline = time.monotonic() + 20
        while len(reader.rows()) < 51:  # the writer replays the spill once the server is back
            assert time.monotonic() < deadline, tracker.stats()
            time.sleep(0.1)
        reader.close()
    finally:
        tracker.close(10)
    ids = [r["request_id"] for r in open_store(url).rows()]
    assert sorted(ids) == sorted(["req_before"] + [f"req_down_{i}" for i in range(50)])
    assert tracker.stats()["replayed"] == 50


def test_answers_kept_for_replay_round_trip(store):
    answer = {"shape": "s1", "digest": "d1", "stream": 1, "variant": None, "fmt": "anthropic",
              "content_type": "text/event-stream", "status": 200, "body": b"event: x\n\n",
              "hidden": b"", "paid_by": "req_1", "usage": "{}", "ended_at": 10.0,
              "expires_at": 20.0}
    store.put_answers([answer], now=5.0)
    [found] = store.find_answers("s1", now=15.0)
    assert found["digest"] == "d1" and store.find_answers("s1", now=25.0) == []
    whole = store.answer(found["id"])
    assert bytes(whole["body"]) == b"event: x\n\n" and whole["paid_by"] == "req_1"
    store.put_answers([], now=30.0)  # expired ones go
    assert store.answer(found["id"]) is None


def test_a_url_password_never_reaches_a_log_line(own_server, caplog, tmp_path):
    own_server.sql("ALTER USER postgres PASSWORD 'sekrit-password-123'")
    url = own_server.url().replace("postgres@", "postgres:sekrit-password-123@")
    assert "sekrit" not in redacted_url(url) and "***" in redacted_url(url)
    own_server.stop("immediate")
    store = open_store(url)
    with caplog.at_level(logging.WARNING):
        with pytest.raises(StoreFault) as fault:
            store.insert_rows([row("req")])
        tracker = Tracker(url, spill_dir=str(tmp_path / "spill"), spill_after=0.0,
                          flush_interval=0.01)
        tracker.start()
        tracker.record(UsageRecord(request_id="req", started_at=time.time()))
        tracker.close(2)
    assert "sekrit" not in fault.value.detail
    assert "sekrit" not in caplog.text
    own_server.start()


def test_the_proxy_records_its_rows_in_postgres(start_proxy, url, fake):
    """Real gunicorn with `LLM_PROXY_DB` set to a URL: the rows, the /usage report, and no
    SQLite file anywhere."""
    from support.processes import http_get, local_session

    server = start_proxy(workers=2, LLM_PROXY_DB=url)
    with local_session() as session:
        for stream in (False, True):
            answer = session.post(server.url + "/v1/messages", timeout=30, json={
                "model": "claude-sonnet-5", "max_tokens": 10, "stream": stream,
                "messages": [{"role": "user", "content": "hi"}]},
                headers={"anthropic-version": "2023-06-01", "x-api-key": "sk-test-key-123456"})
            assert answer.status_code == 200
            answer.content  # noqa: B018 - the whole answer: its row is queued before the end
    reader = open_store(url)
    deadline = time.monotonic() + 10
    while len(reader.rows()) < 2:
        server.flush()
        assert time.monotonic() < deadline, "the rows never reached PostgreSQL"
    rows = reader.rows()
    reader.close()
    assert {(r["stream"], r["end_reason"]) for r in rows} == {(0, "complete"), (1, "complete")}
    assert all(r["input_tokens"] for r in rows), rows
    assert http_get(server.url + "/usage", timeout=10).json()["totals"]["requests"] == 2
    assert "postgres@" in server.log() and "usage.db" not in server.log()


def test_each_database_has_a_spill_directory_of_its_own(tmp_path):
    """Rows spilled for one database must never be replayed into another."""
    from proxy.store import default_spill_dir

    one = default_spill_dir("postgresql://u:pw1@db.example/one", str(tmp_path))
    two = default_spill_dir("postgresql://u:pw1@db.example/two", str(tmp_path))
    assert one != two and one.startswith(str(tmp_path)) and "pw1" not in one
    assert one == default_spill_dir("postgresql://u:rotated@db.example/one", str(tmp_path))
    assert default_spill_dir("/data/usage.db", str(tmp_path)) == "/data/usage.db.spill"


def test_retention_deletes_old_raw_rows_in_small_batches_and_reports_keep_them(url,
                                                                             monkeypatch,
                                                                             tmp_path):
    import proxy.tracker as tracker_module

    monkeypatch.setattr(tracker_module, "PRUNE_BATCH", 3)
    monkeypatch.setattr(tracker_module, "PRUNE_PAUSE", 0.0)
    old = [UsageRecord(request_id=f"req_old_{i}", started_at=time.time() - 40 * 86400 - i,
                       input_tokens=10) for i in range(8)]
    stored(url, old)
    before = summarize(url)
    tracker = Tracker(url, retention_days=30, flush_interval=0.01,
                      spill_dir=str(tmp_path / "spill"))
    tracker.start()
    try:
        tracker.record(UsageRecord(request_id="req_new", started_at=time.time(), input_tokens=1))
        assert tracker.flush(5)
        assert tracker.wait_for_count("pruned", 8, 10), tracker.stats()
    finally:
        tracker.close(5)
    assert [r["request_id"] for r in open_store(url).rows()] == ["req_new"]
    after = summarize(url, since=before["since"])
    assert after["totals"]["requests"] == 9 and after["totals"]["input_tokens"] == 81


def test_a_url_that_cannot_work_stops_start_up_without_showing_its_password():
    from proxy.store import TrackerPathError

    with pytest.raises(TrackerPathError) as refused:
        open_store("postgresql://u:p%zzsecret@127.0.0.1:1/db").check()
    assert "secret" not in str(refused.value)
    assert "secret" not in redacted_url("postgresql://u@h/db?password=secret")


def test_a_database_of_a_newer_schema_is_not_written_to(url, tmp_path):
    """A host still on older code during an upgrade would write rows without what the newer
    schema keeps (rollups, say): its rows wait and spill instead."""
    store = open_store(url)
    store.insert_rows([row("req_1")])
    store._query("INSERT INTO llm_proxy_schema (version) VALUES (99) RETURNING version", ())
    store.close()
    with pytest.raises(StoreFault) as fault:
        open_store(url).insert_rows([row("req_2")])
    assert fault.value.kind == "schema_newer"


def test_keys_of_different_clients_do_not_wait_for_each_other(url):
    """One key's row held by another host's transaction: that key waits at most the lock
    timeout (then a fault, 503 to its client); another key is admitted meanwhile."""
    import psycopg

    from proxy.keys.pgstore import PgKeyStore
    from proxy.keys.policy import ClientKey

    keys = PgKeyStore(url, busy_timeout_ms=300)
    for name in ("a", "b"):
        keys.add(ClientKey(id=f"lk_{name}", name=name, digest=f"d_{name}", hint="h", rpm=100))
    other_host = psycopg.connect(url, autocommit=False)
    try:
        other_host.execute("SELECT 1 FROM client_keys WHERE id = 'lk_a' FOR UPDATE")
        started = time.monotonic()
        assert keys.admit("lk_b", "req_b", 0.0, "h", time.time())[1] is None
        assert time.monotonic() - started < 0.3
        with pytest.raises(StoreFault) as fault:
            keys.admit("lk_a", "req_a", 0.0, "h", time.time())
        assert fault.value.kind == "locked" and time.monotonic() - started < 2.0
    finally:
        other_host.rollback()
        other_host.close()
    assert keys.admit("lk_a", "req_a", 0.0, "h", time.time())[1] is None
    keys.close()
# ---- proposed additions to tests/test_store_postgres.py (mutation pass) ----



def test_a_row_in_an_edge_hour_before_midnight_counts_on_its_own_day(store):
    """The raw rows of a partial hour are bucketed by floor(hour), as the rollups are."""
    late = datetime(2026, 11, 20, 23, 30, tzinfo=timezone.utc).timestamp()
    store.insert_rows([to_storage_row(UsageRecord(request_id="req_late", started_at=late,
                                                  input_tokens=1))])
    edge = late - 20 * 60  # 23:10: the hour 23:00-24:00 is read raw
    assert list(store.breakdown("day", edge, None)) == ["2026-11-20"]
    assert list(store.breakdown("day", None, None)) == ["2026-11-20"]  # from the rollups


def test_one_clients_report_never_counts_another_clients_rows_in_an_edge_hour(store):
    start = 1_763_700_000.0  # 04:40 UTC: a period that starts mid-hour is read raw there
    store.insert_rows([to_storage_row(UsageRecord(request_id=f"req_{k}", started_at=start + 60,
                                                  client_key_id=k, input_tokens=n))
                       for k, n in (("k1", 1), ("k2", 10))])
    assert store.totals(start, None, client_key="k1")["input_tokens"] == 1
    assert store.totals(start, start + 600, client_key="k1")["input_tokens"] == 1
    assert store.totals(None, None, client_key="k1")["input_tokens"] == 1


def test_rollups_are_updated_in_key_order_so_two_writers_never_deadlock(url):
    """Another host's batch holds the rollup of the earlier hour and then wants the later
    one; ours must wait on the earlier hour, not take the later one first (the rows' order
    in the batch must not matter)."""
    import psycopg

    early = to_storage_row(UsageRecord(request_id="req_early", started_at=1_763_700_000.0))
    late = to_storage_row(UsageRecord(request_id="req_late", started_at=1_763_700_000.0 + 7200))
    store = PostgresStore(url, busy_timeout_ms=5000)
    store.open()
    other_host = psycopg.connect(url, autocommit=False)
    outcome = []
    try:
        with other_host.cursor() as cursor:
            cursor.executemany(_ROLLUP_UPSERT, rollup_deltas([early]))  # holds the early hour
        writer = threading.Thread(target=lambda: outcome.append(
            _outcome(store.insert_rows, [early, late])))
        writer.start()
        wait_for_a_lock_wait(url)  # our writer is waiting now
        with other_host.cursor() as cursor:
            cursor.executemany(_ROLLUP_UPSERT, rollup_deltas([late]))  # deadlock if held
        other_host.commit()
        writer.join(10)
    finally:
        other_host.close()
        store.close()
    assert outcome == [2]


def _outcome(call, *args):
    try:
        return call(*args)
    except Exception as exc:  # noqa: BLE001 - the test compares it
        return exc


def test_prune_deletes_at_most_its_limit_oldest_first_and_skips_rows_held_elsewhere(url):
    import psycopg

    store = PostgresStore(url, busy_timeout_ms=500)
    store.insert_rows([to_storage_row(UsageRecord(request_id=f"req_{i}", started_at=1000.0 + i))
                       for i in range(6)] + [row("req_new")])
    assert store.prune(1000.0 + 6, 2) == 2
    assert [r["request_id"] for r in store.rows()] == ["req_2", "req_3", "req_4", "req_5",
                                                       "req_new"]
    other_host = psycopg.connect(url, autocommit=False)  # another host deleting req_2 now
    try:
        other_host.execute("SELECT 1 FROM usage_records WHERE request_id = 'req_2' FOR UPDATE")
        assert store.prune(1000.0 + 6, 100) == 3  # not waited for, not a fault
    finally:
        other_host.rollback()
        other_host.close()
    assert [r["request_id"] for r in store.rows()] == ["req_2", "req_new"]
    store.close()


def test_a_read_only_database_is_a_read_only_fault(url):
    """A primary that failed over to a standby, say: the rows wait and spill."""
    import psycopg

    store = open_store(url)
    store.insert_rows([row("req_1")])
    store.close()
    with psycopg.connect(url, autocommit=True) as admin:
        name = admin.execute("SELECT current_database()").fetchone()[0]
        admin.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
    try:
        with pytest.raises(StoreFault) as fault:
            store.insert_rows([row("req_2")])
        assert fault.value.kind == "read_only"
    finally:
        store.close()
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute("SET default_transaction_read_only = off")
            admin.execute(f'ALTER DATABASE "{name}" RESET default_transaction_read_only')


def test_faults_are_named_by_what_the_database_said():
    import psycopg

    assert fault_kind(psycopg.errors.DiskFull("could not extend file")) == "disk_full"
    assert fault_kind(psycopg.errors.ReadOnlySqlTransaction("read-only")) == "read_only"
    assert fault_kind(psycopg.errors.LockNotAvailable("lock timeout")) == "locked"
    assert fault_kind(psycopg.OperationalError(
        'connection failed: FATAL:  password authentication failed for user "u"')) == "refused"
    assert fault_kind(psycopg.OperationalError("connection refused")) == "unreachable"
    assert fault_kind(ConnectionResetError()) == "unreachable"
    assert fault_kind(psycopg.errors.UndefinedColumn("no such column")) == "error"


def test_an_error_never_shows_the_password_in_any_of_its_forms():
    from proxy.store.postgres import _safe

    url = "postgresql://u:p%40ss%2Fw0rd@db.example/llm?sslmode=require&password=q-secret"
    text = "bad: p%40ss%2Fw0rd / p@ss/w0rd / q-secret"
    assert _safe(ValueError(text), url) == "bad: *** / *** / ***"


def test_a_server_that_cannot_be_reached_at_start_up_is_a_warning_not_an_error():
    warning = open_store("postgresql://u:pw-secret@127.0.0.1:1/db").check()
    assert warning is not None and "(unreachable)" in warning and "pw-secret" not in warning


def test_a_database_nothing_was_recorded_in_yet_has_no_rows(url):
    store = open_store(url)  # reads do not migrate: the tables do not exist
    try:
        assert store.totals(None, None) == empty_counts()
        assert store.rows() == [] and store.breakdown("model", None, None) == {}
        assert store.group_count("model", None, None) == 0
    finally:
        store.close()


def test_an_empty_upstream_model_is_grouped_alike_in_rollups_and_raw_rows(store):
    store.insert_rows([to_storage_row(UsageRecord(request_id="req_e", started_at=1_763_700_000.0,
                                                  upstream_model="", model_requested="fast",
                                                  input_tokens=1))])
    whole = store.breakdown("model", None, None)  # the rollups
    edge = store.breakdown("model", 1_763_700_000.0 - 60, 1_763_700_000.0 + 60)  # raw rows
    assert list(whole) == list(edge) == [None]  # COALESCE keeps '', the report shows no value


def test_a_postgres_scheme_url_is_a_server_too(tmp_path):
    from proxy.config import load_config

    assert isinstance(open_store("postgres://u@db.example/llm"), PostgresStore)
    config = load_config(env={"LLM_PROXY_DB": "postgres://u:pw@db.example/llm"})
    assert config.db_is_url and "pw" not in config.db_label
    assert config.spill_path.startswith(config.data_dir) and "pw" not in config.spill_path


def test_retention_days_are_days(url, tmp_path):
    day = 86400
    stored(url, [UsageRecord(request_id="req_2_days", started_at=time.time() - 2 * day),
                 UsageRecord(request_id="req_40_days", started_at=time.time() - 40 * day)])
    tracker = Tracker(url, retention_days=30, flush_interval=0.01,
                      spill_dir=str(tmp_path / "spill"))
    tracker.start()
    try:
        assert tracker.wait_for_count("pruned", 1, 10), tracker.stats()
    finally:
        tracker.close(5)
    assert [r["request_id"] for r in open_store(url).rows()] == ["req_2_days"]


def test_rows_at_the_exact_edges_of_a_period_are_in_it(store):
    """[since, until): a row at a whole hour before `until`, and one exactly at `since`
    within one hour, are counted (raw rows; the rollups stop at the hour)."""
    hour = 1_763_701_200.0  # 05:00 UTC
    store.insert_rows([to_storage_row(UsageRecord(request_id=f"req_{i}", started_at=at))
                       for i, at in enumerate((hour, hour + 600))])
    assert store.totals(None, hour + 1800)["requests"] == 2
    assert store.totals(hour + 600, hour + 1800)["requests"] == 1
    assert store.totals(hour, hour + 1)["requests"] == 1


def test_a_host_starting_while_another_migrates_waits_for_it(url):
    """The migration lock: a host never reads the schema's version while another host is
    still creating the tables."""
    import psycopg

    from proxy.store.postgres import MIGRATION_LOCK

    migrating = psycopg.connect(url, autocommit=True)
    migrating.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
    store = open_store(url)
    opening = threading.Thread(target=store.open)
    try:
        opening.start()
        opening.join(0.5)
        assert opening.is_alive()  # waits for the other host's migration
    finally:
        migrating.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))
        migrating.close()
        opening.join(10)
    assert store.insert_rows([row("req_1")]) == 1
    store.close()


def test_top_ranks_groups_by_spend_before_requests(store):
    store.insert_rows([to_storage_row(UsageRecord(
        request_id=f"req_{i}", started_at=1_763_700_000.0, client_key_id=k, cost_usd=cost,
        priced=True, input_tokens=1))
        for i, (k, cost) in enumerate([("k_dear", 5.0), ("k_busy", 0.1), ("k_busy", 0.1),
                                       ("k_busy", 0.1)])])
    assert list(store.breakdown("client_key", None, None, top=1)) == ["k_dear"]


def test_a_row_held_by_another_host_is_waited_for_the_lock_timeout_only(url):
    """lock_timeout (the busy timeout) ends a wait for a row lock, long before the
    statement timeout (six times longer) would."""
    import psycopg

    store = PostgresStore(url, busy_timeout_ms=300)
    first = row("req_1")
    store.insert_rows([first])
    other_host = psycopg.connect(url, autocommit=False)
    try:
        with other_host.cursor() as cursor:  # holds the rollup row of that hour
            cursor.executemany(_ROLLUP_UPSERT, rollup_deltas([first]))
        started = time.monotonic()
        with pytest.raises(StoreFault) as fault:
            store.insert_rows([row("req_2")])
        assert fault.value.kind == "locked" and time.monotonic() - started < 1.0
    finally:
        other_host.rollback()
        other_host.close()
        store.close()


def test_a_servers_local_files_go_to_the_default_data_directory():
    from proxy.config import default_db_path, load_config

    config = load_config(env={"LLM_PROXY_DB": "postgresql://u:pw@db.example/llm"})
    assert config.data_dir == os.path.dirname(default_db_path())
    assert os.path.dirname(config.keys_db_path) == config.data_dir
