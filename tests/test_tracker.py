"""The tracker: flush semantics, one transaction per batch, retries on a locked database,
spill and replay, draining on close, and several processes writing one file."""

import json
import multiprocessing
import os
import sqlite3

import pytest

from proxy.store import TrackerPathError, open_store
from proxy.store.sqlite import SCHEMA_VERSION, TABLE, SqliteStore
from proxy.tracker import NullTracker, Tracker
from proxy.usage import UsageRecord

from conftest import fill_filesystem, remount
from support.processes import wait_for


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
    """The rows in the database (none while it is still being created)."""
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(f"SELECT * FROM {TABLE} ORDER BY id")]
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return []
        raise
    finally:
        conn.close()


def spill_lines(path, name=None) -> list[str]:
    """Lines waiting in the spill directory of the database at `path` (or one named file)."""
    spill_dir = path + ".spill"
    if not os.path.isdir(spill_dir):
        return []
    names = [name] if name else [n for n in sorted(os.listdir(spill_dir)) if n != "rejected.jsonl"]
    lines = []
    for n in names:
        if os.path.exists(os.path.join(spill_dir, n)):
            with open(os.path.join(spill_dir, n), encoding="utf-8") as f:
                lines += [line for line in f if line.strip()]
    return lines


def rejected_lines(path) -> list[str]:
    return spill_lines(path, "rejected.jsonl")


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


def test_flush_is_true_with_nothing_pending_and_false_before_the_writer_starts(db_path, make_tracker):
    tracker = make_tracker(db_path)
    assert tracker.flush(timeout=0) is True  # not started, nothing recorded
    tracker.record(rec(1))
    assert tracker.flush(timeout=0.2) is False  # not started: nothing can commit it
    tracker.start()
    assert tracker.flush() is True
    assert tracker.flush(timeout=0) is True


def test_each_batch_is_one_transaction(db_path, make_tracker, monkeypatch):
    calls = []
    real_insert = SqliteStore.insert_rows

    def counting_insert(store, rows, only_new=False):
        calls.append(len(rows))
        return real_insert(store, rows, only_new)

    monkeypatch.setattr(SqliteStore, "insert_rows", counting_insert)
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
    assert tracker.stats()["state"] == "degraded" and tracker.stats()["fault"] == "locked"
    blocker.execute("COMMIT")
    blocker.close()
    assert tracker.flush(timeout=10) is True
    assert len(stored(db_path)) == 10
    stats = tracker.stats()
    assert stats["retries"] >= 1 and stats["spilled"] == 0 and stats["state"] == "ok"


def test_a_lasting_fault_moves_queued_rows_to_disk_and_recovery_replays_them(db_path, make_tracker):
    tracker = make_tracker(db_path, busy_timeout_ms=20, spill_after=0.2, batch_size=5)
    tracker.start()
    blocker = hold_write_lock(db_path)
    for i in range(5):
        tracker.record(rec(i))  # the batch the writer holds and retries
    wait_for(lambda: tracker.stats()["retries"] >= 1, "the first failed try")
    for i in range(5, 20):
        tracker.record(rec(i))  # queued behind it
    assert tracker.stats()["queued"] == 20  # in memory while the fault is young
    # once it has lasted spill_after, the held batch and the queue go to disk
    wait_for(lambda: len(spill_lines(db_path)) == 20, "20 rows in the spill directory")
    stats = tracker.stats()
    assert (stats["state"], stats["queued"], stats["spilled"], stats["dropped"]) == ("degraded", 0, 20, 0)
    blocker.execute("ROLLBACK")
    blocker.close()
    # no restart: the held batch commits, then the writer replays the spill directory
    wait_for(lambda: len(stored(db_path)) == 20, "all 20 rows in the database")
    assert sorted(r["request_id"] for r in stored(db_path)) == sorted(f"req-{i}" for i in range(20))
    # the replayed file is removed just after its rows commit
    wait_for(lambda: spill_lines(db_path) == [], "the spill directory emptied")
    assert tracker.stats()["state"] == "ok" and tracker.stats()["replayed"] == 20


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


def test_replay_moves_unreadable_lines_aside(db_path, make_tracker):
    os.makedirs(db_path + ".spill")
    with open(db_path + ".spill/spill.jsonl", "w", encoding="utf-8") as f:
        f.write(json.dumps(rec(1).to_row()) + "\n")
        f.write("{half a line\n\n")
        f.write("[1, 2]\n")
        f.write(json.dumps({"request_id": "old-format", "started_at": 5.0}) + "\n")
    tracker = make_tracker(db_path)
    tracker.start()
    assert tracker.flush()
    assert [r["request_id"] for r in stored(db_path)] == ["req-1", "old-format"]
    assert tracker.stats()["replayed"] == 2 and tracker.stats()["rejected"] == 2
    assert spill_lines(db_path) == []
    assert rejected_lines(db_path) == ["{half a line\n", "[1, 2]\n"]
    tracker.close()
    again = make_tracker(db_path)  # moved aside: never retried
    again.start()
    assert again.flush() and again.stats()["replayed"] == 0
    assert len(stored(db_path)) == 2


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
    again = make_tracker(db_path)
    again.start()
    assert again.flush()
    assert [r["request_id"] for r in stored(db_path)] == ["req-1"]


def test_close_without_start_keeps_queued_rows(db_path, make_tracker):
    tracker = make_tracker(db_path)
    tracker.record(rec(1))
    tracker.close()
    with pytest.raises(RuntimeError):
        tracker.start()
    again = make_tracker(db_path)
    again.start()
    assert again.flush()
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


# --- any text, any number: no row can fail the others ---------------------------------------------

POISON_TEXT = "x\ud800y\x00z\udfff"  # lone surrogates (json.loads accepts "\ud800") and a NUL


def test_any_text_and_number_is_storable(db_path, make_tracker):
    tracker = make_tracker(db_path)
    tracker.start()
    huge = "m" * 30_000_000
    tracker.record(rec(1, model_requested=POISON_TEXT, error="boom \ud800\n" + "e" * 5000))
    tracker.record(rec(2, model_requested=huge, upstream_model=json.loads('"\\ud800"')))
    tracker.record(rec(3, input_tokens=10 ** 30, output_tokens=-(10 ** 40)))
    tracker.record(rec(4))  # an ordinary row in the same batch
    assert tracker.flush() is True
    rows = {r["request_id"]: r for r in stored(db_path)}
    assert set(rows) == {"req-1", "req-2", "req-3", "req-4"}
    assert rows["req-1"]["model_requested"] == "x\ufffdy\ufffdz\ufffd"
    assert rows["req-1"]["error"].startswith("boom \ufffd\n")
    assert rows["req-1"]["error"].endswith("...[3007 more characters]")
    assert len(rows["req-2"]["model_requested"]) < 400
    assert rows["req-2"]["model_requested"].endswith(f"...[{30_000_000 - 256} more characters]")
    assert rows["req-2"]["upstream_model"] == "\ufffd"
    assert (rows["req-3"]["input_tokens"], rows["req-3"]["output_tokens"]) == (None, None)
    assert tracker.stats()["spilled"] == tracker.stats()["dropped"] == 0


def refuse_rows_with_request_id(path, request_id) -> None:
    """A database that will never take one row, whatever the tracker does (think: a bug)."""
    make = Tracker(path)
    make.start()
    make.close()
    conn = sqlite3.connect(path)
    conn.execute(f"CREATE TRIGGER refuse BEFORE INSERT ON {TABLE} WHEN NEW.request_id = '{request_id}' "
                 "BEGIN SELECT RAISE(ABORT, 'refused'); END")
    conn.commit()
    conn.close()


def test_a_row_the_database_refuses_is_moved_aside_and_the_batch_is_stored(db_path, make_tracker):
    refuse_rows_with_request_id(db_path, "req-3")
    tracker = make_tracker(db_path, batch_size=10)
    for i in range(10):
        tracker.record(rec(i))  # one batch of 10, req-3 in the middle
    tracker.start()
    assert tracker.flush() is True
    assert sorted(r["request_id"] for r in stored(db_path)) == [f"req-{i}" for i in range(10) if i != 3]
    [aside] = rejected_lines(db_path)
    assert json.loads(aside)["request_id"] == "req-3"
    assert tracker.stats()["rejected"] == 1 and tracker.stats()["dropped"] == 0
    tracker.record(rec(20))  # and the tracker goes on
    assert tracker.flush() is True


def test_spilled_poison_lines_are_replayed_or_moved_aside_never_retried(db_path, make_tracker):
    refuse_rows_with_request_id(db_path, "refused")
    os.makedirs(db_path + ".spill")
    with open(db_path + ".spill/spill.jsonl", "w", encoding="ascii") as f:
        # what a proxy before this fix wrote: a JSON-escaped lone surrogate, a NUL, a huge int
        f.write('{"request_id": "surrogate", "model_requested": "x\\ud800", "error": "a\\u0000b"}\n')
        f.write('{"request_id": "big", "input_tokens": 1e30, "output_tokens": 123456789012345678901234}\n')
        f.write(json.dumps(rec(1, request_id="refused").to_row()) + "\n")
        f.write(json.dumps(rec(2).to_row()) + "\n")
    tracker = make_tracker(db_path)
    tracker.start()
    assert tracker.flush()
    rows = {r["request_id"]: r for r in stored(db_path)}
    assert set(rows) == {"surrogate", "big", "req-2"}
    assert rows["surrogate"]["model_requested"] == "x\ufffd" and rows["surrogate"]["error"] == "a\ufffdb"
    assert rows["big"]["output_tokens"] is None
    assert [json.loads(line)["request_id"] for line in rejected_lines(db_path)] == ["refused"]
    assert spill_lines(db_path) == []
    tracker.close()
    again = make_tracker(db_path)  # the next start has nothing to retry
    again.start()
    again.record(rec(3))
    assert again.flush() is True
    assert again.stats()["replayed"] == 0 and len(stored(db_path)) == 4


# --- the store fails: at start, mid-run --------------------------------------------------------------


def test_a_path_that_cannot_hold_a_database_is_a_start_up_error(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where a directory should be")
    with pytest.raises(TrackerPathError, match="not-a-dir"):
        open_store(str(blocker / "usage.db")).check()
    (tmp_path / "a-dir.db").mkdir()
    with pytest.raises(TrackerPathError, match="a-dir.db"):
        open_store(str(tmp_path / "a-dir.db")).check()
    (tmp_path / "junk.db").write_bytes(b"this is not a database, just sixteen+ bytes of junk" * 100)
    with pytest.raises(TrackerPathError, match="junk.db"):
        open_store(str(tmp_path / "junk.db")).check()
    assert open_store(str(tmp_path / "fine" / "usage.db")).check() is None


def test_a_database_that_cannot_be_opened_keeps_rows_until_it_can(tmp_path, make_tracker):
    blocker = tmp_path / "data"
    blocker.write_text("a file where the database directory should be")
    db = str(blocker / "usage.db")
    tracker = make_tracker(db, spill_dir=str(tmp_path / "spill"), spill_after=0.1)
    tracker.start()  # no exception: requests must keep flowing
    for i in range(30):
        tracker.record(rec(i))
    assert tracker.stats()["state"] == "degraded" and tracker.stats()["fault"] == "cannot_open"
    wait_for(lambda: tracker.stats()["spilled"] >= 1, "rows moved to the spill directory")
    blocker.unlink()  # the operator fixes the path
    wait_for(lambda: os.path.exists(db) and len(stored(db)) == 30, "all rows stored", timeout=15)
    assert tracker.stats()["state"] == "ok" and tracker.stats()["dropped"] == 0


def test_a_full_disk_mid_run_loses_no_row(small_fs, tmp_path, make_tracker):
    db = str(small_fs / "usage.db")
    tracker = make_tracker(db, spill_dir=str(tmp_path / "spill"), spill_after=0.2, batch_size=20)
    tracker.start()
    tracker.record(rec(0))
    assert tracker.flush()
    filler = fill_filesystem(small_fs)
    for i in range(1, 301):
        tracker.record(rec(i, error="x" * 500))
    wait_for(lambda: tracker.stats().get("fault") == "disk_full", "the full disk to be seen")
    wait_for(lambda: tracker.stats()["spilled"] == 300, "rows moved to the other filesystem")
    assert tracker.stats()["dropped"] == 0 and tracker.stats()["state"] == "degraded"
    os.remove(filler)
    wait_for(lambda: len(stored(db)) == 301, "all 301 rows in the database", timeout=20)
    assert sorted(r["request_id"] for r in stored(db)) == sorted(f"req-{i}" for i in range(301))
    stats = tracker.stats()
    assert (stats["state"], stats["dropped"], stats["spill_bytes"]) == ("ok", 0, 0)


def test_a_read_only_database_directory_loses_no_row(small_fs, tmp_path, make_tracker):
    db = str(small_fs / "usage.db")
    first = make_tracker(db)
    first.start()
    first.record(rec(0))
    assert first.flush()
    first.close()
    remount(small_fs, "ro")  # (a filesystem with open writable files cannot be remounted)
    with pytest.raises(TrackerPathError, match="usage2.db"):
        open_store(str(small_fs / "usage2.db")).check()  # the master's start-up check
    tracker = make_tracker(db, spill_dir=str(tmp_path / "spill"), spill_after=0.2)
    tracker.start()  # a worker: no exception, rows wait
    for i in range(1, 101):
        tracker.record(rec(i))
    wait_for(lambda: tracker.stats()["spilled"] == 100, "rows moved to the spill directory")
    assert tracker.stats()["state"] == "degraded" and tracker.stats()["dropped"] == 0
    remount(small_fs, "rw")
    wait_for(lambda: len(stored(db)) == 101, "all 101 rows in the database", timeout=20)
    assert tracker.stats()["state"] == "ok" and tracker.stats()["dropped"] == 0


def test_a_row_is_dropped_only_when_every_bound_is_exhausted_and_then_loudly(tmp_path, make_tracker,
                                                                           caplog):
    blocker = tmp_path / "file"
    blocker.write_text("a file where both directories should be")
    tracker = make_tracker(str(blocker / "usage.db"), spill_dir=str(blocker / "spill"),
                           queue_max=5, spill_after=0)
    tracker.start()
    with caplog.at_level("ERROR", logger="proxy.tracker"):
        for i in range(20):
            tracker.record(rec(i, model_requested=f"model-{i}"))
        wait_for(lambda: tracker.stats()["dropped"] == 20, "every row counted as dropped")
    stats = tracker.stats()
    assert (stats["state"], stats["spilled"], stats["queued"]) == ("degraded", 0, 0)
    lost = [r.getMessage() for r in caplog.records if "usage row lost" in r.getMessage()]
    assert len(lost) == 20 and all('"request_id": "req-' in m for m in lost)  # the row, in the log


def test_a_corrupted_database_is_a_fault_rows_wait_and_are_not_moved_aside(db_path, make_tracker):
    """"database disk image is malformed" is a DatabaseError but not an OperationalError:
    still the store's fault, not the rows'."""
    tracker = make_tracker(db_path, spill_after=0.2, batch_size=5)
    tracker.start()
    tracker.record(rec(0))
    assert tracker.flush()
    checkpoint = sqlite3.connect(db_path)  # the pages leave the WAL for the database file...
    checkpoint.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    checkpoint.close()
    with open(db_path, "r+b") as f:  # ...which is then scribbled over, all but its header
        f.seek(100)
        f.write(b"\xa5" * (os.path.getsize(db_path) - 100))
    for i in range(1, 11):
        tracker.record(rec(i))
    wait_for(lambda: tracker.stats()["spilled"] == 10, "rows waiting in the spill directory")
    stats = tracker.stats()
    assert (stats["state"], stats["fault"], stats["rejected"], stats["dropped"]) == \
        ("degraded", "corrupt", 0, 0)
    assert rejected_lines(db_path) == []


def test_a_spill_directory_that_refuses_a_rename_does_not_stop_the_writer(db_path, make_tracker,
                                                                         small_fs):
    """Claiming spilled rows renames a file; on a read-only spill directory that fails, and
    the writer must go on storing new rows (it used to die, and rows piled up until restart)."""
    spill = small_fs / "spill"
    spill.mkdir()
    (spill / "spill.jsonl").write_text(json.dumps(rec(0).to_row()) + "\n")
    remount(small_fs, "ro")
    tracker = make_tracker(db_path, spill_dir=str(spill))
    tracker.start()
    for i in range(1, 6):
        tracker.record(rec(i))
    assert tracker.flush(timeout=10) is True
    assert sorted(r["request_id"] for r in stored(db_path)) == [f"req-{i}" for i in range(1, 6)]
    remount(small_fs, "rw")  # once it can, the writer replays what waited there
    wait_for(lambda: len(stored(db_path)) == 6, "the spilled row replayed", timeout=15)


def test_the_tracker_that_is_off_has_nothing_to_wait_for():
    from proxy.tracker import NullTracker

    assert NullTracker().wait_for_count("written", 1, timeout=0) is False
    assert NullTracker().wait_for_count("written", 0, timeout=0) is True
