"""The usage store's SQLite implementation through its interface: schema migration, inserts
with and without dedup on the request id, and which failures are the store's (a fault that
may clear, named by its kind) and which are a row's."""

import errno
import os
import sqlite3

import pytest

from proxy.store import RowRejected, StoreFault, UsageStore, open_store
from proxy.store.sqlite import MIGRATIONS, SCHEMA_VERSION, TABLE, connect, fault_kind, migrate
from proxy.tracker import to_storage_row
from proxy.usage import UsageRecord

from conftest import fill_filesystem, remount


def row(request_id: str, **fields) -> dict:
    return to_storage_row(UsageRecord(request_id=request_id, started_at=1_763_700_000.0,
                                      endpoint="anthropic", **fields))


def stored_ids(path) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return [r for (r,) in conn.execute(f"SELECT request_id FROM {TABLE} ORDER BY id")]
    finally:
        conn.close()


@pytest.fixture
def store(tmp_path):
    opened = open_store(str(tmp_path / "data" / "usage.db"))
    yield opened
    opened.close()


def test_open_store_picks_sqlite_for_a_path_and_opens_nothing_yet(tmp_path):
    store = open_store(str(tmp_path / "usage.db"))
    assert isinstance(store, UsageStore) and type(store).__name__ == "SqliteStore"
    assert not (tmp_path / "usage.db").exists()


# --- schema --------------------------------------------------------------------------------------


def test_migrate_is_idempotent(tmp_path):
    conn = connect(str(tmp_path / "usage.db"))
    try:
        assert migrate(conn) == 0  # the version it found
        assert migrate(conn) == SCHEMA_VERSION  # nothing left to do, and no error
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        conn.close()


def test_migrate_upgrades_an_older_schema_and_keeps_its_rows(tmp_path):
    path = str(tmp_path / "usage.db")
    conn = connect(path)
    for statement in MIGRATIONS[0]:
        conn.execute(statement)
    conn.execute(f"INSERT INTO {TABLE} (request_id) VALUES ('old')")
    conn.execute("PRAGMA user_version = 1")
    try:
        assert migrate(conn) == 1
        columns = {r[1] for r in conn.execute(f"PRAGMA table_info({TABLE})")}
    finally:
        conn.close()
    assert "attempt_log" in columns and stored_ids(path) == ["old"]


def test_opening_twice_and_two_stores_on_one_file_migrate_once(tmp_path):
    path = str(tmp_path / "usage.db")
    first, second = open_store(path), open_store(path)
    try:
        first.open()
        first.open()
        second.open()  # would fail on "table already exists" if it migrated again
        assert second.insert_rows([row("a")]) == 1
    finally:
        first.close()
        second.close()


# --- inserts -------------------------------------------------------------------------------------


def test_insert_stores_every_row_and_only_new_skips_stored_request_ids(store):
    assert store.insert_rows([row("a"), row("b")]) == 2
    assert store.insert_rows([row("b"), row("c")], only_new=True) == 1
    assert store.insert_rows([row("a"), row("b"), row("c")], only_new=True) == 0
    assert stored_ids(store.path) == ["a", "b", "c"]
    assert store.insert_rows([row("c")]) == 1  # without only_new a replay is not checked
    assert stored_ids(store.path) == ["a", "b", "c", "c"]


def test_a_row_the_database_refuses_fails_its_batch_alone_and_the_store_goes_on(store):
    store.insert_rows([row("first")])
    conn = sqlite3.connect(store.path)
    conn.execute(f"CREATE TRIGGER refuse BEFORE INSERT ON {TABLE} WHEN NEW.request_id = 'bad' "
                 "BEGIN SELECT RAISE(ABORT, 'constraint failed: refused'); END")
    conn.commit()
    conn.close()
    with pytest.raises(RowRejected):
        store.insert_rows([row("good"), row("bad")])
    assert stored_ids(store.path) == ["first"]  # all or nothing
    assert store.insert_rows([row("good")]) == 1  # same connection, still fine


def test_a_value_sqlite_cannot_bind_is_the_rows_fault(store):
    with pytest.raises(RowRejected):
        store.insert_rows([{**row("x"), "input_tokens": object()}])
    assert store.insert_rows([row("y")]) == 1


# --- faults --------------------------------------------------------------------------------------


@pytest.mark.parametrize("exc, kind", [
    (OSError(errno.ENOSPC, "No space left on device"), "disk_full"),
    (OSError(errno.EROFS, "Read-only file system"), "read_only"),
    (OSError(errno.EACCES, "Permission denied"), "read_only"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory"), "cannot_open"),
    (sqlite3.OperationalError("database is locked"), "locked"),
    (sqlite3.OperationalError("database or disk is full"), "disk_full"),
    (sqlite3.OperationalError("attempt to write a readonly database"), "read_only"),
    (sqlite3.OperationalError("unable to open database file"), "cannot_open"),
    (sqlite3.DatabaseError("file is not a database"), "not_a_database"),
    (sqlite3.DatabaseError("database disk image is malformed"), "corrupt"),
    (sqlite3.OperationalError("disk I/O error"), "io_error"),
    (sqlite3.OperationalError("something new"), "error"),
])
def test_fault_kind_names_what_an_error_says_of_the_database(exc, kind):
    assert fault_kind(exc) == kind


def test_a_database_directory_that_cannot_exist_is_a_fault(tmp_path):
    blocker = tmp_path / "data"
    blocker.write_text("a file where the database directory should be")
    store = open_store(str(blocker / "usage.db"))
    with pytest.raises(StoreFault) as fault:
        store.insert_rows([row("a")])
    assert fault.value.kind == "cannot_open"
    blocker.unlink()  # the operator fixes the path: the same store works
    assert store.insert_rows([row("a")]) == 1
    store.close()


def test_a_full_disk_is_a_disk_full_fault_and_the_store_recovers(small_fs):
    store = open_store(str(small_fs / "usage.db"))
    store.insert_rows([row("first")])
    filler = fill_filesystem(small_fs)
    with pytest.raises(StoreFault) as fault:
        for i in range(100):  # a page or two may still fit
            store.insert_rows([row(f"r{i}-{j}", error="x" * 2000) for j in range(20)])
    assert fault.value.kind == "disk_full"
    os.remove(filler)
    assert store.insert_rows([row("after")]) == 1
    store.close()


def test_a_read_only_filesystem_is_a_fault_that_clears(small_fs):
    path = str(small_fs / "usage.db")
    store = open_store(path)
    store.insert_rows([row("first")])
    store.close()
    remount(small_fs, "ro")
    with pytest.raises(StoreFault) as fault:
        store.insert_rows([row("second")])
    # Not "read_only": a WAL database needs its shared-memory file, which a read-only
    # filesystem cannot hold, so SQLite cannot open the database at all.
    assert fault.value.kind == "cannot_open"
    with pytest.raises(StoreFault):
        store.totals(None, None)  # nor read it
    remount(small_fs, "rw")
    assert store.insert_rows([row("second")]) == 1
    store.close()
    assert stored_ids(path) == ["first", "second"]


def test_after_a_fault_the_store_reconnects_so_a_replaced_file_is_used(tmp_path, store):
    """An operator restores a corrupted database by putting a good file in its place: a
    connection kept across the fault would still point at the old file, for ever."""
    store.insert_rows([row("before")])
    checkpoint = sqlite3.connect(store.path)  # the pages leave the WAL for the database file...
    checkpoint.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    checkpoint.close()
    with open(store.path, "r+b") as f:  # ...which is then scribbled over, all but its header
        f.seek(100)
        f.write(b"\xa5" * (os.path.getsize(store.path) - 100))
    with pytest.raises(StoreFault) as fault:
        store.insert_rows([row("during")])
    assert fault.value.kind == "corrupt"
    good = open_store(str(tmp_path / "good.db"))
    good.open()
    good.close()
    os.replace(tmp_path / "good.db", store.path)
    assert store.insert_rows([row("after")]) == 1
    assert stored_ids(store.path) == ["after"]


# --- reads ---------------------------------------------------------------------------------------


def test_reading_a_missing_database_finds_no_rows_and_creates_nothing(tmp_path):
    store = open_store(str(tmp_path / "usage.db"))
    assert store.totals(None, None)["requests"] == 0
    assert store.breakdown("model", None, None, top=3) == {}
    assert store.group_count("client_key", None, None) == 0
    store.close()
    assert not (tmp_path / "usage.db").exists()


def test_a_corrupt_database_is_a_fault_for_the_reader_too(tmp_path):
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not a database, just sixteen+ bytes of junk" * 100)
    store = open_store(str(path))
    with pytest.raises(StoreFault) as fault:
        store.totals(None, None)
    assert fault.value.kind == "not_a_database"
    store.close()


def test_rows_stored_before_continuations_existed_count_none(tmp_path):
    conn = connect(str(tmp_path / "u.db"))
    for statement in MIGRATIONS[0] + MIGRATIONS[1]:
        conn.execute(statement)
    conn.execute(f"INSERT INTO {TABLE} (request_id) VALUES ('old')")
    conn.execute("PRAGMA user_version = 2")
    migrate(conn)
    assert conn.execute(f"SELECT continuations, continuation_cost_usd FROM {TABLE}").fetchone() == (0, None)
    conn.close()


def test_a_database_from_before_continuations_can_be_reported_without_migrating(tmp_path):
    """The report reads, never migrates: a database the upgraded server has not written to
    yet reads as if the new columns held nothing."""
    path = str(tmp_path / "v2.db")
    conn = connect(path)
    for statement in MIGRATIONS[0] + MIGRATIONS[1]:
        conn.execute(statement)
    conn.execute(f"INSERT INTO {TABLE} (request_id, input_tokens, end_reason) VALUES ('old', 5, 'complete')")
    conn.execute("PRAGMA user_version = 2")
    conn.commit()
    conn.close()
    store = open_store(path)
    try:
        totals = store.totals(None, None)
        assert (totals["requests"], totals["input_tokens"], totals["continued_requests"]) == (1, 5, 0)
        (row,) = store.rows()
        assert (row["request_id"], row["continuations"], row["continuation_cost_usd"]) == ("old", 0, None)
    finally:
        store.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 2  # not migrated by reading
    conn.close()


def test_only_new_stores_a_request_id_met_twice_in_one_batch_once_the_first_as_it_came(store):
    """With only_new (a retried batch, a replayed spill file) a row may come twice in one
    batch: it is stored once, the first copy, and its rollup counts it once."""
    assert store.insert_rows([row("d", status=200), row("d", status=500), row("e")],
                             only_new=True) == 2
    assert stored_ids(store.path) == ["d", "e"]
    conn = sqlite3.connect(store.path)
    try:
        assert conn.execute(f"SELECT status FROM {TABLE} WHERE request_id = 'd'").fetchall() == [
            (200,)]
    finally:
        conn.close()
    assert sum(r["requests"] for r in store.hourly(0, 2e9, ())) == 2
