"""The tracker: flush semantics, one transaction per batch, retries on a locked database,
spill and replay, draining on close, and several processes writing one file."""

import json
import multiprocessing
import os
import sqlite3

import pytest

import proxy.tracker as tracker_module
from proxy.tracker import SCHEMA_VERSION, TABLE, NullTracker, Tracker
from proxy.usage import UsageRecord


@pytest.fixture
def db_path(tmp_path):
    return str(tmp_path / "usage.db")


@pytest.fixture
def make_tracker():
    """Trackers built here are closed even when a test fails half way."""
    made = []

    def make(path, **kwargs):
        made.append(Tracker(path, **kwargs))
        return made[-1]

    yield make
    for tracker in made:
        tracker.close(timeout=5)


def rec(i, **fields) -> UsageRecord:
    defaults = dict(request_id=f"req-{i}", started_at=1_763_700_000.0 + i,
                    ended_at=1_763_700_001.0 + i,
                    endpoint="anthropic", upstream_model="claude-sonnet-4-5", status=200,
                    input_tokens=10, output_tokens=i, stream=True)
    return UsageRecord(**{**defaults, **fields})


def stored(path) -> list[dict]:
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(f"SELECT * FROM {TABLE} ORDER BY id")]
    finally:
        conn.close()


def spill_lines(path) -> list[str]:
    spill = path + ".spill.jsonl"
    if not os.path.exists(spill):
        return []
    with open(spill, encoding="utf-8") as f:
        return [line for line in f if line.strip()]


# --- schema --------------------------------------------------------------------------------------


def test_start_creates_directory_schema_and_indexes(tmp_path, make_tracker):
    path = str(tmp_path / "deep" / "er" / "usage.db")
    make_tracker(path).start()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        indexes = {r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = ?", (TABLE,))}
    finally:
        conn.close()
    assert {f"{TABLE}_started_at", f"{TABLE}_model", f"{TABLE}_client_key",
            f"{TABLE}_end_reason"} <= indexes


def test_second_start_on_same_file_does_not_migrate_again(db_path, make_tracker):
    first = make_tracker(db_path)
    first.start()
    first.record(rec(1))
    assert first.flush()
    make_tracker(db_path).start()  # would fail on "table already exists" if it migrated twice
    assert len(stored(db_path)) == 1


# --- flush and batching --------------------------------------------------------------------------


def test_flush_returns_once_every_earlier_row_is_committed(db_path, make_tracker):
    tracker = make_tracker(db_path)
    tracker.start()
    records = [rec(i, client_key_id=f"k{i % 3}", cost_usd=0.001 * i, priced=True)
               for i in range(1000)]
    for r in records:
        tracker.record(r)
    assert tracker.flush(timeout=10) is True
    rows = stored(db_path)
    assert len(rows) == 1000
    assert [UsageRecord.from_row(r) for r in rows] == records
    stats = tracker.stats()
    assert stats["written"] == 1000 and stats["queued"] == 0 and stats["spilled"] == 0


def test_flush_with_nothing_pending(db_path, make_tracker):
    tracker = make_tracker(db_path)
    assert tracker.flush(timeout=0) is True  # not started, nothing recorded
    tracker.record(rec(1))
    assert tracker.flush(timeout=0.2) is False  # not started: nothing can commit it
    tracker.start()
    assert tracker.flush() is True
    assert tracker.flush(timeout=0) is True


def test_each_batch_is_one_transaction(db_path, make_tracker, monkeypatch):
    calls = []
    real_insert = tracker_module.insert_rows

    def counting_insert(conn, rows):
        calls.append(len(rows))
        real_insert(conn, rows)

    monkeypatch.setattr(tracker_module, "insert_rows", counting_insert)
    tracker = make_tracker(db_path, batch_size=50)
    for i in range(200):  # queued before the writer starts, so batches are full
        tracker.record(rec(i))
    tracker.start()
    assert tracker.flush()
    assert calls == [50, 50, 50, 50]
    assert tracker.stats()["batches"] == 4
    assert len(stored(db_path)) == 200


# --- failures ------------------------------------------------------------------------------------


def hold_write_lock(path) -> sqlite3.Connection:
    """Another connection (think: another worker) in the middle of a write transaction."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    return conn


def test_locked_database_is_retried_not_dropped(db_path, make_tracker):
    tracker = make_tracker(db_path, busy_timeout_ms=50)
    tracker.start()
    blocker = hold_write_lock(db_path)
    for i in range(10):
        tracker.record(rec(i))
    assert tracker.flush(timeout=0.5) is False  # still locked out
    blocker.execute("COMMIT")
    blocker.close()
    assert tracker.flush(timeout=10) is True
    assert len(stored(db_path)) == 10
    stats = tracker.stats()
    assert stats["retries"] >= 1 and stats["failed_batches"] == 0 and stats["spilled"] == 0


def test_batch_spilled_after_repeated_failure_then_replayed(db_path, make_tracker):
    tracker = make_tracker(db_path, busy_timeout_ms=20, max_batch_tries=3)
    tracker.start()
    blocker = hold_write_lock(db_path)
    for i in range(5):
        tracker.record(rec(i))
    assert tracker.flush(timeout=10) is False  # handled, but on disk beside the DB, not in it
    stats = tracker.stats()
    assert stats["failed_batches"] == 1 and stats["spilled"] == 5 and stats["retries"] == 3
    blocker.execute("ROLLBACK")
    blocker.close()
    tracker.record(rec(5))
    assert tracker.flush() is True  # later rows are fine again
    tracker.close()
    assert len(spill_lines(db_path)) == 5

    again = make_tracker(db_path)
    again.start()
    assert again.stats()["replayed"] == 5
    assert sorted(r["request_id"] for r in stored(db_path)) == [f"req-{i}" for i in range(6)]
    assert spill_lines(db_path) == []


def test_full_queue_spills_and_next_start_replays(db_path, make_tracker):
    tracker = make_tracker(db_path, queue_max=10)
    for i in range(50):
        tracker.record(rec(i))  # no writer yet: 10 fit, 40 spill
    assert tracker.stats()["queued"] == 10 and tracker.stats()["spilled"] == 40
    assert len(spill_lines(db_path)) == 40
    tracker.start()  # replays the 40, then the writer stores the 10 queued
    assert tracker.flush()
    ids = [r["request_id"] for r in stored(db_path)]
    assert sorted(ids) == sorted(f"req-{i}" for i in range(50))
    assert spill_lines(db_path) == []


def test_replay_skips_unreadable_lines(db_path, make_tracker):
    with open(db_path + ".spill.jsonl", "w", encoding="utf-8") as f:
        f.write(json.dumps(rec(1).to_row()) + "\n")
        f.write("{half a line\n\n")
        f.write(json.dumps({"request_id": "old-format", "started_at": 5.0}) + "\n")
    tracker = make_tracker(db_path)
    tracker.start()
    assert [r["request_id"] for r in stored(db_path)] == ["req-1", "old-format"]
    assert tracker.stats()["replayed"] == 2


def test_record_never_raises(db_path, make_tracker):
    tracker = make_tracker(db_path)
    tracker.start()
    tracker.record(None)
    tracker.record(object())
    tracker.record(rec(1, error=ValueError("boom")))  # odd values are stored as text
    assert tracker.flush()
    assert tracker.stats()["dropped"] == 2
    assert stored(db_path)[0]["error"] == "boom"


# --- close --------------------------------------------------------------------------------------


def test_close_drains_the_queue(db_path, make_tracker):
    tracker = make_tracker(db_path, batch_size=20)
    tracker.start()
    for i in range(500):
        tracker.record(rec(i))
    tracker.close()
    tracker.close()  # idempotent
    assert len(stored(db_path)) == 500
    assert tracker.stats()["written"] == 500


def test_rows_recorded_after_close_survive(db_path, make_tracker):
    tracker = make_tracker(db_path)
    tracker.start()
    tracker.close()
    tracker.record(rec(1))  # e.g. a stream finalised during shutdown
    assert spill_lines(db_path) and tracker.stats()["spilled"] == 1
    make_tracker(db_path).start()
    assert [r["request_id"] for r in stored(db_path)] == ["req-1"]


def test_close_without_start_keeps_queued_rows(db_path, make_tracker):
    tracker = make_tracker(db_path)
    tracker.record(rec(1))
    tracker.close()
    with pytest.raises(RuntimeError):
        tracker.start()
    make_tracker(db_path).start()
    assert [r["request_id"] for r in stored(db_path)] == ["req-1"]


# --- several processes ---------------------------------------------------------------------------

WORKERS, ROWS_EACH = 4, 500


def _worker(path, worker, barrier):
    """One gunicorn-like worker: its own tracker on the shared file, started all at once."""
    tracker = Tracker(path, batch_size=25, flush_interval=0.005)
    barrier.wait()
    tracker.start()
    for i in range(ROWS_EACH):
        tracker.record(rec(i, request_id=f"w{worker}-{i}"))
    ok = tracker.flush(timeout=60)
    tracker.close()
    os._exit(0 if ok else 1)


def test_several_processes_share_one_database(db_path):
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(WORKERS)
    procs = [ctx.Process(target=_worker, args=(db_path, w, barrier)) for w in range(WORKERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0] * WORKERS
    ids = [r["request_id"] for r in stored(db_path)]
    assert len(ids) == WORKERS * ROWS_EACH
    assert len(set(ids)) == WORKERS * ROWS_EACH
    assert spill_lines(db_path) == []


# --- tracker off ---------------------------------------------------------------------------------


def test_null_tracker_has_the_same_interface():
    null = NullTracker()
    null.start()
    null.record(rec(1))
    assert null.flush() is True
    assert set(null.stats()) == set(Tracker("unused.db").stats())
    null.close()
    null.close()
