"""The usage tracker: request threads enqueue rows, one writer thread stores them in SQLite.

Design (design.md §5). Request threads must never wait on a disk or a lock held by another
process, so ``record`` only puts a row on a bounded queue. One daemon thread per process owns
the database connection: it takes up to ``batch_size`` rows (waiting at most
``flush_interval`` for more after the first) and commits each batch in one transaction.

Nothing is dropped on the way:

- the queue is bounded; when it is full (or the tracker is closed) the row is appended as a
  JSON line to ``<db>.spill.jsonl`` beside the database;
- a batch that fails (typically ``database is locked`` while another worker holds the write
  lock past ``busy_timeout``) is retried with backoff; after ``max_batch_tries`` it too goes to
  the spill file and an error is logged;
- ``start`` replays the spill file into the database, then truncates it.

Several processes (gunicorn workers) share one file safely: WAL mode lets readers and one
writer work together, ``BEGIN IMMEDIATE`` takes the write lock up front (so no transaction
has to upgrade a read lock and fail without waiting), ``busy_timeout`` makes writers queue
for each other, and the spill file is guarded by ``flock`` as well as a thread lock.

The schema is versioned with ``PRAGMA user_version`` and migrated on start, under a write
lock so that workers starting together migrate once.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import sqlite3
import threading
import time
from typing import Any, Iterable, Mapping

from .usage import RECORD_FIELDS, UsageRecord

try:  # POSIX only; elsewhere the spill file is guarded within one process.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

log = logging.getLogger(__name__)

TABLE = "usage_records"

# Each entry upgrades the schema by one version; never edit a released entry, append a new one.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        f"""CREATE TABLE {TABLE} (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            request_id TEXT, started_at REAL, ended_at REAL, ttfb_ms REAL, ttft_ms REAL,
            endpoint TEXT, model_requested TEXT, deployment TEXT, upstream_model TEXT,
            attempts INTEGER, fallbacks INTEGER, status INTEGER, end_reason TEXT,
            stop_reason TEXT, input_tokens INTEGER, output_tokens INTEGER,
            cache_read_tokens INTEGER, cache_write_tokens INTEGER, reasoning_tokens INTEGER,
            cost_usd REAL, priced INTEGER, usage_complete INTEGER, client_key_id TEXT,
            bytes_in INTEGER, bytes_out INTEGER, error TEXT, stream INTEGER
        )""",
        f"CREATE INDEX {TABLE}_started_at ON {TABLE} (started_at)",
        f"CREATE INDEX {TABLE}_model ON {TABLE} (upstream_model, model_requested)",
        f"CREATE INDEX {TABLE}_client_key ON {TABLE} (client_key_id, started_at)",
        f"CREATE INDEX {TABLE}_end_reason ON {TABLE} (end_reason, started_at)",
        f"CREATE INDEX {TABLE}_request_id ON {TABLE} (request_id)",
    ),
    # v2: failed tries (deployment, why, input tokens seen) before the one that answered.
    (f"ALTER TABLE {TABLE} ADD COLUMN attempt_log TEXT",),
)
SCHEMA_VERSION = len(MIGRATIONS)

_INSERT = "INSERT INTO {table} ({cols}) VALUES ({params})".format(
    table=TABLE,
    cols=", ".join(RECORD_FIELDS),
    params=", ".join(f":{name}" for name in RECORD_FIELDS),
)
_DEFAULT_ROW = UsageRecord().to_row()
_STOP = object()  # queued by close(): the writer drains what is ahead of it, then exits
_IDLE_POLL = 1.0  # seconds an idle writer sleeps before re-checking for close


# ---------------------------------------------------------------------------------------------
# Database helpers, shared with the report.


def connect(db_path: str, busy_timeout_ms: int = 5000) -> sqlite3.Connection:
    """Open ``db_path`` in WAL mode with a busy timeout, in autocommit (explicit BEGIN) mode."""
    conn = sqlite3.connect(
        db_path,
        timeout=busy_timeout_ms / 1000.0,
        isolation_level=None,
        check_same_thread=False,  # opened by start(), then owned by the writer thread alone
    )
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        _retry_locked(lambda: conn.execute("PRAGMA journal_mode = WAL").fetchone())
        conn.execute("PRAGMA synchronous = NORMAL")
    except BaseException:
        conn.close()
        raise
    return conn


def _retry_locked(action, tries: int = 20):
    """Switching to WAL needs a moment of exclusive access; workers starting together wait."""
    for attempt in range(tries):
        try:
            return action()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc) or attempt == tries - 1:
                raise
            time.sleep(0.01 * (attempt + 1))
    return None


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema to ``SCHEMA_VERSION`` under a write lock; returns the version found."""
    found = _user_version(conn)
    if found >= SCHEMA_VERSION:
        _warn_if_newer(found)
        return found
    conn.execute("BEGIN IMMEDIATE")
    try:
        found = _user_version(conn)  # another worker may have migrated while we waited
        for statements in MIGRATIONS[found:]:
            for statement in statements:
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise
    return found


def _user_version(conn: sqlite3.Connection) -> int:
    return conn.execute("PRAGMA user_version").fetchone()[0]


def _warn_if_newer(found: int) -> None:
    if found > SCHEMA_VERSION:
        log.warning("usage database schema v%d is newer than this proxy's v%d",
                    found, SCHEMA_VERSION)


def insert_rows(conn: sqlite3.Connection, rows: list[dict]) -> None:
    """Insert ``rows`` in one transaction: all of them are stored, or none."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.executemany(_INSERT, rows)
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise


def _rollback(conn: sqlite3.Connection) -> None:
    try:
        conn.execute("ROLLBACK")
    except sqlite3.Error:
        pass  # nothing was open, or the connection is gone: either way nothing was written


# ---------------------------------------------------------------------------------------------
# Rows.


def _scalar(value: Any) -> Any:
    """SQLite and JSON both take these; anything else is stored as its text."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def to_storage_row(rec: UsageRecord | Mapping[str, Any]) -> dict:
    """A complete, storable row from a record (or a spilled dict); missing fields defaulted."""
    row = rec.to_row() if isinstance(rec, UsageRecord) else dict(rec)
    return {name: _scalar(row.get(name, _DEFAULT_ROW[name])) for name in RECORD_FIELDS}


# ---------------------------------------------------------------------------------------------
# The spill file.


class SpillFile:
    """JSON lines beside the database for rows that could not be queued or committed.

    Appends and the replay take an exclusive ``flock`` on the file itself, so workers never
    interleave lines or lose an append during a replay. The replay truncates rather than
    deletes, so a process already waiting on the lock appends to the live file. (An append can
    therefore wait while another worker replays at start: rare, short, and only on overflow.)
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()

    def append(self, rows: Iterable[dict]) -> None:
        """Append rows; raises OSError if the disk refuses (callers log and count that)."""
        text = "".join(json.dumps(row, default=str) + "\n" for row in rows)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with self._lock, open(self.path, "a", encoding="utf-8") as f:
            _flock(f)
            f.write(text)
            f.flush()

    def replay(self, store) -> int:
        """Hand every spilled row to ``store`` (one call), then truncate; returns the count.

        If ``store`` raises, the file is kept for the next start.
        """
        if not os.path.exists(self.path):
            return 0
        with self._lock, open(self.path, "a+", encoding="utf-8") as f:
            _flock(f)
            f.seek(0)
            rows = _parse_spill_lines(f, self.path)
            if rows:
                store(rows)
            f.truncate(0)
        return len(rows)


def _flock(f) -> None:
    if fcntl is not None:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # released when the file is closed


def _parse_spill_lines(lines: Iterable[str], path: str) -> list[dict]:
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(to_storage_row(json.loads(line)))
        except (ValueError, TypeError, AttributeError):
            log.error("%s:%d: unreadable spilled usage row skipped: %.200s", path, number, line)
    return rows


# ---------------------------------------------------------------------------------------------
# The tracker.


class Tracker:
    """Stores ``UsageRecord`` rows in SQLite from one background writer thread per process.

    ``record`` never blocks and never raises. ``flush`` waits for rows already recorded;
    ``close`` drains everything and stops (call it from gunicorn's worker_exit and atexit;
    it is idempotent). Start it in each worker process, after any fork.
    """

    def __init__(
        self,
        db_path: str,
        batch_size: int = 200,
        flush_interval: float = 0.05,
        queue_max: int = 10000,
        busy_timeout_ms: int = 5000,
        max_batch_tries: int = 10,
    ) -> None:
        self.db_path = db_path
        self.spill = SpillFile(db_path + ".spill.jsonl")
        self.batch_size = max(1, int(batch_size))
        self.flush_interval = flush_interval
        self.busy_timeout_ms = busy_timeout_ms
        self.max_batch_tries = max(1, int(max_batch_tries))
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, int(queue_max)))
        self._cond = threading.Condition()
        self._state_lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        # Set when waiting longer for a batch is pointless: a full batch is queued, a flush
        # is waiting, or the tracker is closing.  The writer then wakes once per batch, not
        # once per row (each wake-up costs the request threads the GIL).
        self._hurry = threading.Event()
        self._closed = False
        self._writer_done = False
        self._give_up_at: float | None = None
        # Sequence numbers: rows are numbered as they are queued; the writer handles them in
        # that order, so "every row queued before flush() is done" is one comparison.
        self._enqueued = 0
        self._done = 0
        self._failed_ranges: list[tuple[int, int]] = []
        self._counts = dict.fromkeys(
            ("written", "spilled", "failed_batches", "retries", "batches", "replayed", "dropped"), 0
        )

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Open and migrate the database, replay spilled rows, start the writer thread."""
        with self._state_lock:
            if self._closed:
                raise RuntimeError("usage tracker is closed")
            if self._thread is not None:
                return
            directory = os.path.dirname(os.path.abspath(self.db_path))
            os.makedirs(directory, exist_ok=True)
            conn = connect(self.db_path, self.busy_timeout_ms)
            try:
                migrate(conn)
                self._replay_spill(conn)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
            self._thread = threading.Thread(target=self._run, name="usage-tracker", daemon=True)
            self._thread.start()

    def _replay_spill(self, conn: sqlite3.Connection) -> None:
        try:
            count = self.spill.replay(lambda rows: insert_rows(conn, rows))
        except (OSError, sqlite3.Error) as exc:
            log.error("could not replay spilled usage rows from %s (kept): %s",
                      self.spill.path, exc)
            return
        if count:
            log.info("replayed %d spilled usage rows from %s", count, self.spill.path)
            self._count("replayed", count)

    def close(self, timeout: float = 10.0) -> None:
        """Drain the queue, commit, stop the writer and close the database. Idempotent.

        Rows still queued when ``timeout`` runs out go to the spill file, not to waste.
        """
        with self._cond:
            if self._closed:
                return
            self._closed = True  # from now on record() spills instead of queueing
        deadline = time.monotonic() + timeout
        if self._thread is not None:
            self._stop_writer(deadline)
        self._spill_leftovers()

    def _stop_writer(self, deadline: float) -> None:
        # Leave the last failing try time to finish and spill before the caller's deadline.
        margin = self.busy_timeout_ms / 1000.0 + 0.5
        self._give_up_at = max(deadline - margin, time.monotonic())
        self._closing.set()
        self._hurry.set()
        try:
            self._queue.put(_STOP, timeout=max(deadline - time.monotonic(), 0.0))
        except queue.Full:
            pass  # the writer also notices _closing once the queue runs dry
        self._thread.join(max(deadline - time.monotonic(), 0.0))
        if self._thread.is_alive():
            log.error("usage writer did not stop in time; queued rows go to %s", self.spill.path)

    def _spill_leftovers(self) -> None:
        rows = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                rows.append(item)
        if rows:
            self._spill_rows(rows, "tracker closed")
            self._mark_done(rows, ok=False)

    # -- request side ---------------------------------------------------------------------------

    def record(self, rec: UsageRecord) -> None:
        """Queue one row for storage; spills to disk if the queue is full. Never raises."""
        try:
            row = to_storage_row(rec)
        except Exception:
            log.exception("unusable usage record dropped: %r", rec)
            self._count("dropped", 1)
            return
        try:
            with self._cond:
                if not self._closed:
                    self._queue.put_nowait(row)
                    self._enqueued += 1
                    if self._queue.qsize() >= self.batch_size:
                        self._hurry.set()
                    return
            reason = "tracker closed"
        except queue.Full:
            reason = "queue full"
        self._spill_rows([row], reason)

    def flush(self, timeout: float = 5.0) -> bool:
        """True once every row recorded before this call is committed to the database.

        False on timeout, if the writer is not running, or if some of those rows had to be
        spilled after repeated failures (they are safe on disk, not yet in the database).
        """
        with self._cond:
            target, before = self._enqueued, self._done
            running = self._thread is not None and not self._writer_done
            if running:
                self._hurry.set()
                self._cond.wait_for(lambda: self._done >= target or self._writer_done, timeout)
            return self._done >= target and not self._failed_since(before, target)

    def _failed_since(self, after: int, upto: int) -> bool:
        return any(lo <= upto and hi > after for lo, hi in self._failed_ranges)

    def stats(self) -> dict:
        """Counters for /health: queued, written, spilled, failed_batches and more."""
        with self._cond:
            return {"queued": self._queue.qsize(), **self._counts}

    # -- writer thread --------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                batch, stop = self._next_batch()
                if batch:
                    self._mark_done(batch, ok=self._commit(batch))
                if stop:
                    break
        except Exception:  # a bug here must not leave flush() waiting forever
            log.exception("usage writer thread crashed")
        finally:
            self._conn.close()
            with self._cond:
                self._writer_done = True
                self._cond.notify_all()

    def _next_batch(self) -> tuple[list[dict], bool]:
        """Up to batch_size rows: block for the first, then wait at most flush_interval
        (less when a batch is full or someone is flushing) and take what is there."""
        first = self._get(_IDLE_POLL)
        if first is None:
            return [], self._closing.is_set()
        if first is _STOP:
            return [], True
        batch = [first]
        self._hurry.wait(self.flush_interval)
        self._hurry.clear()
        while len(batch) < self.batch_size:
            item = self._get(0)
            if item is None:
                break
            if item is _STOP:
                return batch, True
            batch.append(item)
        if self._queue.qsize() >= self.batch_size:
            self._hurry.set()
        return batch, False

    def _get(self, timeout: float):
        try:
            if timeout <= 0:
                return self._queue.get_nowait()
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def _commit(self, batch: list[dict]) -> bool:
        """Insert the batch in one transaction, retrying transient failures; spill if all fail."""
        for attempt in range(1, self.max_batch_tries + 1):
            try:
                insert_rows(self._conn, batch)
                return True
            except sqlite3.OperationalError as exc:  # locked, busy, disk I/O: may pass
                error = exc
            except Exception as exc:  # a row the database will never take: do not spin on it
                error = exc
                break
            self._count("retries", 1)
            log.warning("usage batch of %d rows failed (try %d of %d): %s",
                        len(batch), attempt, self.max_batch_tries, error)
            if attempt == self.max_batch_tries or self._giving_up():
                break
            self._closing.wait(_backoff(attempt))
        log.error("usage batch of %d rows not stored (%s); spilled to %s",
                  len(batch), error, self.spill.path)
        self._count("failed_batches", 1)
        self._spill_rows(batch, "batch failed")
        return False

    def _giving_up(self) -> bool:
        return self._give_up_at is not None and time.monotonic() >= self._give_up_at

    def _mark_done(self, rows: list[dict], ok: bool) -> None:
        with self._cond:
            first = self._done + 1
            self._done += len(rows)
            if ok:
                self._counts["written"] += len(rows)
                self._counts["batches"] += 1
            else:
                self._failed_ranges = self._failed_ranges[-99:] + [(first, self._done)]
            self._cond.notify_all()

    # -- shared -------------------------------------------------------------------------------

    def _spill_rows(self, rows: list[dict], reason: str) -> None:
        try:
            self.spill.append(rows)
        except Exception as exc:
            log.error("%d usage rows lost (%s; spill file %s failed: %s)",
                      len(rows), reason, self.spill.path, exc)
            self._count("dropped", len(rows))
            return
        self._count("spilled", len(rows))

    def _count(self, name: str, n: int) -> None:
        with self._cond:
            self._counts[name] += n


def _backoff(attempt: int) -> float:
    """50 ms doubling to 2 s: long enough for another worker's batch to commit."""
    return min(0.05 * 2 ** (attempt - 1), 2.0)


class NullTracker:
    """Same interface as ``Tracker`` for "tracker off": records go nowhere."""

    db_path = None

    def start(self) -> None:
        pass

    def record(self, rec: UsageRecord) -> None:
        pass

    def flush(self, timeout: float = 5.0) -> bool:
        return True

    def close(self, timeout: float = 10.0) -> None:
        pass

    def stats(self) -> dict:
        return dict.fromkeys(
            ("queued", "written", "spilled", "failed_batches", "retries", "batches",
             "replayed", "dropped"), 0
        )
